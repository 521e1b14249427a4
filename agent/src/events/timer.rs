//! A one-shot timer on a Linux `timerfd`, awaited through tokio's reactor.
//!
//! The event loop's drain timer and its housekeeping tick use this instead of `tokio::time`:
//! tokio's timer wheel keeps a timer that is due 64 ms to 4 s ahead in a 64 ms slot and wakes the
//! runtime thread at the start of that slot to move it down a level, then again when it is due.
//! A 100 ms drain timer re-armed after every drain so cost two thread wake-ups instead of one
//! (seen with strace: an `epoll_wait` that times out ~35 ms before each drain), and a wake-up of
//! the agent's thread is the dearest thing it does on a VM. A `timerfd` wakes the thread once,
//! when it is due.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

pub struct Wakeup {
    fd: AsyncFd<OwnedFd>,
    /// The deadline the timer is armed for (None: disarmed).
    armed: Option<Instant>,
}

impl Wakeup {
    /// A timer not yet armed. Must be called inside a tokio runtime.
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: timerfd_create takes a clock id and flags; the result is checked.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd lives inside the AsyncFd, so it stays open while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Wakeup { fd, armed: None })
    }

    /// Arms the timer for `at` (a deadline already past fires at once), replacing any earlier
    /// deadline. Costs a system call only when the deadline changes.
    pub fn arm_at(&mut self, at: Instant) -> io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        // A zero `it_value` would disarm the timer: at least 1 ns.
        let d = at.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1));
        self.set(d)?;
        self.armed = Some(at);
        Ok(())
    }

    fn set(&self, d: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long },
        };
        // SAFETY: a relative one-shot setting for our own timerfd; the old value is not wanted.
        let r = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Resolves when the armed deadline has passed (then it waits until armed again). Cancel-safe: a
    /// `select!` may drop it at any point and call it again.
    pub async fn fired(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut count = [0u8; 8];
            // SAFETY: reads the 8-byte expiration count into a buffer of that size.
            let n = unsafe { libc::read(guard.get_inner().as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
            if n == 8 {
                self.armed = None;
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            // Not expired (re-armed since the readiness was seen): wait for the next edge.
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_once_at_its_latest_deadline() {
        let mut w = Wakeup::new().unwrap();
        let t0 = Instant::now();
        w.arm_at(t0 + Duration::from_millis(30)).unwrap();
        w.fired().await.unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(30), "fired early: {took:?}");
        // Disarmed after firing: nothing within 50 ms.
        assert!(tokio::time::timeout(Duration::from_millis(50), w.fired()).await.is_err());
        // Re-armed later than before: the later deadline counts.
        let t1 = Instant::now();
        w.arm_at(t1 + Duration::from_millis(10)).unwrap();
        w.arm_at(t1 + Duration::from_millis(40)).unwrap();
        w.fired().await.unwrap();
        assert!(t1.elapsed() >= Duration::from_millis(40));
        // A deadline already past fires at once.
        w.arm_at(Instant::now() - Duration::from_millis(5)).unwrap();
        tokio::time::timeout(Duration::from_millis(500), w.fired()).await.expect("a past deadline fires").unwrap();
    }
}
