//! Socket I/O of traced processes, from the portable syscall hooks (every kernel ≥ 4.17).
//!
//! | operation            | hooks                                                            |
//! |----------------------|------------------------------------------------------------------|
//! | bytes in / out       | `raw_tracepoint/sys_exit` reads the arguments from the saved user |
//! |                      | registers and copies the payload prefix: read, write, readv,      |
//! |                      | writev, recvfrom, sendto, recvmsg, sendmsg, sendfile (length only)|
//! | connection role      | accept/accept4 exit (server), `sys_enter_connect` + connect exit  |
//! |                      | (client); both exits through the same `sys_exit` program          |
//! | connection end       | close exit (the fd is still in the saved registers)               |
//! | `--port` selection   | listen and accept/accept4 exits of untraced processes            |
//!
//! Why exit-only for the data syscalls: one program run per syscall instead of an entry and an
//! exit program plus a per-thread stash written and deleted in between, and a failed call
//! (`EAGAIN` reads of an event loop) costs a compare. The registers a syscall takes its arguments
//! from are not changed by the syscall (only the return-value register is), so they are still
//! there at exit; where they sit in `struct pt_regs` comes from BTF (`SyscallRegs`), and the
//! syscall numbers from user space (`SYSCALL_KIND`), so the object is the same on every
//! architecture and kernel.
//!
//! fd → TCP 4-tuple comes from walking kernel structs with offsets read from BTF at load time
//! (helpers.rs), cached per (tgid, fd). kprobe/fentry variants (tcp_sendmsg/tcp_recvmsg) would be
//! cheaper where the kernel allows them; the loader reports their availability, and this
//! tracepoint path is the one that works everywhere, including under lockdown.
//!
//! Syscall enter tracepoint layout (stable): args at 16 + 8·i.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use waybill_common::*;

use crate::{
    events::emit_close,
    helpers::{
        config, count_lost, current, is_target, opaque, sock_info, sock_key, target_flags, target_insert, walk_fd,
    },
    maps::{
        DATA_PENDING, DATA_PROG, EVENTS, PendingData, SCRATCH, SLOT_ACCEPT, SLOT_CLOSE, SLOT_CONNECT, SLOT_COPY,
        SLOT_LISTEN, SOCKS, STASH, SYS_CONNECT_STASH, SYSCALL_KIND, SyscallArgs, WATCH_PORTS,
    },
};

#[inline(always)]
fn arg(ctx: &TracePointContext, i: usize) -> u64 {
    // SAFETY: reading a fixed offset of the tracepoint record; failures read as 0.
    unsafe { ctx.read_at::<u64>(16 + 8 * i) }.unwrap_or(0)
}

/// `struct pt_regs` layout of this architecture, written by user space from BTF before load.
#[unsafe(no_mangle)]
static REGS: SyscallRegs =
    SyscallRegs { nr: 0, nr_is_u32: 0, arg: [0; 3], compat_off: 0, compat_mask: 0, compat_value: 0, valid: 0, _pad: 0 };

#[inline(always)]
fn regs_layout() -> SyscallRegs {
    // SAFETY: a plain read of a .rodata global that user space filled in before load.
    unsafe { core::ptr::read_volatile(&REGS) }
}

/// A u64 of the saved user registers (kernel memory; a failed read gives 0).
#[inline(always)]
fn reg(regs: u64, off: u32) -> u64 {
    // SAFETY: bpf_probe_read_kernel is fault-safe.
    unsafe { bpf_probe_read_kernel((regs + off as u64) as *const u64) }.unwrap_or(0)
}

