//! Types shared by Waybill's eBPF programs (`ebpf-probes/src`) and the user-space agent.
//!
//! Every struct here is `#[repr(C)]` with explicit padding and a size assertion, so the kernel
//! and user sides cannot drift apart. Every ring-buffer record starts with [`EventHeader`] whose
//! first field is the record kind; kinds are grouped in ranges per hook family.
#![no_std]

use core::mem::size_of;

// ---------------------------------------------------------------------------------------------
// Record kinds. 1xx: process lifecycle, 2xx: sockets.
// ---------------------------------------------------------------------------------------------

/// A process called execve (only sent while user space asked for exec events).
pub const KIND_PROC_EXEC: u32 = 100;
/// A traced process forked a child process; the child is already traced.
pub const KIND_PROC_FORK: u32 = 101;
/// A traced process exited (its main thread ended).
pub const KIND_PROC_EXIT: u32 = 102;
/// A process that is not traced yet started listening on / accepted from a watched port.
pub const KIND_PORT_MATCH: u32 = 103;

/// First sight of a TCP connection on an fd of a traced process: its 4-tuple.
pub const KIND_CONN: u32 = 200;
/// Bytes read from or written to a TCP socket of a traced process.
pub const KIND_DATA: u32 = 201;
/// A traced process closed a TCP socket fd.
pub const KIND_CLOSE: u32 = 202;

// 3xx: trace-context propagation (ebpf-probes/src/inject.rs).
/// A `KIND_DATA` record whose payload starts an HTTP request a traced server thread read: a
/// [`CtxTrailer`] with the ids the kernel decided for that request follows the payload. One
/// record instead of a data record and a context record: a ring-buffer reservation per request
/// less in the traced thread, a record less to decode in the agent.
pub const KIND_DATA_CTX: u32 = 300;
/// The sk_msg program inserted a `traceparent` header into an outgoing request.
pub const KIND_INJECT: u32 = 301;

// ---------------------------------------------------------------------------------------------
// Drop / loss counters: index into the per-CPU `LOST` array.
// ---------------------------------------------------------------------------------------------

/// A record could not be reserved in the ring buffer (it was full).
pub const LOST_RINGBUF_FULL: u32 = 0;
/// Payload bytes were not captured because they were beyond the capture window (counted in records).
pub const LOST_PAYLOAD_TRUNCATED: u32 = 1;
/// A syscall could not be followed: the connect() entry→exit stash was full, or the data
/// program's hand-over to its second half (tail call) failed.
pub const LOST_STASH_FULL: u32 = 2;
/// Reading the payload from user memory failed.
pub const LOST_READ_USER: u32 = 3;
/// Number of counters.
pub const LOST_COUNTERS: u32 = 4;

// ---------------------------------------------------------------------------------------------
// Header injection outcomes: index into the per-CPU `INJECT_STATS` array (one count per message
// the sk_msg program saw, or per socket for the `SOCK_*` entries).
// ---------------------------------------------------------------------------------------------

/// A `traceparent` header was inserted.
pub const INJ_INJECTED: u32 = 0;
/// The sending process is not traced (a socket selected by destination that is not ours).
pub const INJ_NOT_TARGET: u32 = 1;
/// The message does not start with `METHOD SP / … HTTP/1.x CRLF` (body, TLS, other protocol).
pub const INJ_NOT_HTTP: u32 = 2;
/// The request already carries a `traceparent`.
pub const INJ_HAS_TRACEPARENT: u32 = 3;
/// The connection's previous request has not been answered yet (body or pipelined request).
pub const INJ_NOT_AT_BOUNDARY: u32 = 4;
/// The request head does not end within the scan window (it might carry a traceparent later).
pub const INJ_HEAD_TOO_LONG: u32 = 5;
/// `bpf_msg_pull_data` / `bpf_msg_push_data` failed.
pub const INJ_HELPER_FAILED: u32 = 6;
/// The injection record could not be sent (ring buffer full): the header was not inserted.
pub const INJ_RINGBUF_FULL: u32 = 7;
/// sock_ops put a traced process's new outgoing connection into the socket hash.
pub const INJ_SOCK_ADDED: u32 = 8;
/// sock_ops could not add it (EBUSY: another sk_msg user owns the socket; or the map is full).
pub const INJ_SOCK_ADD_FAILED: u32 = 9;
/// A config rule turned injection off for the sending process (`TARGET_NO_INJECT`).
pub const INJ_DISABLED: u32 = 10;
/// Number of counters.
pub const INJ_COUNTERS: u32 = 11;

