//! How the agent shares the CPU with the applications it traces.
//!
//! Two modes, applied to every thread of the agent:
//!
//! - **yield** (`SCHED_IDLE`): the agent runs only on CPU time no application thread wants, and
//!   any application thread that wakes takes the CPU from it at once; one that was already
//!   waiting gets it at the event loop's next [`courtesy`] yield (every [`COURTESY_EVERY`] of
//!   a long stretch of work). This is what keeps the applications' tail latency flat at
//!   ordinary load (measured: docs/performance.md). The kernel applies the policy inside the
//!   thread's scheduling group (its cgroup with the `cpu` controller, else its session's
//!   autogroup); against other groups the agent's group competes by weight
//!   (docs/configuration.md, "Where idle priority reaches").
//! - **compete** (`SCHED_BATCH`, 0.1 ms slice where the kernel honours `sched_runtime`): the agent
//!   gets a fair share but never preempts an application thread on wake-up, and an application
//!   thread waits at most one short slice. Needed when the applications keep every CPU busy:
//!   under `SCHED_IDLE` the agent would then fall behind and lose records.
//!
//! `--cpu-policy adaptive` (the default) yields while the agent keeps up and competes while it
//! falls behind: when one drain finds two wake steps of the ring buffer waiting (a quarter: the
//! kernel wakes the agent at each step, an eighth, `waybill_common::RING_WAKE_STEPS`, so the
//! agent did not get the CPU in time), when records or spans are lost, when the span queue is a
//! quarter full, or — seen by a [`Watchdog`] thread that always competes — when a step of the
//! buffer still waits [`STARVED`] after the kernel's wake-up (the event loop is starved, or too
//! slow, and cannot notice itself). It yields again after [`CALM`] in which no drain found even
//! a step waiting.
//!
//! The watchdog costs nothing at ordinary load: it sleeps in `epoll_wait` on the ring buffer,
//! edge-triggered, so only the kernel's wake-ups make it run (records are submitted without one,
//! except the record that carries the waiting data across another step of the buffer,
//! ebpf-probes/src/events.rs), and it sleeps on a timer while the agent competes.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use waybill_common::ring_wake_step;

/// How long the agent must keep up, with little waiting at each drain, before it yields again.
pub const CALM: Duration = Duration::from_secs(5);

/// After the kernel woke the agent because a wake step of the ring buffer waits, the event
/// loop, yielding, must have drained it below that within this time or it is starved.
pub const STARVED: Duration = Duration::from_millis(10);

/// A yielding event loop that has not drained for this long is starved even without a wake-up
/// (a ring buffer too small or records too few to reach a wake step).
pub const STALLED: Duration = Duration::from_millis(300);

/// `--cpu-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuPolicy {
    /// Yield while keeping up, compete while falling behind.
    Adaptive,
    /// Always compete (`SCHED_BATCH`, short slice).
    Batch,
    /// Always yield (`SCHED_IDLE`): records are lost when the applications keep every CPU busy.
    Idle,
}

/// The scheduling mode in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Yield,
    Compete,
}

fn attr(mode: Mode) -> libc::sched_attr {
    let (policy, runtime) = match mode {
        Mode::Yield => (libc::SCHED_IDLE, 0),
        Mode::Compete => (libc::SCHED_BATCH, 100_000),
    };
    libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: policy as u32,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: runtime,
        sched_deadline: 0,
        sched_period: 0,
    }
}

