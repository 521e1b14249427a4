//! Every map the programs use, with its bound and eviction rule.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use waybill_common::{DataEvent, LOST_COUNTERS, SockInfo};

/// Records to user space. Size set by user space at load time (`--ring-buffer-bytes`); when it is
/// full a record is dropped and `LOST[LOST_RINGBUF_FULL]` counts it.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// tgids being traced. Filled by user space (selection) and by `task_newtask` (children of traced
/// processes); entries are removed when the process exits. Bound: 4096 processes (insert fails
/// beyond it and user space reports the process as not attached).
#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Ports named with `--port`: a process that listens on or accepts from one is traced.
#[map]
pub static WATCH_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(256, 0);

/// (tgid << 32 | fd) → socket facts, so the fd → socket walk runs once per fd. Positive and
/// negative ("not TCP") results are cached; entries are deleted on close(); LRU evicts the rest.
#[map]
pub static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// Syscall arguments from sys_enter_* kept for sys_exit_*, keyed by pid_tgid (one syscall per
/// thread at a time). LRU so a thread that never returns cannot leak an entry forever.
#[map]
pub static STASH: LruHashMap<u64, SyscallArgs> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU scratch space where a data record is assembled before it is copied to `EVENTS`.
#[map]
pub static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

/// Loss counters, indexed by `LOST_*`; user space sums the CPUs.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_COUNTERS, 0);

/// What sys_enter_* hands to sys_exit_*.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SyscallArgs {
    /// Buffer, iovec array or msghdr pointer in the traced process.
    pub ptr: u64,
    /// Buffer length or iovec count.
    pub len: u64,
    pub sk: u64,
    pub fd: u32,
    /// One of `SYS_*`, or `SYS_CONNECT_STASH`.
    pub syscall: u32,
}

/// Stash tag for connect() (not a data syscall).
pub const SYS_CONNECT_STASH: u32 = 100;