/// Exit of every syscall on the host (`raw_tracepoint/sys_exit`, args: `struct pt_regs *`, ret).
/// Cheapest checks first: a failed call, then the tgid filter, then the syscall number. Data
/// syscalls continue in `raw_sys_exit_copy`, accept/connect in their own programs (tail calls).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_data(ctx: RawTracePointContext) -> i32 {
    let r: i64 = ctx.arg(1);
    if r < 0 && r != -EINPROGRESS {
        return 0;
    }
    let (tgid, tid, pid_tgid) = current();
    let flags = target_flags(tgid);
    let traced = flags.is_some();
    // Untraced processes matter only for `--port` (an accept on a watched port).
    if !traced && config().watch_ports == 0 {
        return 0;
    }
    let l = regs_layout();
    if l.valid == 0 {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let mut nr = reg(regs, l.nr);
    if l.nr_is_u32 != 0 {
        nr &= 0xffff_ffff;
    }
    if nr >= SYSCALL_TABLE as u64 {
        return 0;
    }
    let syscall = match SYSCALL_KIND.get(nr as u32) {
        Some(&k) if k != 0 => k - 1,
        _ => return 0,
    };
    if l.compat_mask != 0 && reg(regs, l.compat_off) & l.compat_mask as u64 == l.compat_value as u64 {
        return 0;
    }
    if syscall >= SYS_ACCEPT {
        // Untraced processes get here only with `--port` in use (checked above).
        let slot = match syscall {
            SYS_ACCEPT => SLOT_ACCEPT,
            SYS_CONNECT => SLOT_CONNECT,
            SYS_CLOSE if traced && r == 0 => SLOT_CLOSE,
            SYS_LISTEN if !traced && r == 0 => SLOT_LISTEN,
            _ => return 0,
        };
        // SAFETY: on success the call does not return.
        unsafe { DATA_PROG.tail_call(&ctx, slot) };
        count_lost(LOST_STASH_FULL);
        return 0;
    }
    if !traced || r == 0 {
        return 0;
    }
    let fd = reg(regs, l.arg[0]) as u32;
    let Some(info) = sock_info(tgid, tid, fd, ROLE_UNKNOWN) else {
        return 0;
    };
    if info.is_tcp == 0 {
        return 0;
    }
    // TLS: ties an SSL* to this fd; ciphertext is not shipped (the uprobes send the plaintext).
    // Only processes with OpenSSL probes pay for the TLS map lookups.
    let tls = flags.unwrap_or(0) & TARGET_TLS != 0;
    if (tls && crate::ssl::on_socket_syscall(pid_tgid, tgid, fd, syscall, &info)) || info.is_tcp == SOCK_TLS {
        return 0;
    }
    let (ptr, len) = match syscall {
        SYS_SENDFILE => (0, 0),
        _ => (reg(regs, l.arg[1]), reg(regs, l.arg[2])),
    };
    let Some(slot) = DATA_PENDING.get_ptr_mut(0) else { return 0 };
    let args = SyscallArgs { ptr, len, sk: info.sk, fd, syscall, role: info.role, _pad: 0 };
    // SAFETY: this CPU's slot; the tail call below runs on the same CPU before anything else.
    unsafe { *slot = PendingData { args, total: r as u64, pid_tgid } };
    // SAFETY: on success the call does not return; slot 0 holds `raw_sys_exit_copy`.
    unsafe { DATA_PROG.tail_call(&ctx, SLOT_COPY) };
    count_lost(LOST_STASH_FULL);
    0
}

/// Second half of the data-syscall exit: copy the payload prefix and send the record.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_copy(_ctx: RawTracePointContext) -> i32 {
    let (tgid, tid, pid_tgid) = current();
    let Some(slot) = DATA_PENDING.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's slot, written by the first half just before the tail call.
    let p = unsafe { *slot };
    if p.pid_tgid != pid_tgid {
        return 0;
    }
    data_record(tgid, tid, pid_tgid, &p.args, p.total);
    0
}

/// Copy `n` bytes of user memory at `src` to `dst_off` in the scratch record. Bounded for the
/// verifier: the offset is below MAX_CAPTURE and the length at most MAX_CAPTURE, and the
/// scratch data array is 2·MAX_CAPTURE long.
///
/// The offset and length go through `opaque` before they are masked/clamped, so LLVM cannot prove
/// the mask and clamp redundant (it can: `captured < want ≤ MAX_CAPTURE`) and drop them. Without
/// them the 6.1 verifier rejects the program: in the iovec loop it walks a dead branch where
/// `captured` has inconsistent bounds (umin 8192 > umax 4095; newer verifiers prune it), pointer +
/// such a scalar degrades the destination to a scalar ("R1 type=scalar expected=fp, ...,
/// map_value"); in the single-buffer path the length reaches the helper unbounded ("R2 min value
/// is negative"). The AND and the compare recompute sane bounds on every kernel.
#[inline(always)]
fn copy_user(ev: *mut DataEvent, dst_off: u64, src: u64, n: u64) -> bool {
    let off = opaque(dst_off) & (MAX_CAPTURE as u64 - 1);
    let mut len = opaque(n);
    if len > MAX_CAPTURE as u64 {
        len = MAX_CAPTURE as u64;
    }
    // SAFETY: `ev` points at the per-CPU scratch value; off + len ≤ 2·MAX_CAPTURE.
    let dst = unsafe { (*ev).data.as_mut_ptr().add(off as usize) };
    let r = unsafe { aya_ebpf::helpers::generated::bpf_probe_read_user(dst.cast(), len as u32, src as *const _) };
    r == 0
}

