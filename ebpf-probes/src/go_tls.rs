//! TLS plaintext from Go's `crypto/tls.(*Conn).Read` / `(*Conn).Write` (amd64, register ABI,
//! Go ≥ 1.17; tested with Debian's Go 1.19).
//!
//! | operation      | hooks                                                                     |
//! |----------------|---------------------------------------------------------------------------|
//! | call entry     | uprobe at the function: RAX = `*tls.Conn`, RBX/RCX = `b []byte` ptr/len,   |
//! |                | R14 = current goroutine `g`; the socket fd is read from the `tls.Conn`     |
//! | call return    | uprobes at every RET instruction of the function (user space decodes the  |
//! |                | machine code): RAX = n. No uretprobes: Go moves goroutine stacks, and a    |
//! |                | uretprobe's rewritten return address on a moved stack crashes the program |
//!
//! Entry and return are paired by (tgid, goroutine), not by thread: a goroutine blocked in Read
//! may resume on another thread. The fd comes from `tls.Conn.conn` (a `net.Conn` interface whose
//! data word points at a `*net.TCPConn` → `*netFD` → `poll.FD.Sysfd`): layouts that have not changed
//! since Go 1.12. A wrong guess cannot do harm: the fd is checked to be a TCP socket of the process.

use aya_ebpf::{helpers::bpf_probe_read_user, macros::uprobe, programs::ProbeContext};
use waybill_common::*;

use crate::{
    helpers::{count_lost, current, is_target, sock_info},
    maps::{GO_TLS_ARGS, SslArgs, SslKey},
    ssl::{emit_plaintext, mark_tls},
};

/// Offset of the data word of the `conn net.Conn` interface (first field of `tls.Conn`).
const TLS_CONN_CONN_DATA: u64 = 8;
/// `net.TCPConn{conn{fd *netFD}}`: the `*netFD` is the first word.
const NET_CONN_FD: u64 = 0;
/// `netFD{pfd poll.FD}`, `poll.FD{fdmu fdMutex (16 bytes); Sysfd int}`.
const NETFD_SYSFD: u64 = 16;

#[inline(always)]
fn user_u64(addr: u64) -> Option<u64> {
    // SAFETY: fault-safe read of the traced process's memory.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn enter(ctx: &ProbeContext, syscall: u32) -> u32 {
    let (tgid, tid, _) = current();
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: kprobe-type programs may read their pt_regs context directly.
    let (conn, buf, g) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx, (*ctx.regs).r14) };
    if conn == 0 || g == 0 {
        return 0;
    }
    let Some(data) = user_u64(conn + TLS_CONN_CONN_DATA) else { return 0 };
    let Some(netfd) = user_u64(data + NET_CONN_FD) else { return 0 };
    let Some(sysfd) = user_u64(netfd + NETFD_SYSFD) else { return 0 };
    if sysfd > 0xffff_ffff {
        return 0;
    }
    let fd = sysfd as u32;
    let Some(info) = sock_info(tgid, tid, fd, ROLE_UNKNOWN) else { return 0 };
    if info.is_tcp == 0 {
        return 0;
    }
    // The ciphertext this call reads or writes (and any later) is not shipped.
    mark_tls(tgid, fd, &info);
    let key = SslKey { tgid, _pad: 0, ptr: g };
    let args = SslArgs { ssl: conn, buf, len_ptr: 0, fd, syscall };
    if GO_TLS_ARGS.insert(&key, &args, 0).is_err() {
        count_lost(LOST_STASH_FULL);
    }
    0
}

#[uprobe]
pub fn up_go_tls_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, SYS_GO_TLS_READ)
}

#[uprobe]
pub fn up_go_tls_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, SYS_GO_TLS_WRITE)
}

/// Attached at every RET instruction of both functions.
#[uprobe]
pub fn up_go_tls_ret(ctx: ProbeContext) -> u32 {
    let (tgid, tid, _) = current();
    // SAFETY: as above.
    let (n, g) = unsafe { ((*ctx.regs).rax, (*ctx.regs).r14) };
    let key = SslKey { tgid, _pad: 0, ptr: g };
    // SAFETY: copied out before removal.
    let Some(args) = (unsafe { GO_TLS_ARGS.get(&key) }).copied() else {
        return 0;
    };
    let _ = GO_TLS_ARGS.remove(&key);
    let n = n as i64;
    if n <= 0 {
        return 0;
    }
    emit_plaintext(tgid, tid, args.fd, args.syscall, args.buf, n as u64);
    0
}
