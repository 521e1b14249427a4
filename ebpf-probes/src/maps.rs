//! Every map the programs use, with its bound and eviction rule.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SockHash},
};
use waybill_common::{
    ConnectKey, DataEvent, HEAD_SCAN, INJ_COUNTERS, LOST_COUNTERS, SYSCALL_TABLE, SockInfo, TARGET_CHUNK, Tuple,
};

/// Records to user space. Size set by user space at load time (`--ring-buffer-bytes`); when it is
/// full a record is dropped and `LOST[LOST_RINGBUF_FULL]` counts it.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Set to 1 by user space when its event loop goes to sleep with the ring buffer empty (no drain
/// timer armed); the next record submitted clears it and wakes the agent. One entry, never
/// evicts.
#[map]
pub static AGENT_SLEEPING: Array<u32> = Array::with_max_entries(1, 0);

/// tgids being traced. Filled by user space (selection) and by `task_newtask` (children of traced
/// processes); entries are removed when the process exits. Bound: 4096 processes (insert fails
/// beyond it and user space reports the process as not attached).
#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// The same set as `TARGETS`, one byte per tgid (its `TARGET_*` bits; 0: not traced), so the
/// check that starts every program on every syscall of the host is an inlined array load rather
/// than a hash lookup. `TARGET_CHUNK` tgids per entry; user space sizes it from
/// `/proc/sys/kernel/pid_max` at load time and writes single bytes through a shared mapping
/// (`BPF_F_MMAPABLE`), so kernel and user writers never overwrite each other's bytes. A tgid
/// beyond the last entry (pid_max raised after start) falls back to `TARGETS`. Every writer sets
/// `TARGETS` first and the byte after it, and clears the byte first and `TARGETS` after it.
#[map]
pub static TARGET_BYTES: Array<[u8; TARGET_CHUNK as usize]> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// `comm` values (executable names, 15 bytes + NUL padding) named with `--exe`: a process that
/// execs one is traced from its first instruction, before user space hears of it.
#[map]
pub static WATCH_COMMS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(64, 0);

/// Ports named with `--port`: a process that listens on or accepts from one is traced.
#[map]
pub static WATCH_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(256, 0);

/// (tgid << 32 | fd) → socket facts, so the fd → socket walk runs once per fd. Positive and
/// negative ("not TCP") results are cached; entries are deleted on close(); LRU evicts the rest.
#[map]
pub static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// connect() arguments from `sys_enter_connect` kept for `sys_exit_connect`, keyed by pid_tgid
/// (one syscall per thread at a time). The data syscalls need no stash: their program reads the
/// arguments from the saved registers at exit. A plain hash, not LRU: written and deleted on every
/// connect(). An entry is removed by its syscall's exit (which also runs for a syscall interrupted
/// by a fatal signal) and overwritten by the thread's next connect(); a full map drops the
/// syscall and counts it (`LOST_STASH_FULL`).
#[map]
pub static STASH: HashMap<u64, SyscallArgs> = HashMap::with_max_entries(16384, 0);

/// Syscall number → `SYS_* + 1` for the data syscalls (0: not traced), filled by user space
/// before attach from its own architecture's numbers. Fixed size, never evicts.
#[map]
pub static SYSCALL_KIND: Array<u32> = Array::with_max_entries(SYSCALL_TABLE, 0);

/// The data syscall being recorded on this CPU: `raw_sys_exit_data` (filter, socket lookup)
/// leaves it here and tail-calls `raw_sys_exit_copy` (payload copy, trace context, record)
/// through `DATA_PROG`. Two programs, so the verifier checks each half on its own (together they
/// exceed its 1M-instruction budget). Overwritten by the next syscall on the CPU.
#[map]
pub static DATA_PENDING: PerCpuArray<PendingData> = PerCpuArray::with_max_entries(1, 0);

/// The halves `raw_sys_exit_data` tail-calls (`SLOT_*`), installed by user space before it is
/// attached.
#[map]
pub static DATA_PROG: ProgramArray = ProgramArray::with_max_entries(5, 0);
/// `raw_sys_exit_copy`: payload copy, trace context, data record.
pub const SLOT_COPY: u32 = 0;
/// `raw_sys_exit_accept`: a new server connection.
pub const SLOT_ACCEPT: u32 = 1;
/// `raw_sys_exit_connect`: a new client connection.
pub const SLOT_CONNECT: u32 = 2;
/// `raw_sys_exit_close`: a traced process closed an fd.
pub const SLOT_CLOSE: u32 = 3;
/// `raw_sys_exit_listen`: an untraced process listens (`--port`).
pub const SLOT_LISTEN: u32 = 4;

