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

// ---------------------------------------------------------------------------------------------
// TLS uprobes (ssl.rs, go_tls.rs).
// ---------------------------------------------------------------------------------------------

/// What an `SSL_read*`/`SSL_write*` entry hands to its uretprobe, keyed by pid_tgid. While an
/// entry exists the thread is inside the TLS call: socket syscalls it makes tie the `SSL*` to
/// their fd and their ciphertext is not shipped. LRU: a call that never returns cannot leak.
#[map]
pub static SSL_ARGS: LruHashMap<u64, SslArgs> = LruHashMap::with_max_entries(16384, 0);

/// (tgid, `SSL*`) → socket fd. Set from the socket syscall made inside an SSL call (socket BIO),
/// or, for libraries with memory BIOs (Node.js), from the last socket the thread read before its
/// first SSL call. Removed by `SSL_free`; LRU evicts the rest.
#[map]
pub static SSL_FD: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// pid_tgid → the last TCP socket fd the thread read (for memory-BIO TLS libraries).
#[map]
pub static LAST_READ_FD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// Go `crypto/tls.(*Conn).Read/Write` entry → RET probes, keyed by (tgid, goroutine): a goroutine
/// can move to another thread while it waits inside Read, so the thread id is not a key.
#[map]
pub static GO_TLS_ARGS: LruHashMap<SslKey, SslArgs> = LruHashMap::with_max_entries(16384, 0);

/// A (process, user-space pointer) pair.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ptr: u64,
}

/// Arguments of a TLS read/write call kept until it returns.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslArgs {
    /// `SSL*` (OpenSSL) or `*tls.Conn` (Go).
    pub ssl: u64,
    /// Plaintext buffer.
    pub buf: u64,
    /// `size_t *` of `SSL_read_ex`/`SSL_write_ex` (0 for the plain variants).
    pub len_ptr: u64,
    /// Socket fd (Go: read from the `tls.Conn` at entry; OpenSSL: unused).
    pub fd: u32,
    /// `SYS_SSL_READ`, `SYS_SSL_WRITE`, `SYS_GO_TLS_READ` or `SYS_GO_TLS_WRITE`.
    pub syscall: u32,
}