/// Copies the payload prefix of a successful data syscall (`total` bytes moved) into a record.
#[inline(always)]
fn data_record(tgid: u32, tid: u32, pid_tgid: u64, args: &SyscallArgs, total: u64) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else { return };
    let cfg = config();
    let mut window = cfg.capture_bytes as u64;
    if window > MAX_CAPTURE as u64 {
        window = MAX_CAPTURE as u64;
    }
    let want = if total < window { total } else { window };
    let dir = match args.syscall {
        SYS_READ | SYS_READV | SYS_RECVFROM | SYS_RECVMSG => DIR_READ,
        _ => DIR_WRITE,
    };
    let mut captured: u64 = 0;
    match args.syscall {
        SYS_SENDFILE => {}
        SYS_READ | SYS_WRITE | SYS_RECVFROM | SYS_SENDTO => {
            if copy_user(ev, 0, args.ptr, want) {
                captured = want;
            } else {
                count_lost(LOST_READ_USER);
            }
        }
        _ => {
            // iovec based: readv/writev pass (iov, iovcnt); recvmsg/sendmsg pass a user msghdr
            // whose msg_iov / msg_iovlen sit at 16 / 24 (UAPI layout, not a kernel-internal one).
            let (iov, cnt) = if args.syscall == SYS_RECVMSG || args.syscall == SYS_SENDMSG {
                let iov: u64 = unsafe { bpf_probe_read_user((args.ptr + 16) as *const u64) }.unwrap_or(0);
                let cnt: u64 = unsafe { bpf_probe_read_user((args.ptr + 24) as *const u64) }.unwrap_or(0);
                (iov, cnt)
            } else {
                (args.ptr, args.len)
            };
            let mut i: u64 = 0;
            while i < MAX_IOVECS as u64 && i < cnt && captured < want {
                // One read per `struct iovec` (base, len).
                let [base, len] = unsafe { bpf_probe_read_user((iov + i * 16) as *const [u64; 2]) }.unwrap_or([0, 0]);
                let mut n = want - captured;
                if len < n {
                    n = len;
                }
                if n > 0 {
                    if !copy_user(ev, captured, base, n) {
                        count_lost(LOST_READ_USER);
                        break;
                    }
                    captured += n;
                }
                i += 1;
            }
        }
    }
    if captured < total && args.syscall != SYS_SENDFILE {
        count_lost(LOST_PAYLOAD_TRUNCATED);
    }
    // One timestamp for the data record and the context record that describes it.
    let ts = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `ev` is the per-CPU scratch record.
    unsafe {
        (*ev).head = DataHeader {
            hdr: EventHeader { kind: KIND_DATA, tgid, tid, _pad: 0, ts_ns: ts },
            fd: args.fd,
            dir,
            total,
            captured: captured as u32,
            syscall: args.syscall,
            sk: args.sk,
        };
    }
    if crate::inject::active() {
        crate::inject::on_data(ev, pid_tgid, args.role);
    }
    // Re-read from map memory: the verifier then sees one state here whatever path led here.
    // SAFETY: as above.
    let (captured, kind) =
        unsafe { (core::ptr::read_volatile(&(*ev).head.captured), core::ptr::read_volatile(&(*ev).head.hdr.kind)) };
    let body = if kind == KIND_DATA_CTX {
        ctx_trailer_offset(captured) as u64 + core::mem::size_of::<CtxTrailer>() as u64
    } else {
        captured as u64
    };
    let mut size = core::mem::size_of::<DataHeader>() as u64 + body;
    if size > core::mem::size_of::<DataEvent>() as u64 {
        size = core::mem::size_of::<DataEvent>() as u64;
    }
    // SAFETY: `size` is bounded by the scratch record's size.
    let bytes = unsafe { core::slice::from_raw_parts(ev as *const u8, size as usize) };
    if EVENTS.output::<[u8]>(bytes, crate::events::output_flags(size)).is_err() {
        count_lost(LOST_RINGBUF_FULL);
    }
}

