//! Application-protocol parsers: bytes in, messages out. No I/O, no unsafe code.
//!
//! Each parser is fed the byte stream of one TCP connection, one syscall's worth at a time, in
//! the direction the bytes travelled ([`FlowDir`]). A chunk may be only a *prefix* of what the
//! syscall transferred (the kernel copies a bounded window): `total` says how many bytes really
//! went by, so parsers can keep message boundaries even when a body was not captured.
#![forbid(unsafe_code)]

pub mod db;
pub mod http1;
pub mod postgres;
pub mod redact;
pub mod redis;
pub mod sql;

/// Which way bytes travelled on a connection, independent of which end Waybill watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowDir {
    /// Client → server (requests).
    ToServer,
    /// Server → client (responses).
    ToClient,
}

/// One syscall's worth of bytes on a connection.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    pub dir: FlowDir,
    /// Captured bytes (a prefix of what was transferred).
    pub data: &'a [u8],
    /// Bytes the syscall really transferred (`total >= data.len()`).
    pub total: usize,
    /// When the syscall completed, CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}

impl Chunk<'_> {
    /// True when bytes of this syscall were not captured.
    pub fn truncated(&self) -> bool {
        self.total > self.data.len()
    }
}