/// Applies `mode` to thread `tid` (0: the calling thread). Kernels before 6.12 ignore the slice;
/// kernels that refuse `sched_setattr` get the policy through `sched_setscheduler`.
fn apply_to(tid: libc::pid_t, mode: Mode) -> bool {
    let a = attr(mode);
    // SAFETY: sched_setattr(tid, attr, 0); `a` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &a as *const libc::sched_attr, 0) };
    if r == 0 {
        return true;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall with a valid parameter struct.
    unsafe { libc::sched_setscheduler(tid, a.sched_policy as i32, &param) == 0 }
}

/// Applies `mode` to the calling thread (threads it starts later inherit it).
pub fn apply_current(mode: Mode) {
    apply_to(0, mode);
}

/// Thread id of the [`Watchdog`] (0: none): it keeps competing whatever the mode.
static WATCHDOG_TID: AtomicI32 = AtomicI32::new(0);

/// True while [`apply_all`] last put the agent's threads under `SCHED_IDLE`: [`courtesy`] reads
/// it, and the [`Watchdog`] watches only then.
static YIELDING: AtomicBool = AtomicBool::new(false);

/// Applies `mode` to every thread of the agent but the watchdog. Returns how many took it.
/// The flag changes last, once the threads have the mode: whoever reads it (the event loop asking
/// whether the watchdog rescued it) sees a finished switch.
pub fn apply_all(mode: Mode) -> usize {
    let applied = match std::fs::read_dir("/proc/self/task") {
        Ok(dir) => {
            let skip = WATCHDOG_TID.load(Relaxed);
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
                .filter(|&tid| tid != skip && apply_to(tid, mode))
                .count()
        }
        Err(_) => usize::from(apply_to(0, mode)),
    };
    YIELDING.store(mode == Mode::Yield, Relaxed);
    applied
}

/// Whether this process may leave `SCHED_IDLE` again (root, or `CAP_SYS_NICE`, or an
/// `RLIMIT_NICE` that allows nice 0): tried on a short-lived thread. Without it, adaptive mode
/// must not yield, or it could never compete again.
pub fn can_return_from_yield() -> bool {
    std::thread::spawn(|| apply_to(0, Mode::Yield) && apply_to(0, Mode::Compete)).join().unwrap_or(false)
}

/// While the agent yields, the longest stretch of work the event loop does without giving the
/// CPU back (see [`courtesy`]).
pub const COURTESY_EVERY: Duration = Duration::from_micros(100);

/// Gives the CPU back every [`COURTESY_EVERY`] of a long stretch of work while the agent yields:
/// the event loop calls this once per unit of work (a record drained, a span measured or
/// encoded), and [`courtesy_restart`] when its thread has just got the CPU.
///
/// `SCHED_IDLE` makes an application thread that *wakes* take the CPU at once, but not one that
/// is already runnable. On EEVDF kernels (6.6 and later) the scheduler may pick the idle-priority
/// agent while an application thread waits on the same CPU (one that had run ahead of its fair
/// share, or was preempted by another waking thread), and then nothing takes the CPU back until
/// the agent blocks or the next scheduler tick: up to 4 ms at `HZ=250` on a kernel without
/// forced preemption. Traced on this project's test VM (kernel 6.18, `perf sched`): nginx
/// runnable for 2 ms behind the agent's drain, the cause of a p99.9 at 3000 requests/s five
/// times that without the agent (docs/performance.md). A `sched_yield` ends such a stretch: by
/// then the agent's virtual time, which runs ~340 times faster than a normal thread's at its
/// weight, is far ahead, so the waiting thread is picked; with nothing else runnable the call
/// returns at once (~0.3 µs). The clock is read every [`COURTESY_CHECK_EVERY`] calls only.
/// Returns true when it gave the CPU back.
#[inline]
pub fn courtesy() -> bool {
    STRETCH.with(|s| {
        let (since, steps) = s.get();
        let steps = steps.wrapping_add(1);
        s.set((since, steps));
        if !steps.is_multiple_of(COURTESY_CHECK_EVERY) || !YIELDING.load(Relaxed) {
            return false;
        }
        if since.elapsed() < COURTESY_EVERY {
            return false;
        }
        // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
        unsafe { libc::sched_yield() };
        s.set((Instant::now(), steps));
        COURTESY_YIELDS.fetch_add(1, Relaxed);
        true
    })
}

/// The calling thread has just got the CPU (a wake-up): its stretch of work starts now.
pub fn courtesy_restart() {
    STRETCH.with(|s| s.set((Instant::now(), s.get().1)));
}

/// How many times [`courtesy`] gave the CPU back, in every thread.
pub fn courtesy_yields() -> u64 {
    COURTESY_YIELDS.load(Relaxed)
}

/// [`courtesy`] reads the clock only every this many calls.
const COURTESY_CHECK_EVERY: u32 = 16;

static COURTESY_YIELDS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The calling thread's stretch of work: when it started, and [`courtesy`] calls so far.
    static STRETCH: std::cell::Cell<(Instant, u32)> = std::cell::Cell::new((Instant::now(), 0));
}

/// State shared by the event loop and its [`Watchdog`].
#[derive(Debug, Default)]
pub struct Shared {
    /// Milliseconds since `epoch` at the last drain.
    last_drain_ms: AtomicU64,
    /// True while the event loop sleeps with the ring buffer empty and no drain timer (the
    /// kernel side wakes it with the next record; it drains on its 1 s tick as well).
    asleep: AtomicBool,
    /// Switches to competing made by the watchdog.
    pub rescues: AtomicU64,
}