/// A data syscall's arguments and result, from the first half of the exit program to the second.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingData {
    pub args: SyscallArgs,
    /// Bytes the syscall moved (> 0).
    pub total: u64,
    /// `bpf_get_current_pid_tgid()` of the syscall (checked by the second half).
    pub pid_tgid: u64,
}

/// Per-CPU scratch space where a data record is assembled before it is copied to `EVENTS`.
#[map]
pub static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

/// Loss counters, indexed by `LOST_*`; user space sums the CPUs.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_COUNTERS, 0);

/// A data syscall's arguments (read at exit), or what sys_enter_connect hands to its exit.
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
    /// `ROLE_*` of the socket (from the socket cache).
    pub role: u32,
    pub _pad: u32,
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

// ---------------------------------------------------------------------------------------------
// Trace-context propagation (inject.rs).
// ---------------------------------------------------------------------------------------------

/// 1 at index 0 once user space attached sock_ops + sk_msg; until then (or with `--no-inject`)
/// no kernel contexts are decided.
#[map]
pub static INJECT_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Destination of a recent `connect()` by a traced process → when (ktime). sock_ops runs outside
/// the process's context and the connection may be established before `connect()` returns, so
/// the new socket is recognised by its destination and age (≤ `CONNECT_FRESH_NS`). LRU.
#[map]
pub static PENDING_CONNECT: LruHashMap<ConnectKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Outgoing connections of traced processes that the sk_msg program sees, by 4-tuple. Entries
/// leave with their socket (the kernel removes closed sockets from a sockhash).
#[map]
pub static INJECT_SOCKS: SockHash<Tuple> = SockHash::with_max_entries(65536, 0);

/// Per-connection request boundary state for sk_msg, by 4-tuple: `MSG_*`. Reset when sock_ops adds
/// the socket; set to `MSG_AWAITING_RESPONSE` when a request head is sent; back to
/// `MSG_BOUNDARY` when the traced process reads a final (non-1xx) response head. LRU.
#[map]
pub static MSG_STATE: LruHashMap<Tuple, u32> = LruHashMap::with_max_entries(65536, 0);

/// The next message starts a request.
pub const MSG_BOUNDARY: u32 = 0;
/// A request was sent and its response not read yet: the next message is a body or pipelined.
pub const MSG_AWAITING_RESPONSE: u32 = 1;
/// The connection's first message was not HTTP: never inject into it.
pub const MSG_NOT_HTTP: u32 = 2;

/// pid_tgid → the server request that thread is serving now (decided in the kernel when it read
/// the request head). Overwritten in place by the thread's next request; `sk = 0` (no current
/// request) written when the response head goes out on that connection. LRU bounds threads that
/// vanish.
#[map]
pub static THREAD_CTX: LruHashMap<u64, ThreadCtx> = LruHashMap::with_max_entries(16384, 0);

/// Outcomes of the sk_msg program and sock_ops, indexed by `INJ_*`; user space sums the CPUs.
#[map]
pub static INJECT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(INJ_COUNTERS, 0);

/// Per-CPU work space of the head scanner (sk_msg copies the head here; the tracepoint side uses
/// `SCRATCH`) and of the header formatter.
#[map]
pub static HEAD_BUF: PerCpuArray<HeadBuf> = PerCpuArray::with_max_entries(1, 0);

/// Results of a head scan are kept in map memory, not registers, so the verifier sees the same
/// state at every exit of the scan loop (otherwise each exit offset is verified separately).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeadScan {
    /// Offset just past the request line's CRLF (0: none in the window).
    pub line_end: u32,
    /// Offset just past the blank line ending the head (0: not in the window).
    pub head_end: u32,
    /// Offset of a `traceparent:` header line (0: none before the head end).
    pub tp: u32,
    /// Valid bytes (re-read from memory in every iteration so the verifier does not narrow it).
    pub n: u32,
}

#[repr(C)]
pub struct HeadBuf {
    pub scan: HeadScan,
    pub tp_scan: HeadScan,
    /// The inserted header line (70 bytes used).
    pub line: [u8; 80],
    /// Twice the window, so indexes < HEAD_SCAN + 64 stay in bounds.
    pub data: [u8; 2 * HEAD_SCAN],
}

/// A thread's current server request.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadCtx {
    pub trace_id: [u8; 16],
    /// The SERVER span id.
    pub span_id: [u8; 8],
    /// The server connection.
    pub sk: u64,
    pub ts_ns: u64,
    /// `CTX_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
