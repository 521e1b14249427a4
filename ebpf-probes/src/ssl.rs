//! TLS plaintext from OpenSSL-compatible libraries (libssl.so, or OpenSSL linked into an
//! executable such as Node.js's `node`), through uprobes attached by user space to the selected
//! processes only (`agent/src/loader/uprobes.rs`).
//!
//! | operation                  | hooks                                                          |
//! |----------------------------|----------------------------------------------------------------|
//! | plaintext in               | `SSL_read`, `SSL_read_ex`: entry stashes (SSL*, buf) per thread, |
//! |                            | the uretprobe copies what was returned                          |
//! | plaintext out              | `SSL_write`, `SSL_write_ex`: same, copying what was accepted    |
//! | SSL* → socket fd           | a socket syscall made while the thread is inside an SSL call    |
//! |                            | (socket BIO: Python, curl, most C programs); otherwise the last |
//! |                            | socket the thread read before the call (memory BIO: Node.js)    |
//! | forget an SSL*             | `SSL_free`                                                      |
//!
//! The plaintext goes out as an ordinary `KIND_DATA` record of the socket fd with `syscall`
//! `SYS_SSL_READ`/`SYS_SSL_WRITE`, so user space feeds it to the same connection table and parsers
//! as clear-text sockets. The socket is marked `SOCK_TLS` in the `SOCKS` cache and its ciphertext
//! is not shipped any more (syscalls.rs asks `on_socket_syscall`).

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use waybill_common::*;

use crate::{
    helpers::{config, count_lost, current, is_target, opaque, sock_info, sock_key},
    maps::{EVENTS, LAST_READ_FD, SCRATCH, SOCKS, SSL_ARGS, SSL_FD, SslArgs, SslKey},
};

/// Called by the data-syscall program for every successful TCP socket syscall of a traced process.
/// Ties the `SSL*` of a TLS call in progress on this thread to `fd`, remembers the last socket
/// read by the thread, and returns true when the payload must not be shipped (ciphertext).
#[inline(always)]
pub fn on_socket_syscall(pid_tgid: u64, tgid: u32, fd: u32, syscall: u32, info: &SockInfo) -> bool {
    // SAFETY: copied out immediately.
    if let Some(args) = unsafe { SSL_ARGS.get(&pid_tgid) } {
        let key = SslKey { tgid, _pad: 0, ptr: args.ssl };
        let _ = SSL_FD.insert(&key, &fd, 0);
        mark_tls(tgid, fd, info);
        return true;
    }
    if matches!(syscall, SYS_READ | SYS_READV | SYS_RECVFROM | SYS_RECVMSG) {
        // Written in place when the thread already has an entry: an LRU map update takes a free
        // element, fills it, links it and frees the old one (~12 % of the data-syscall program's
        // time at 2000 req/s when a server thread reads a different keep-alive connection on
        // every request), an in-place store is one write to a line the lookup just loaded.
        match LAST_READ_FD.get_ptr_mut(&pid_tgid) {
            // SAFETY: a map value of this type; a reader on another CPU sees the old or new fd.
            Some(v) => unsafe { *v = fd },
            None => {
                let _ = LAST_READ_FD.insert(&pid_tgid, &fd, 0);
            }
        }
    }
    info.is_tcp == SOCK_TLS
}