/// How long the watchdog waits for a ring-buffer wake-up before it looks at the drains: the
/// stall test needs no finer grain than [`STALLED`] plus the loop's own drain period.
fn patience(asleep: bool) -> Duration {
    use crate::events::pump::{DRAIN_EVERY, IDLE_TICK};
    STALLED + if asleep { IDLE_TICK } else { DRAIN_EVERY }
}

/// A thread that stays in competing mode and makes the whole agent compete when the event loop,
/// yielding, is starved: a wake step of the ring buffer still waits [`STARVED`] after a
/// ring-buffer wake-up (read from the buffer's mapped position pages; where those cannot be
/// mapped, no drain at all since the wake-up), or records wait and it has not drained for
/// [`STALLED`] past its own drain period. While the agent competes the thread is parked (the
/// event loop unparks it when it yields again), so it costs no wake-ups then; while the agent
/// yields it wakes for the kernel's ring-buffer wake-ups and every [`patience`]. Ends with the
/// process.
pub struct Watchdog {
    shared: Arc<Shared>,
    epoch: Instant,
    thread: Option<std::thread::Thread>,
}

impl Watchdog {
    /// `ring` is a duplicate of the ring buffer's map fd (the watchdog polls it and maps its
    /// position pages), `ring_bytes` the buffer's size.
    pub fn spawn(ring: OwnedFd, ring_bytes: u64) -> Watchdog {
        let shared = Arc::new(Shared::default());
        let epoch = Instant::now();
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name("waybill-cpu".into()).spawn(move || {
            // SAFETY: gettid has no arguments and cannot fail.
            WATCHDOG_TID.store(unsafe { libc::gettid() }, Relaxed);
            apply_to(0, Mode::Compete);
            let waiter = RingWaiter::new(&ring);
            let level = RingLevel::map(&ring);
            let now_ms = || epoch.elapsed().as_millis() as u64;
            loop {
                if !YIELDING.load(Relaxed) {
                    // `set_mode(Yield)` unparks; the timeout only bounds a missed unpark.
                    std::thread::park_timeout(Duration::from_secs(5));
                    continue;
                }
                let asleep = s.asleep.load(Relaxed);
                let woken = match &waiter {
                    Some(w) => w.wait(patience(asleep)),
                    None => {
                        std::thread::sleep(Duration::from_millis(20));
                        false
                    }
                };
                let starved = if woken {
                    let at = now_ms();
                    std::thread::sleep(STARVED);
                    match &level {
                        // Still a step waiting: the event loop was not scheduled in time, or
                        // a drain it got a slice for did not keep up (not just "no drain at all").
                        Some(l) => l.waiting() >= ring_wake_step(ring_bytes),
                        None => s.last_drain_ms.load(Relaxed) < at,
                    }
                } else {
                    // Nothing waiting: an idle loop, not a starved one.
                    let waiting = level.as_ref().is_none_or(|l| l.waiting() > 0);
                    let late = patience(s.asleep.load(Relaxed)).as_millis() as u64;
                    waiting && now_ms().saturating_sub(s.last_drain_ms.load(Relaxed)) >= late
                };
                if starved && YIELDING.load(Relaxed) {
                    // Counted first: `rescued()` is true once `apply_all` has finished.
                    s.rescues.fetch_add(1, Relaxed);
                    apply_all(Mode::Compete);
                }
            }
        });
        let thread = match spawned {
            Ok(h) => Some(h.thread().clone()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the CPU watchdog thread");
                None
            }
        };
        Watchdog { shared, epoch, thread }
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The event loop drained the ring buffer just now.
    pub fn drained(&self) {
        self.shared.last_drain_ms.store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// The event loop went to sleep (no drain timer) or woke up.
    pub fn set_asleep(&self, asleep: bool) {
        self.shared.asleep.store(asleep, Relaxed);
    }

    /// The event loop switched the agent's threads to `mode` ([`apply_all`]): the watchdog
    /// watches from now on while they yield, and parks while they compete.
    pub fn set_mode(&self, mode: Mode) {
        self.drained();
        if mode == Mode::Yield
            && let Some(t) = &self.thread
        {
            t.unpark();
        }
    }

    /// Whether the agent competes: read by an event loop that last switched it to yield, true
    /// means the watchdog has rescued it since.
    pub fn rescued(&self) -> bool {
        !YIELDING.load(Relaxed)
    }
}

/// The fill level of a BPF ring buffer, read from its position pages: the kernel maps the
/// consumer position at page 0 and the producer position at page 1 of the map fd (both mapped
/// read-only here; nothing is written).
struct RingLevel {
    consumer: *mut libc::c_void,
    producer: *mut libc::c_void,
    page: usize,
}

// SAFETY: the mappings are only read, with atomic loads, and live as long as the value.
unsafe impl Send for RingLevel {}

impl RingLevel {
    /// None when `fd` is not a ring buffer (a pipe in tests) or cannot be mapped.
    fn map(fd: &OwnedFd) -> Option<RingLevel> {
        // SAFETY: sysconf has no side effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map = |off: usize| {
            // SAFETY: a new shared read-only mapping of one page of an open fd; checked below.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), off as i64)
            };
            (p != libc::MAP_FAILED).then_some(p)
        };
        let consumer = map(0)?;
        let Some(producer) = map(page) else {
            // SAFETY: unmapping the page mapped just above.
            unsafe { libc::munmap(consumer, page) };
            return None;
        };
        Some(RingLevel { consumer, producer, page })
    }

