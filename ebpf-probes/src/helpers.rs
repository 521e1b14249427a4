//! Small shared helpers: target filter, loss counters, globals, the fd → socket walk.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel};
use waybill_common::{
    AF_INET, AF_INET6, KernelOffsets, ProbeConfig, SockInfo, TARGET_CHUNK, TARGET_TRACED, TracepointOffsets, Tuple,
};

use crate::maps::{INJECT_STATS, LOST, SOCKS, TARGET_BYTES, TARGETS};

/// Kernel struct member offsets, written by user space from /sys/kernel/btf/vmlinux before load.
#[unsafe(no_mangle)]
static OFFS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_f_inode: 0,
    file_private_data: 0,
    inode_i_mode: 0,
    socket_type: 0,
    socket_sk: 0,
    skc_family: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    valid: 0,
};

/// Tracepoint field offsets read from tracefs `format` files before load.
#[unsafe(no_mangle)]
static TP_OFFS: TracepointOffsets =
    TracepointOffsets { newtask_pid: 0, newtask_clone_flags: 0, newtask_clone_flags_size: 0, _pad: 0 };

/// Run-time settings.
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = ProbeConfig { capture_bytes: 4096, watch_exec: 0, watch_ports: 0, inject: 0 };

#[inline(always)]
pub fn config() -> ProbeConfig {
    // SAFETY: a plain read of a .rodata global that user space filled in before load.
    unsafe { read_volatile(&CONFIG) }
}

#[inline(always)]
pub fn tp_offsets() -> TracepointOffsets {
    // SAFETY: as above.
    unsafe { read_volatile(&TP_OFFS) }
}

/// `v`, through a volatile stack slot: LLVM can no longer prove a bounds check or mask on the
/// result redundant, so the check reaches the verifier. Needed for the 6.1 verifier, which (unlike
/// 6.8+) walks dead branches whose scalars have inconsistent bounds and rejects them (see
/// `copy_user` in syscalls.rs).
#[inline(always)]
pub fn opaque(v: u64) -> u64 {
    // SAFETY: reading a local.
    unsafe { read_volatile(&v) }
}

macro_rules! off {
    ($f:ident) => {
        // SAFETY: a plain read of a .rodata global that user space filled in before load.
        unsafe { read_volatile(&OFFS.$f) } as u64
    };
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current() -> (u32, u32, u64) {
    let v = bpf_get_current_pid_tgid();
    ((v >> 32) as u32, v as u32, v)
}

/// `tgid`'s byte in `TARGET_BYTES` (None: beyond the array, ask `TARGETS`).
#[inline(always)]
fn target_byte(tgid: u32) -> Option<*mut u8> {
    let chunk = TARGET_BYTES.get_ptr_mut(tgid / TARGET_CHUNK)?;
    // SAFETY: the index is masked below the chunk's size.
    Some(unsafe { (chunk as *mut u8).add((tgid & (TARGET_CHUNK - 1)) as usize) })
}

/// Is this tgid traced? The first check of every program.
#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    target_flags(tgid).is_some()
}

/// The `TARGET_*` bits of a traced process (None: not traced).
#[inline(always)]
pub fn target_flags(tgid: u32) -> Option<u32> {
    match target_byte(tgid) {
        // SAFETY: a byte of a map value; user space may write it at any time (a byte store).
        Some(p) => match unsafe { read_volatile(p) } {
            0 => None,
            b => Some(b as u32),
        },
        // SAFETY: a copy of the value is read.
        None => unsafe { TARGETS.get(&tgid) }.copied(),
    }
}

/// Starts tracing `tgid` with `flags` (`TARGETS`, then its byte). False when `TARGETS` is full.
#[inline(always)]
pub fn target_insert(tgid: u32, flags: u32) -> bool {
    if TARGETS.insert(&tgid, &flags, 0).is_err() {
        return false;
    }
    if let Some(p) = target_byte(tgid) {
        // SAFETY: a byte of a map value (see `target_flags`).
        unsafe { write_volatile(p, (flags | TARGET_TRACED) as u8) };
    }
    true
}