/// From now on this socket's syscall payload is ciphertext: do not ship it.
#[inline(always)]
pub fn mark_tls(tgid: u32, fd: u32, info: &SockInfo) {
    if info.is_tcp == 1 {
        let v = SockInfo { is_tcp: SOCK_TLS, ..*info };
        let _ = SOCKS.insert(&sock_key(tgid, fd), &v, 0);
    }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, syscall: u32, ex: bool) -> u32 {
    let (tgid, _, pid_tgid) = current();
    if !is_target(tgid) {
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let len_ptr: u64 = if ex { ctx.arg(3).unwrap_or(0) } else { 0 };
    if ssl == 0 || buf == 0 {
        return 0;
    }
    let key = SslKey { tgid, _pad: 0, ptr: ssl };
    // SAFETY: presence test / copy.
    if unsafe { SSL_FD.get(&key) }.is_none() {
        // Memory BIO (no socket syscall inside the call): the socket this thread last read from.
        if let Some(fd) = unsafe { LAST_READ_FD.get(&pid_tgid) }.copied() {
            let _ = SSL_FD.insert(&key, &fd, 0);
        }
    }
    let args = SslArgs { ssl, buf, len_ptr, fd: 0, syscall };
    if SSL_ARGS.insert(&pid_tgid, &args, 0).is_err() {
        count_lost(LOST_STASH_FULL);
    }
    0
}

#[inline(always)]
fn exit(ctx: &RetProbeContext) -> u32 {
    let (tgid, tid, pid_tgid) = current();
    // SAFETY: copied out before the entry is removed.
    let Some(args) = (unsafe { SSL_ARGS.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = SSL_ARGS.remove(&pid_tgid);
    let r: i64 = ctx.ret::<i32>() as i64;
    let n: u64 = if args.len_ptr != 0 {
        // *_ex: 1 on success, the byte count in *len_ptr.
        if r != 1 {
            return 0;
        }
        // SAFETY: fault-safe user read.
        match unsafe { bpf_probe_read_user(args.len_ptr as *const u64) } {
            Ok(v) => v,
            Err(_) => return 0,
        }
    } else if r > 0 {
        r as u64
    } else {
        return 0;
    };
    if n == 0 {
        return 0;
    }
    let key = SslKey { tgid, _pad: 0, ptr: args.ssl };
    // SAFETY: copied out.
    let Some(fd) = (unsafe { SSL_FD.get(&key) }).copied() else {
        // No socket known for this SSL* (not seen doing socket I/O yet): nothing to attribute to.
        return 0;
    };
    emit_plaintext(tgid, tid, fd, args.syscall, args.buf, n);
    0
}

/// Copy `n` bytes of user memory at `src` into the scratch record (bounded for the verifier as
/// in syscalls.rs: offset 0, length ≤ MAX_CAPTURE, array 2·MAX_CAPTURE long).
#[inline(always)]
fn copy_user(ev: *mut DataEvent, src: u64, n: u64) -> bool {
    // Opaque so that the clamp below survives LLVM and bounds the length for the 6.1 verifier.
    let mut len = opaque(n);
    if len > MAX_CAPTURE as u64 {
        len = MAX_CAPTURE as u64;
    }
    // SAFETY: `ev` points at the per-CPU scratch value; len ≤ MAX_CAPTURE < its data length.
    let dst = unsafe { (*ev).data.as_mut_ptr() };
    let r = unsafe { aya_ebpf::helpers::generated::bpf_probe_read_user(dst.cast(), len as u32, src as *const _) };
    r == 0
}

/// Ship `n` plaintext bytes at `buf` as a data record of socket `fd` (marking the socket TLS).
#[inline(always)]
pub fn emit_plaintext(tgid: u32, tid: u32, fd: u32, syscall: u32, buf: u64, n: u64) {
    let Some(info) = sock_info(tgid, tid, fd, ROLE_UNKNOWN) else {
        return;
    };
    if info.is_tcp == 0 {
        return;
    }
    mark_tls(tgid, fd, &info);
    let Some(ev) = SCRATCH.get_ptr_mut(0) else { return };
    let mut window = config().capture_bytes as u64;
    if window > MAX_CAPTURE as u64 {
        window = MAX_CAPTURE as u64;
    }
    let want = if n < window { n } else { window };
    let mut captured = 0u64;
    if copy_user(ev, buf, want) {
        captured = want;
    } else {
        count_lost(LOST_READ_USER);
    }
    if captured < n {
        count_lost(LOST_PAYLOAD_TRUNCATED);
    }
    let dir = if syscall == SYS_SSL_READ || syscall == SYS_GO_TLS_READ { DIR_READ } else { DIR_WRITE };
    // SAFETY: `ev` is the per-CPU scratch record.
    unsafe {
        (*ev).head = DataHeader {
            hdr: EventHeader { kind: KIND_DATA, tgid, tid, _pad: 0, ts_ns: bpf_ktime_get_ns() },
            fd,
            dir,
            total: n,
            captured: captured as u32,
            syscall,
            sk: info.sk,
        };
    }
    let mut size = core::mem::size_of::<DataHeader>() as u64 + captured;
    if size > core::mem::size_of::<DataEvent>() as u64 {
        size = core::mem::size_of::<DataEvent>() as u64;
    }
    // SAFETY: `size` is bounded by the scratch record's size.
    let bytes = unsafe { core::slice::from_raw_parts(ev as *const u8, size as usize) };
    if EVENTS.output::<[u8]>(bytes, crate::events::output_flags(size)).is_err() {
        count_lost(LOST_RINGBUF_FULL);
    }
}

#[uprobe]
pub fn up_ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, SYS_SSL_READ, false)
}

#[uprobe]
pub fn up_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, SYS_SSL_READ, true)
}

#[uprobe]
pub fn up_ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, SYS_SSL_WRITE, false)
}

#[uprobe]
pub fn up_ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, SYS_SSL_WRITE, true)
}

/// One program for the returns of all four.
#[uretprobe]
pub fn urp_ssl_rw(ctx: RetProbeContext) -> u32 {
    exit(&ctx)
}

/// `SSL_free(SSL*)`: the pointer may be reused by the next connection.
#[uprobe]
pub fn up_ssl_free(ctx: ProbeContext) -> u32 {
    let (tgid, _, _) = current();
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let key = SslKey { tgid, _pad: 0, ptr: ssl };
    let _ = SSL_FD.remove(&key);
    0
}