/// `TARGETS` value bits. Every traced process has `TARGET_TRACED`; children inherit the value.
pub const TARGET_TRACED: u32 = 1;
/// Never insert `traceparent` into this process's requests (a `services[].inject: false` rule).
pub const TARGET_NO_INJECT: u32 = 2;
/// OpenSSL probes are (being) attached in this process: its socket syscalls consult the TLS maps
/// (`SSL_ARGS`, `LAST_READ_FD`). Set by user space before the first probe attaches; processes
/// without it skip those lookups on every data syscall.
pub const TARGET_TLS: u32 = 4;
/// Bytes per `TARGET_BYTES` entry: tgid `t` is byte `t % TARGET_CHUNK` of entry `t / TARGET_CHUNK`.
/// One page, so user space can map the array and write single bytes.
pub const TARGET_CHUNK: u32 = 4096;
/// `TARGET_BYTES` never has more entries than this (`PID_MAX_LIMIT`, 4 194 304 tgids, 4 MiB).
pub const TARGET_CHUNKS_MAX: u32 = 1024;

/// Bytes of a request head the kernel scans (for the request line end, the head end and an
/// existing `traceparent`). A power of two.
pub const HEAD_SCAN: usize = 256;
/// Length of the inserted `traceparent: 00-<32>-<16>-<2>\r\n` line.
pub const TRACEPARENT_LINE: u32 = 70;

/// `CtxTrailer::flags` / `InjectEvent::flags`: the trace id came from the request's own header.
pub const CTX_FROM_HEADER: u32 = 1;
/// The trace is sampled (W3C flags bit 0).
pub const CTX_SAMPLED: u32 = 2;
/// `InjectEvent`: the context had a parent (the server span the thread was serving).
pub const CTX_HAS_PARENT: u32 = 4;

// ---------------------------------------------------------------------------------------------
// Sizes and limits.
// ---------------------------------------------------------------------------------------------

/// Largest payload prefix one data record can carry (a power of two). The per-CPU scratch
/// record is 2·MAX_CAPTURE + header, and per-CPU map values are limited to 32 KiB.
pub const MAX_CAPTURE: usize = 8192;
/// Default payload prefix captured per syscall (user space may lower or raise it up to MAX_CAPTURE).
pub const DEFAULT_CAPTURE: u32 = 4096;
/// How many iovec elements of readv/writev/recvmsg/sendmsg are copied.
pub const MAX_IOVECS: u32 = 8;

/// Direction of a data record, from the traced process's point of view.
pub const DIR_READ: u32 = 0;
/// Bytes written by the traced process.
pub const DIR_WRITE: u32 = 1;

/// The connection's role was not seen (it existed before Waybill attached).
pub const ROLE_UNKNOWN: u32 = 0;
/// The fd came from accept(): the traced process is the server.
pub const ROLE_SERVER: u32 = 1;
/// The fd was connect()ed: the traced process is the client.
pub const ROLE_CLIENT: u32 = 2;

/// Which syscall produced a data record (for diagnostics and the no-payload sendfile case).
pub const SYS_READ: u32 = 0;
pub const SYS_WRITE: u32 = 1;
pub const SYS_READV: u32 = 2;
pub const SYS_WRITEV: u32 = 3;
pub const SYS_RECVFROM: u32 = 4;
pub const SYS_SENDTO: u32 = 5;
pub const SYS_RECVMSG: u32 = 6;
pub const SYS_SENDMSG: u32 = 7;
pub const SYS_SENDFILE: u32 = 8;
/// `SYSCALL_KIND` codes of the connection syscalls the exit program also follows (no data).
pub const SYS_ACCEPT: u32 = 10;
pub const SYS_CONNECT: u32 = 11;
/// `SYSCALL_KIND` codes of close() (a traced connection ends) and listen() (`--port` selection).
pub const SYS_CLOSE: u32 = 12;
pub const SYS_LISTEN: u32 = 13;