/// accept()/accept4() returned a new connection: the process is its server (tail-called from
/// `raw_sys_exit_data`).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_accept(ctx: RawTracePointContext) -> i32 {
    let (tgid, tid, _) = current();
    let r: i64 = ctx.arg(1);
    if r < 0 {
        return 0;
    }
    let fd = r as u32;
    if !is_target(tgid) {
        if config().watch_ports == 0 {
            return 0;
        }
        // An untraced process accepted a connection: trace it if the local port is watched.
        let mut t = Tuple::default();
        if walk_fd(fd, &mut t).is_none() {
            return 0;
        }
        // SAFETY: presence test only.
        if unsafe { WATCH_PORTS.get(&t.lport) }.is_none() {
            return 0;
        }
        let _ = target_insert(tgid, TARGET_TRACED);
        crate::events::emit_proc(KIND_PORT_MATCH, tgid, tid, t.lport as u32);
    }
    let _ = sock_info(tgid, tid, fd, ROLE_SERVER);
    0
}

#[tracepoint]
pub fn tp_sys_enter_connect(ctx: TracePointContext) -> u32 {
    let (tgid, _, pid_tgid) = current();
    if !is_target(tgid) {
        return 0;
    }
    let fd = arg(&ctx, 0) as u32;
    if crate::inject::active() {
        crate::inject::on_connect(arg(&ctx, 1), arg(&ctx, 2));
    }
    let args = SyscallArgs { ptr: 0, len: 0, sk: 0, fd, syscall: SYS_CONNECT_STASH, role: ROLE_CLIENT, _pad: 0 };
    if STASH.insert(&pid_tgid, &args, 0).is_err() {
        count_lost(LOST_STASH_FULL);
    }
    0
}

const EINPROGRESS: i64 = 115;

/// connect() returned (tail-called from `raw_sys_exit_data`): the process is the client.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_connect(ctx: RawTracePointContext) -> i32 {
    let (tgid, tid, pid_tgid) = current();
    // SAFETY: copied out before removal.
    let Some(args) = (unsafe { STASH.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = STASH.remove(&pid_tgid);
    let r: i64 = ctx.arg(1);
    if args.syscall != SYS_CONNECT_STASH || (r != 0 && r != -EINPROGRESS) {
        return 0;
    }
    let _ = sock_info(tgid, tid, args.fd, ROLE_CLIENT);
    0
}

/// close() of a traced process returned 0 (tail-called from `raw_sys_exit_data`): forget the fd
/// and, for a TCP socket, say the connection ended. At exit rather than entry: no second hook on
/// every close() of the host (the entry tracepoints run the kernel's perf path per call), and a
/// failed close() changes nothing. Between the close and this exit another thread may have been
/// given the same fd number: when the cache already holds that new socket (its accept/connect exit
/// ran in between), it stays.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_close(ctx: RawTracePointContext) -> i32 {
    let (tgid, tid, _) = current();
    let fd = reg(ctx.arg(0), regs_layout().arg[0]) as u32;
    let key = sock_key(tgid, fd);
    // SAFETY: copied out before removal.
    let Some(info) = (unsafe { SOCKS.get(&key) }).copied() else {
        return 0;
    };
    if info.is_tcp != 0 {
        let mut t = Tuple::default();
        if walk_fd(fd, &mut t) == Some(info.sk) {
            return 0;
        }
    }
    let _ = SOCKS.remove(&key);
    if info.is_tcp != 0 {
        emit_close(tgid, tid, fd, info.sk);
    }
    0
}

/// listen() on a watched port makes an untraced process a target (tail-called from
/// `raw_sys_exit_data` for a successful listen() of an untraced process while `--port` is in use).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_listen(ctx: RawTracePointContext) -> i32 {
    let (tgid, tid, _) = current();
    if is_target(tgid) {
        return 0;
    }
    let fd = reg(ctx.arg(0), regs_layout().arg[0]) as u32;
    let mut t = Tuple::default();
    if walk_fd(fd, &mut t).is_none() {
        return 0;
    }
    // SAFETY: presence test only.
    if unsafe { WATCH_PORTS.get(&t.lport) }.is_none() {
        return 0;
    }
    let _ = target_insert(tgid, TARGET_TRACED);
    crate::events::emit_proc(KIND_PORT_MATCH, tgid, tid, t.lport as u32);
    0
}
