//! The traced-process set as the kernel reads it on every syscall.
//!
//! `TARGETS` (tgid → `TARGET_*` bits, a hash map) is the set; `TARGET_BYTES` holds the same bits
//! one byte per tgid, so the first check of every eBPF program is an array load instead of a hash
//! lookup. Kernel programs write single bytes (fork, exec, `--port`, exit); user space writes
//! single bytes through a shared mapping of the array, so neither side overwrites the other's
//! bytes. Rules both sides keep: set `TARGETS` first and the byte after it; clear the byte first
//! and `TARGETS` after it. User space also re-reads `TARGETS` after writing a byte, so a process
//! that exited in between (the kernel removed it) does not keep a stale byte.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU8, Ordering},
};

use aya::maps::MapData;
use waybill_common::{TARGET_CHUNK, TARGET_CHUNKS_MAX, TARGET_TRACED};

/// Entries of `TARGET_BYTES` for this host: enough for every tgid below `pid_max`. A host whose
/// `pid_max` cannot be read gets the largest array (4 MiB), which covers every possible tgid.
pub fn chunks_for_host() -> u32 {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse::<u32>().ok());
    chunks(pid_max.unwrap_or(TARGET_CHUNK * TARGET_CHUNKS_MAX))
}

/// Entries needed for tgids `0..pid_max` (at least 1, at most `TARGET_CHUNKS_MAX`).
pub fn chunks(pid_max: u32) -> u32 {
    pid_max.div_ceil(TARGET_CHUNK).clamp(1, TARGET_CHUNKS_MAX)
}

/// User space's writable view of `TARGET_BYTES`.
pub struct TargetBytes {
    base: NonNull<u8>,
    len: usize,
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory, written only through atomic byte stores.
unsafe impl Send for TargetBytes {}
// SAFETY: as above.
unsafe impl Sync for TargetBytes {}

impl TargetBytes {
    /// Maps the array (created with `BPF_F_MMAPABLE` and `chunks` entries).
    pub fn map(map: MapData, chunks: u32) -> std::io::Result<Self> {
        let len = chunks as usize * TARGET_CHUNK as usize;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a new shared mapping of the map's values; the kernel checks the length against
        // the map's size. Unmapped in Drop.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(Self { base, len, _map: map })
    }

    fn byte(&self, pid: u32) -> Option<&AtomicU8> {
        let i = pid as usize;
        // SAFETY: in bounds of the live mapping; all accesses to it are atomic.
        (i < self.len).then(|| unsafe { AtomicU8::from_ptr(self.base.as_ptr().add(i)) })
    }

    /// Writes `pid`'s byte: its `TARGET_*` bits, or 0 (not traced). A pid beyond the array is
    /// left to `TARGETS` alone (the kernel falls back to it).
    pub fn set(&self, pid: u32, flags: Option<u32>) {
        if let Some(b) = self.byte(pid) {
            b.store(flags.map_or(0, |f| (f | TARGET_TRACED) as u8), Ordering::Release);
        }
    }

    /// `pid`'s byte (None beyond the array).
    #[cfg(test)]
    pub fn get(&self, pid: u32) -> Option<u8> {
        self.byte(pid).map(|b| b.load(Ordering::Acquire))
    }
}

impl Drop for TargetBytes {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer referenced.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_pid_max() {
        assert_eq!(chunks(32768), 8);
        assert_eq!(chunks(32769), 9);
        assert_eq!(chunks(4_194_304), 1024);
        assert_eq!(chunks(0), 1);
        assert_eq!(chunks(u32::MAX), TARGET_CHUNKS_MAX);
    }
}