/// Plaintext read through a TLS library (`SSL_read`/`SSL_read_ex` uretprobe): user space treats the
/// connection as TLS and ignores any ciphertext record of the same fd.
pub const SYS_SSL_READ: u32 = 16;
/// Plaintext written through a TLS library (`SSL_write`/`SSL_write_ex`).
pub const SYS_SSL_WRITE: u32 = 17;
/// Plaintext returned by Go's `crypto/tls.(*Conn).Read`.
pub const SYS_GO_TLS_READ: u32 = 18;
/// Plaintext passed to Go's `crypto/tls.(*Conn).Write`.
pub const SYS_GO_TLS_WRITE: u32 = 19;

/// Is this data record plaintext from a TLS library (uprobes) rather than a socket syscall?
#[inline(always)]
pub const fn is_tls_syscall(s: u32) -> bool {
    s >= SYS_SSL_READ && s <= SYS_GO_TLS_WRITE
}

/// `SockInfo::is_tcp` value of a TCP socket that carries TLS: its ciphertext is not shipped (the
/// plaintext comes from the TLS uprobes).
pub const SOCK_TLS: u32 = 2;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

// ---------------------------------------------------------------------------------------------
// Records.
// ---------------------------------------------------------------------------------------------

/// Common head of every ring-buffer record. `kind` must stay the first field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    pub kind: u32,
    /// Thread-group id (what user space calls the PID).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event happened.
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 24);

/// A TCP connection's addresses. IPv4 addresses use the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub family: u16,
    /// Local port, host byte order.
    pub lport: u16,
    /// Remote port, host byte order.
    pub rport: u16,
    pub _pad: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
}
const _: () = assert!(size_of::<Tuple>() == 40);

/// `KIND_CONN`: the tuple of a socket fd, sent once per (tgid, fd) until it is closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnEvent {
    pub hdr: EventHeader,
    pub fd: u32,
    /// One of `ROLE_*`.
    pub role: u32,
    /// Kernel `struct sock *`, an identity for the connection while it lives.
    pub sk: u64,
    pub tuple: Tuple,
}
const _: () = assert!(size_of::<ConnEvent>() == 80);

/// `KIND_DATA` head; `captured` payload bytes follow it in the same record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataHeader {
    pub hdr: EventHeader,
    pub fd: u32,
    /// `DIR_READ` or `DIR_WRITE`.
    pub dir: u32,
    /// Bytes the syscall really transferred (its return value).
    pub total: u64,
    /// Payload bytes that follow this header (≤ total, ≤ the capture window).
    pub captured: u32,
    /// One of `SYS_*`.
    pub syscall: u32,
    pub sk: u64,
}
const _: () = assert!(size_of::<DataHeader>() == 56);

/// Scratch layout used by the kernel side to build a data record before output.
#[repr(C)]
pub struct DataEvent {
    pub head: DataHeader,
    /// Twice the window so that bounded copies at any offset < MAX_CAPTURE stay in bounds.
    pub data: [u8; 2 * MAX_CAPTURE],
}

/// `KIND_CLOSE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloseEvent {
    pub hdr: EventHeader,
    pub fd: u32,
    pub _pad: u32,
    pub sk: u64,
}
const _: () = assert!(size_of::<CloseEvent>() == 40);

/// Follows the payload of a `KIND_DATA_CTX` record (at `size_of::<DataHeader>() + captured`): the
/// ids of the server request that payload starts, decided in the kernel when the thread read it
/// (the request's own `traceparent` or random ones), so user space gives that request exactly
/// these ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtxTrailer {
    /// `CTX_*` bits.
    pub flags: u32,
    pub _pad: u32,
    pub trace_id: [u8; 16],
    /// The SERVER span's id.
    pub span_id: [u8; 8],
    /// The remote parent from the request's header (zero when generated).
    pub parent_span_id: [u8; 8],
}
const _: () = assert!(size_of::<CtxTrailer>() == 40);

/// Offset of a `KIND_DATA_CTX` record's [`CtxTrailer`] from the end of its `DataHeader`: the
/// payload rounded up to 8 bytes, so the trailer is aligned in the ring buffer.
#[inline(always)]
pub const fn ctx_trailer_offset(captured: u32) -> u32 {
    (captured + 7) & !7
}