/// Stops tracing `tgid` (its byte, then `TARGETS`).
#[inline(always)]
pub fn target_remove(tgid: u32) {
    if let Some(p) = target_byte(tgid) {
        // SAFETY: as in `target_insert`.
        unsafe { write_volatile(p, 0) };
    }
    let _ = TARGETS.remove(&tgid);
}

/// Count one lost item of kind `idx`.
#[inline(always)]
pub fn count_lost(idx: u32) {
    if let Some(p) = LOST.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// Count one sk_msg / sock_ops outcome `INJ_*`.
#[inline(always)]
pub fn count_inject(idx: u32) {
    if let Some(p) = INJECT_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn rd<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel is fault-safe; a bad address gives an error, not a crash.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;

/// Walk current task → files → fdtable → file → socket → sock and read the TCP 4-tuple of `fd`.
/// Returns the `struct sock *` or None when `fd` is not a TCP (stream, INET/INET6) socket.
#[inline(always)]
pub fn walk_fd(fd: u32, t: &mut Tuple) -> Option<u64> {
    if off!(valid) == 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = rd(task + off!(task_files))?;
    if files == 0 {
        return None;
    }
    let fdt: u64 = rd(files + off!(files_fdt))?;
    if fdt == 0 {
        return None;
    }
    let max_fds: u32 = rd(fdt + off!(fdt_max_fds))?;
    if fd >= max_fds {
        return None;
    }
    let fdarr: u64 = rd(fdt + off!(fdt_fd))?;
    let file: u64 = rd(fdarr + (fd as u64) * 8)?;
    if file == 0 {
        return None;
    }
    let inode: u64 = rd(file + off!(file_f_inode))?;
    let mode: u16 = rd(inode + off!(inode_i_mode))?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let sock: u64 = rd(file + off!(file_private_data))?;
    let stype: u16 = rd(sock + off!(socket_type))?;
    if stype != SOCK_STREAM {
        return None;
    }
    let sk: u64 = rd(sock + off!(socket_sk))?;
    if sk == 0 {
        return None;
    }
    sk_tuple(sk, t)?;
    Some(sk)
}

/// The 4-tuple of a TCP `struct sock *` (ports in host byte order).
#[inline(always)]
pub fn sk_tuple(sk: u64, t: &mut Tuple) -> Option<()> {
    let family: u16 = rd(sk + off!(skc_family))?;
    let dport: u16 = rd(sk + off!(skc_dport))?;
    let num: u16 = rd(sk + off!(skc_num))?;
    t.family = family;
    t.lport = num;
    t.rport = u16::from_be(dport);
    if family == AF_INET {
        let d: [u8; 4] = rd(sk + off!(skc_daddr))?;
        let s: [u8; 4] = rd(sk + off!(skc_rcv_saddr))?;
        t.raddr[..4].copy_from_slice(&d);
        t.laddr[..4].copy_from_slice(&s);
        Some(())
    } else if family == AF_INET6 && off!(skc_v6_daddr) != 0 {
        t.raddr = rd(sk + off!(skc_v6_daddr))?;
        t.laddr = rd(sk + off!(skc_v6_rcv_saddr))?;
        Some(())
    } else {
        None
    }
}

/// Cache key of an fd of a process.
#[inline(always)]
pub fn sock_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// Look `fd` up in the socket cache; on a miss walk it, cache the answer (positive or negative)
/// and, for a TCP socket, announce it to user space with its tuple. Returns the cached facts.
#[inline(always)]
pub fn sock_info(tgid: u32, tid: u32, fd: u32, role: u32) -> Option<SockInfo> {
    let key = sock_key(tgid, fd);
    if role == waybill_common::ROLE_UNKNOWN {
        // SAFETY: the value is copied out immediately.
        if let Some(info) = unsafe { SOCKS.get(&key) } {
            return Some(*info);
        }
    }
    let mut t = Tuple::default();
    let info = match walk_fd(fd, &mut t) {
        Some(sk) => {
            crate::events::emit_conn(tgid, tid, fd, role, sk, &t);
            SockInfo { sk, is_tcp: 1, role, owner: 0 }
        }
        None => SockInfo { sk: 0, is_tcp: 0, role, owner: 0 },
    };
    let _ = SOCKS.insert(&key, &info, 0);
    Some(info)
}