    /// Bytes produced and not yet consumed.
    fn waiting(&self) -> u64 {
        // SAFETY: each page starts with the kernel's `unsigned long` position, 8-byte aligned,
        // updated with release stores; the mappings are valid while `self` lives.
        let (c, p) = unsafe {
            (
                (*(self.consumer as *const std::sync::atomic::AtomicU64)).load(std::sync::atomic::Ordering::Acquire),
                (*(self.producer as *const std::sync::atomic::AtomicU64)).load(std::sync::atomic::Ordering::Acquire),
            )
        };
        p.wrapping_sub(c)
    }
}

impl Drop for RingLevel {
    fn drop(&mut self) {
        // SAFETY: both pages were mapped by `map` and are not used after this.
        unsafe {
            libc::munmap(self.consumer, self.page);
            libc::munmap(self.producer, self.page);
        }
    }
}

/// An edge-triggered epoll instance on the ring buffer fd: `wait` returns true when the kernel
/// woke the buffer's readers.
struct RingWaiter {
    ep: OwnedFd,
}

impl RingWaiter {
    fn new(ring: &OwnedFd) -> Option<RingWaiter> {
        // SAFETY: epoll_create1 takes a flag; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return None;
        }
        // SAFETY: `ep` is a new fd that nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 0 };
        // SAFETY: both fds are open; `ev` is a valid event.
        let r = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut ev) };
        (r == 0).then_some(RingWaiter { ep })
    }

    fn wait(&self, timeout: Duration) -> bool {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one event slot, valid for the call.
        let n = unsafe { libc::epoll_wait(self.ep.as_raw_fd(), &mut ev, 1, timeout.as_millis() as i32) };
        n > 0
    }
}

/// What one drain of the ring buffer saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct DrainSignal {
    /// Bytes of records read in this drain.
    pub bytes: u64,
    /// Records or spans were lost since the previous drain, or the span queue is a quarter full.
    pub losing: bool,
}

/// Decides the mode for `--cpu-policy adaptive`; the fixed policies never change it.
#[derive(Debug)]
pub struct Governor {
    policy: CpuPolicy,
    mode: Mode,
    ring_bytes: u64,
    /// Last drain that found a wake step of the ring buffer or more waiting.
    last_busy: Instant,
    pub switches: u64,
}