/// `KIND_INJECT`: what the sk_msg program inserted (sent from the sender's own send call, before
/// the `KIND_DATA` record of the same write).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InjectEvent {
    pub hdr: EventHeader,
    /// The connection as sk_msg saw it (ports in host byte order).
    pub tuple: Tuple,
    /// `CTX_*` bits.
    pub flags: u32,
    /// Message size before insertion.
    pub size: u32,
    pub trace_id: [u8; 16],
    /// The CLIENT span's id (the `parent-id` the downstream received).
    pub span_id: [u8; 8],
    /// The SERVER span the sending thread was serving (zero without `CTX_HAS_PARENT`).
    pub parent_span_id: [u8; 8],
}
const _: () = assert!(size_of::<InjectEvent>() == 104);

/// Key of a pending `connect()` by a traced process: its destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectKey {
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    pub _pad: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<ConnectKey>() == 24);

/// `KIND_PROC_EXEC`, `KIND_PROC_FORK`, `KIND_PROC_EXIT`, `KIND_PORT_MATCH`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcEvent {
    pub hdr: EventHeader,
    /// For fork: the parent tgid. For a port match: the port.
    pub other: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<ProcEvent>() == 48);

// ---------------------------------------------------------------------------------------------
// Configuration handed to the programs before load (`EbpfLoader::override_global`).
// ---------------------------------------------------------------------------------------------

/// Kernel struct member offsets, read by user space from /sys/kernel/btf/vmlinux.
/// Nothing about kernel struct layout is compiled into the eBPF object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_f_inode: u32,
    pub file_private_data: u32,
    pub inode_i_mode: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    /// 0 when the kernel has no IPv6: AF_INET6 sockets are then skipped.
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// 1 once filled in by user space.
    pub valid: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 68);

/// Where the syscall number and arguments sit in `struct pt_regs` on this architecture, read by
/// user space from BTF. The data-syscall program runs at `raw_tracepoint/sys_exit` only and reads
/// the arguments there: the saved user registers still hold them when the syscall returns
/// (x86_64 `di`/`si`/`dx`, arm64 `orig_x0`/`regs[1]`/`regs[2]`; only the return-value register
/// is overwritten), so no entry program and no per-thread stash is needed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallRegs {
    /// Syscall number (x86_64 `orig_ax`, arm64 `syscallno`).
    pub nr: u32,
    /// 0xffff_ffff when the number is 32 bits wide (arm64 `s32 syscallno`), else 0 (64 bits).
    pub nr_is_u32: u32,
    /// First three arguments.
    pub arg: [u32; 3],
    /// A task running 32-bit code makes compat syscalls with other numbers: skipped when
    /// `(reg at compat_off) & compat_mask == compat_value` (x86_64 `cs == __USER32_CS`, arm64
    /// `pstate & PSR_MODE32_BIT`). `compat_mask` 0: no check.
    pub compat_off: u32,
    pub compat_mask: u32,
    pub compat_value: u32,
    /// 1 once filled in by user space.
    pub valid: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SyscallRegs>() == 40);

/// Entries of `SYSCALL_KIND` (syscall numbers below this are looked up; both ABIs' socket
/// syscalls are far below it).
pub const SYSCALL_TABLE: u32 = 512;

/// Offsets of tracepoint fields that are not part of the fixed syscall layout, read from
/// tracefs `format` files at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// task/task_newtask: `pid` of the new task.
    pub newtask_pid: u32,
    /// task/task_newtask: `clone_flags`.
    pub newtask_clone_flags: u32,
    /// Size in bytes of `clone_flags` (4 or 8; it became u64 in 6.x).
    pub newtask_clone_flags_size: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TracepointOffsets>() == 16);

/// Run-time settings for the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Payload bytes captured per syscall, ≤ MAX_CAPTURE.
    pub capture_bytes: u32,
    /// 1: send `KIND_PROC_EXEC` for every exec on the host (needed for `--exe`).
    pub watch_exec: u32,
    /// 1: the `WATCH_PORTS` map is in use (needed for `--port`).
    pub watch_ports: u32,
    /// 1: decide trace ids in the kernel and inject `traceparent` (sock_ops + sk_msg).
    pub inject: u32,
}
const _: () = assert!(size_of::<ProbeConfig>() == 16);

impl Default for ProbeConfig {
    fn default() -> Self {
        Self { capture_bytes: DEFAULT_CAPTURE, watch_exec: 0, watch_ports: 0, inject: 0 }
    }
}

/// Value of the per-(tgid, fd) socket cache in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockInfo {
    pub sk: u64,
    /// 1 for a TCP socket, 0 for "not a TCP socket" (negative entries are cached too).
    pub is_tcp: u32,
    pub role: u32,
    /// On a server connection: the pid_tgid of the thread whose `THREAD_CTX` holds the request
    /// open on it, so a response written by another thread still ends it; 0 once the response
    /// head is written. Kept here, not in a map of its own: the request read has just looked
    /// this entry up, so setting it touches no other cache line.
    pub owner: u64,
}
const _: () = assert!(size_of::<SockInfo>() == 24);

/// Bytes a ring-buffer record of `size` bytes takes in the buffer: the kernel's 8-byte record
/// header, rounded up to 8.
#[inline(always)]
pub const fn ringbuf_footprint(size: u64) -> u64 {
    (size + 8 + 7) & !7
}

/// The kernel side wakes the agent each time the waiting data crosses another
/// `1 / RING_WAKE_STEPS` of the ring buffer (the *wake step*, [`ring_wake_step`]); the agent's CPU
/// policy and watchdog judge the level in the same steps (agent/src/sched.rs). An eighth: with
/// a sixteenth (512 KiB of the default 8 MiB buffer), nginx at 3000 requests/s woke the agent
/// every ~170 ms, before its 250 ms drain timer, and the agent's CPU per request was 12 % higher
/// (3.67 against 3.28 µs, 3 alternated rounds; docs/performance.md).
pub const RING_WAKE_STEPS: u64 = 8;

/// The wake step of a ring buffer of `ring_size` bytes (see [`RING_WAKE_STEPS`]).
#[inline(always)]
pub const fn ring_wake_step(ring_size: u64) -> u64 {
    ring_size / RING_WAKE_STEPS
}

/// Whether a record of `size` bytes, written with `waiting` bytes already in a ring buffer of
/// `ring_size` bytes, must wake the agent: when its footprint carries the waiting data across a
/// multiple of the wake step (at most [`RING_WAKE_STEPS`] wake-ups per buffer's worth of
/// records), and for every record once half the buffer waits (the agent is behind). See
/// ebpf-probes/src/events.rs.
#[inline(always)]
pub fn ringbuf_wake_due(waiting: u64, size: u64, ring_size: u64) -> bool {
    let step = ring_wake_step(ring_size);
    step != 0 && (waiting / step != (waiting + ringbuf_footprint(size)) / step || waiting >= ring_size / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of one size written into an empty buffer that nobody drains: how many of those
    /// that start below half the buffer wake the agent (each wake step up to half is crossed by
    /// exactly one of them).
    fn wakes_below_half(size: u64, ring: u64) -> u64 {
        let (mut waiting, mut wakes) = (0, 0);
        while waiting < ring / 2 {
            wakes += u64::from(ringbuf_wake_due(waiting, size, ring));
            waiting += ringbuf_footprint(size);
        }
        wakes
    }

    #[test]
    fn every_wake_step_wakes_once_whatever_the_record_size() {
        let ring = 8 << 20;
        // 120 B is a 64 B payload record: a 128 B footprint that divides a step exactly, so
        // every boundary falls on a record header (the case that never woke the agent when the
        // crossing was judged on `size` alone).
        for size in [1, 8, 56, 100, 120, 128, 777, 4096, 8192 + 56] {
            assert_eq!(wakes_below_half(size, ring), RING_WAKE_STEPS / 2, "record size {size}");
        }
    }

    #[test]
    fn behind_by_half_every_record_wakes() {
        let ring = 8 << 20;
        assert!(ringbuf_wake_due(ring / 2, 120, ring));
        assert!(ringbuf_wake_due(ring - 200, 120, ring));
        assert!(!ringbuf_wake_due(ring / 2 - 1000, 120, ring));
        assert!(!ringbuf_wake_due(0, 120, 0), "no ring size known: never");
    }

    #[test]
    fn footprint_has_header_and_alignment() {
        assert_eq!(ringbuf_footprint(0), 8);
        assert_eq!(ringbuf_footprint(1), 16);
        assert_eq!(ringbuf_footprint(120), 128);
        assert_eq!(ringbuf_footprint(121), 136);
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and have no
    // implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for TracepointOffsets {}
    unsafe impl aya::Pod for SyscallRegs {}
    unsafe impl aya::Pod for ProbeConfig {}
    unsafe impl aya::Pod for SockInfo {}
    unsafe impl aya::Pod for Tuple {}
    unsafe impl aya::Pod for ConnectKey {}
}