impl Governor {
    /// The mode to start the event loop in: adaptive starts yielding. (Callers that cannot leave
    /// `SCHED_IDLE`, see [`can_return_from_yield`], pass `Batch` instead of `Adaptive`.)
    pub fn new(policy: CpuPolicy, ring_bytes: u32, now: Instant) -> Self {
        let mode = match policy {
            CpuPolicy::Batch => Mode::Compete,
            CpuPolicy::Adaptive | CpuPolicy::Idle => Mode::Yield,
        };
        Governor { policy, mode, ring_bytes: u64::from(ring_bytes), last_busy: now, switches: 0 }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// After a drain: the new mode if it must change now.
    pub fn after_drain(&mut self, s: DrainSignal, now: Instant) -> Option<Mode> {
        // Losing counts as busy too: an exporter that falls behind keeps the agent competing
        // even when each drain is small.
        let step = ring_wake_step(self.ring_bytes);
        if s.bytes >= step || s.losing {
            self.last_busy = now;
        }
        let behind = s.losing || s.bytes >= 2 * step;
        self.switch_to(match self.mode {
            Mode::Yield if behind => Mode::Compete,
            Mode::Compete if now.duration_since(self.last_busy) >= CALM => Mode::Yield,
            m => m,
        })
    }

    /// The watchdog made the agent compete (it was starved): follow, as if a drain had been busy.
    pub fn rescued(&mut self, now: Instant) {
        if self.mode == Mode::Yield {
            self.mode = Mode::Compete;
            self.last_busy = now;
            self.switches += 1;
        }
    }

    fn switch_to(&mut self, mode: Mode) -> Option<Mode> {
        if self.policy != CpuPolicy::Adaptive || mode == self.mode {
            return None;
        }
        self.mode = mode;
        self.switches += 1;
        Some(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: u32 = 8 << 20;

    fn drain(bytes: u64) -> DrainSignal {
        DrainSignal { bytes, losing: false }
    }

    #[test]
    fn adaptive_competes_when_behind_and_yields_after_calm() {
        let t0 = Instant::now();
        let mut g = Governor::new(CpuPolicy::Adaptive, RING, t0);
        assert_eq!(g.mode(), Mode::Yield);
        let step = ring_wake_step(u64::from(RING));
        // Keeping up: small drains change nothing, nor does one that found a step waiting (the
        // kernel's wake-up).
        assert_eq!(g.after_drain(drain(200_000), t0), None);
        assert_eq!(g.after_drain(drain(step), t0), None);
        // A drain that found two steps waiting: compete.
        assert_eq!(g.after_drain(drain(2 * step), t0), Some(Mode::Compete));
        // Still busy (a step at each wake-up): stays competing however long it lasts.
        let busy = step;
        for s in 1..20 {
            assert_eq!(g.after_drain(drain(busy), t0 + Duration::from_secs(s)), None);
        }
        // Load falls: yields once CALM has passed since the last busy drain.
        let last = t0 + Duration::from_secs(19);
        assert_eq!(g.after_drain(drain(1000), last + CALM - Duration::from_millis(1)), None);
        assert_eq!(g.after_drain(drain(1000), last + CALM), Some(Mode::Yield));
        // Losses alone make it compete again.
        let t = last + CALM + Duration::from_secs(1);
        assert_eq!(g.after_drain(DrainSignal { bytes: 0, losing: true }, t), Some(Mode::Compete));
        assert_eq!(g.switches, 3);
        // Still losing with small drains: no calm, it keeps competing.
        assert_eq!(g.after_drain(DrainSignal { bytes: 0, losing: true }, t + CALM - Duration::from_millis(1)), None);
        assert_eq!(g.after_drain(drain(0), t + CALM + Duration::from_millis(500)), None);
        assert_eq!(g.after_drain(drain(0), t + 2 * CALM), Some(Mode::Yield));
    }

    #[test]
    fn fixed_policies_never_switch() {
        let t0 = Instant::now();
        for (p, m) in [(CpuPolicy::Batch, Mode::Compete), (CpuPolicy::Idle, Mode::Yield)] {
            let mut g = Governor::new(p, RING, t0);
            assert_eq!(g.mode(), m);
            assert_eq!(g.after_drain(DrainSignal { bytes: u64::from(RING), losing: true }, t0), None);
            assert_eq!(g.after_drain(drain(0), t0 + CALM * 10), None);
            assert_eq!(g.mode(), m);
        }
    }

    /// Tests that switch the whole process's mode (and so [`YIELDING`]) take this.
    static PROCESS_MODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The event loop gives the CPU back only while the agent yields, only once a stretch of
    /// work has lasted [`COURTESY_EVERY`], and a stretch starts again after each yield.
    #[test]
    fn courtesy_yields_after_a_long_stretch_while_yielding() {
        let _mode = PROCESS_MODE.lock().unwrap_or_else(|e| e.into_inner());
        let was = YIELDING.load(Relaxed);
        // Count from a clock check, whatever ran on this thread before.
        STRETCH.with(|s| s.set((Instant::now(), 0)));
        let stretch = || (0..COURTESY_CHECK_EVERY).filter(|_| courtesy()).count();
        // Competing: never, however long the stretch.
        YIELDING.store(false, Relaxed);
        std::thread::sleep(COURTESY_EVERY * 2);
        assert_eq!(stretch(), 0);
        // Yielding: once the stretch is long enough, at the next clock check, and counted.
        YIELDING.store(true, Relaxed);
        courtesy_restart();
        std::thread::sleep(COURTESY_EVERY * 2);
        let (n0, before) = (courtesy_yields(), Instant::now());
        assert_eq!(stretch(), 1);
        assert!(courtesy_yields() > n0);
        // The yield started a new stretch.
        assert!(STRETCH.with(|s| s.get().0) >= before);
        std::thread::sleep(COURTESY_EVERY * 2);
        assert_eq!(stretch(), 1);
        YIELDING.store(was, Relaxed);
    }

    /// A yielding agent whose event loop stops draining is made to compete by the watchdog.
    #[test]
    fn watchdog_rescues_a_starved_event_loop() {
        let _mode = PROCESS_MODE.lock().unwrap_or_else(|e| e.into_inner());
        if !can_return_from_yield() {
            eprintln!("skipped: this test process may not leave SCHED_IDLE (not root)");
            return;
        }
        // A pipe stands in for the ring buffer: writing to it is the kernel's wake-up.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for both ends.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        // SAFETY: fresh fds owned by nothing else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wake = || {
            // SAFETY: one byte from a valid buffer to an open pipe.
            assert_eq!(unsafe { libc::write(wr.as_raw_fd(), b"x".as_ptr().cast(), 1) }, 1);
        };
        let w = Watchdog::spawn(rd, 8 << 20);
        // The event loop's switch to yielding, without moving this process's threads to
        // `SCHED_IDLE`: the loop below must keep draining on a loaded machine.
        let was = YIELDING.swap(true, Relaxed);
        w.set_mode(Mode::Yield);
        // Woken, and the event loop keeps draining (every millisecond, for longer than the
        // watchdog can take to wake and check, even on a loaded machine): no rescue.
        for _ in 0..5 {
            wake();
            let t = Instant::now();
            while t.elapsed() < STARVED * 5 {
                w.drained();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert!(!w.rescued(), "rescued although every wake-up was followed by a drain");
        // Woken, and no drain follows: rescued after STARVED.
        let t = Instant::now();
        wake();
        while !w.rescued() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(w.rescued());
        assert!(t.elapsed() >= STARVED, "{:?}", t.elapsed());
        assert_eq!(w.shared().rescues.load(Relaxed), 1);
        // SAFETY: a plain query of the calling thread (switched by apply_all).
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_BATCH);
        // The watchdog itself is never made to yield.
        apply_all(Mode::Yield);
        let tid = WATCHDOG_TID.load(Relaxed);
        assert_ne!(tid, 0);
        // SAFETY: a plain query of another thread of this process.
        assert_eq!(unsafe { libc::sched_getscheduler(tid) }, libc::SCHED_BATCH);
        apply_all(Mode::Compete);
        YIELDING.store(was, Relaxed);
    }

    /// The watchdog reads a real ring buffer's level from its mapped position pages (root: it
    /// creates a BPF ring buffer map), and a pipe (no such pages) is refused.
    #[test]
    fn ring_level_maps_a_bpf_ring_buffer() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for both ends.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned here.
        let (rd, _wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        assert!(RingLevel::map(&rd).is_none());
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
        let mut attr = [0u32; 32];
        attr[0] = 27; // BPF_MAP_TYPE_RINGBUF
        attr[3] = 1 << 16;
        // SAFETY: BPF_MAP_CREATE (0) reads `size` bytes of `attr`, which is zero-padded.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), std::mem::size_of_val(&attr)) };
        if fd < 0 {
            eprintln!("skipped: cannot create a BPF ring buffer here (not root?)");
            return;
        }
        // SAFETY: a new fd that nothing else owns.
        let ring = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let level = RingLevel::map(&ring).expect("a ring buffer's position pages map read-only");
        assert_eq!(level.waiting(), 0);
    }

    /// The calls reach the kernel: the calling thread reports the policy that was set.
    #[test]
    fn modes_apply_to_this_thread() {
        if !can_return_from_yield() {
            eprintln!("skipped: this test process may not leave SCHED_IDLE (not root)");
            return;
        }
        std::thread::spawn(|| {
            apply_current(Mode::Yield);
            // SAFETY: a plain query of the calling thread.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
            apply_current(Mode::Compete);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_BATCH);
        })
        .join()
        .unwrap();
    }
}
