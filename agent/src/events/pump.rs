//! The event loop: drains the ring buffer (woken by epoll through tokio's `AsyncFd`), feeds the
//! connection table, turns finished exchanges into spans, measures them (RED metrics, sampling:
//! the [`Tee`]) and hands them to the exporter in batches, one per drain, without ever blocking
//! (what does not fit the bounded queue is dropped and counted). A long drain is cut into slices
//! with a yield between them, so the exporter, on the same thread, keeps taking spans. One task
//! owns all state: no locks on the hot path.

use std::{collections::HashSet, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use waybill_common::{LOST_PAYLOAD_TRUNCATED, LOST_READ_USER, LOST_RINGBUF_FULL, LOST_STASH_FULL};

use super::{Record, comm, decode};
use crate::{
    clock::Clock,
    conn::{ConnTable, Finished},
    export::{SpanSender, red::Tee},
    loader::attach::Probes,
    metrics::Metrics,
    process::{self, Selector},
    stitch::{Stitcher, span::SpanRecord},
};

/// How long the ring buffer waits for a drain when the kernel side did not ask for a wake-up (it
/// does each time the waiting data crosses another eighth of the buffer); the timer restarts at
/// every drain and is off while the loop sleeps (see [`Pipeline::run`]). Each drain is a thread
/// wake-up that meets cold caches (the agent's code and tables, not only the new records), so
/// fewer drains cost less per request: 250 ms took 7–10 % off 100 ms, and 500 ms another 5 % off
/// 250 ms at 3000 requests/s (3.07 against 3.23 µs, 6 alternated rounds; docs/performance.md).
/// A span waits at most this long in the ring buffer, against the exporter's 1 s schedule; at
/// 3000 requests/s of nginx the kernel's wake-ups (~0.4 s apart) come first anyway.
pub(crate) const DRAIN_EVERY: Duration = Duration::from_millis(500);
/// Housekeeping (loss counters, idle sweeps, the /proc rescan) is due this often; [`IDLE_TICK`]
/// while the loop sleeps. While traffic flows it runs with the next drain once due (at most
/// [`DRAIN_EVERY`] later) instead of waking the agent on its own: every wake-up meets cold caches.
const TICK: Duration = Duration::from_millis(500);
pub(crate) const IDLE_TICK: Duration = Duration::from_secs(1);
/// Most spans handed to the exporter in one batch.
const MAX_SHIP: usize = 1024;
/// One drain reads at most this share of the ring buffer (64 KiB at least) before the event loop
/// yields to the other tasks and then goes on: the exporter runs on the same thread and must take
/// the spans from its bounded queue while a long backlog is worked through (one unbroken drain of
/// a full buffer makes ~25 000 PostgreSQL spans, three times the queue). Records left wait in the
/// ring buffer, which is the larger buffer.
const DRAIN_SLICE_OF_RING: u64 = 32;

/// Settings of the pipeline.
pub struct PipelineConfig {
    pub selector: Selector,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// How often /proc is rescanned for `--exe` / `--port` matches missed by the kernel events.
    pub rescan_every: Duration,
    /// Per-service rules of the config file (`inject: false` here; sampling in the exporter tee).
    pub rules: std::sync::Arc<crate::config::FileConfig>,
    /// How the agent shares the CPU with the applications (crate::sched).
    pub cpu_policy: crate::sched::CpuPolicy,
    /// Size of the ring buffer (the governor's measure of falling behind).
    pub ring_buffer_bytes: u32,
    /// Spans also carry the semantic conventions' Opt-In attributes (`--opt-in-attributes`).
    pub opt_in_attributes: bool,
}

pub struct Pipeline {
    probes: Probes,
    conns: ConnTable,
    stitcher: Stitcher,
    metrics: Arc<Metrics>,
    cfg: PipelineConfig,
    spans: SpanSender,
    tee: Tee,
    /// Spans built since the last hand-over to the exporter.
    outgoing: Vec<SpanRecord>,
    traced: HashSet<u32>,
    scanner: process::Scanner,
    finished: Vec<Finished>,
}

impl Pipeline {
    pub fn new(probes: Probes, cfg: PipelineConfig, metrics: Arc<Metrics>, spans: SpanSender, tee: Tee) -> Self {
        let conns = ConnTable::new(cfg.max_connections, cfg.idle_timeout.as_nanos() as u64);
        let mut stitcher = Stitcher::new(Clock::new());
        stitcher.set_opt_in_attributes(cfg.opt_in_attributes);
        Self {
            probes,
            conns,
            stitcher,
            metrics,
            cfg,
            spans,
            tee,
            outgoing: Vec::new(),
            traced: HashSet::new(),
            scanner: process::Scanner::default(),
            finished: Vec::new(),
        }
    }

    /// Starts tracing `pid`. Returns false when the kernel map is full.
    pub fn trace(&mut self, pid: u32, why: &str) -> bool {
        if self.traced.contains(&pid) {
            return true;
        }
        if self.cfg.selector.excludes(pid) {
            tracing::info!(pid, why, "not tracing process: a config rule says `trace: false` for it");
            return false;
        }
        if !self.probes.add_target(pid) {
            self.metrics.process_attach_failures.inc();
            tracing::warn!(pid, "cannot trace: the target map is full (4096 processes)");
            return false;
        }
        self.traced.insert(pid);
        self.metrics.processes_attached.set(self.traced.len() as u64);
        let names = process::names(pid);
        tracing::info!(pid, exe = names.first().map(String::as_str).unwrap_or("?"), why, "tracing process");
        self.describe(pid);
        self.probes.attach_tls(pid);
        true
    }

    /// A process the kernel side already added to `TARGETS` (fork of a traced process, user of a
    /// `--port`): track it, unless a config rule excludes it, then take it out again.
    fn adopt(&mut self, pid: u32) -> bool {
        if self.cfg.selector.excludes(pid) {
            self.probes.remove_target(pid);
            return false;
        }
        self.traced.insert(pid);
        self.metrics.processes_attached.set(self.traced.len() as u64);
        self.describe(pid);
        self.probes.attach_tls(pid);
        true
    }

    /// Reads the process's resource now: a short-lived process (psql, curl) is often gone by the
    /// time its first span is built, and /proc/PID with it.
    /// Its config rules apply from here: `inject: false` is written into the kernel's target map.
    fn describe(&mut self, pid: u32) {
        let r = self.stitcher.resources.get(pid);
        if self.cfg.rules.no_inject(&r) {
            tracing::info!(pid, service = %r.service_name, "traceparent injection off for this process (config rule)");
            self.probes.set_target_policy(pid, true);
        } else if self.cfg.rules.any_no_inject() {
            // After an exec the old program's rule may no longer apply.
            self.probes.set_target_policy(pid, false);
        }
    }

    /// Applies the selector to what runs now: `--pid` (with descendants), `--exe`, `--port`.
    pub fn initial_targets(&mut self) -> usize {
        for exe in self.cfg.selector.exes.clone() {
            if !self.probes.watch_comm(&exe) {
                tracing::warn!(
                    exe,
                    "too many --exe names for the kernel's exec filter (64); user space still matches it"
                );
            }
        }
        for port in self.cfg.selector.ports.clone() {
            if !self.probes.watch_port(port) {
                tracing::warn!(port, "too many watched ports");
            }
        }
        for pid in self.cfg.selector.pids.clone() {
            for p in process::with_descendants(pid) {
                self.trace(p, if p == pid { "--pid" } else { "descendant of --pid" });
            }
        }
        self.rescan(true);
        self.traced.len()
    }

    /// Looks in /proc for targets the kernel side could not report; `full`: at every process,
    /// not only the new ones ([`process::Scanner`]).
    fn rescan(&mut self, full: bool) {
        for pid in self.scanner.scan(&self.cfg.selector, &self.traced, full) {
            self.trace(pid, "matches --exe/--port");
        }
        // TLS libraries loaded since the last look (dlopen).
        for pid in self.traced.clone() {
            self.probes.attach_tls(pid);
        }
        // Forget processes that are gone (their exit event may have been lost).
        let gone: Vec<u32> = self.traced.iter().copied().filter(|p| !process::exists(*p)).collect();
        for p in gone {
            self.untrace(p, Clock::monotonic_now());
        }
    }

    fn untrace(&mut self, pid: u32, ts_ns: u64) {
        self.traced.remove(&pid);
        self.probes.remove_target(pid);
        self.probes.detach_tls(pid);
        self.conns.on_exit(pid, ts_ns, &self.metrics, &mut self.finished);
        // Build the spans its connections just finished while its resource is still known.
        self.flush_finished();
        self.stitcher.forget(pid);
        self.metrics.processes_attached.set(self.traced.len() as u64);
    }

    fn handle(&mut self, buf: &[u8]) {
        self.metrics.records_received.inc();
        let Some(rec) = decode(buf) else {
            self.metrics.records_malformed.inc();
            return;
        };
        let m = &self.metrics;
        match rec {
            // (Attaching uprobes blocks this loop for ~15-60 ms per process, so it is not done
            // here at a process's first socket: a burst of short-lived processes would stall the
            // pipeline. libssl loaded after exec is picked up by the rescan.)
            Record::Conn(ev) => self.conns.on_conn(&ev, m, &mut self.finished),
            Record::Data { head, payload, ctx } => {
                if let Some(ctx) = ctx {
                    self.stitcher.on_server_ctx(head.hdr.tgid, head.fd, head.hdr.ts_ns, &ctx, m);
                }
                m.bytes_captured.add(payload.len() as u64);
                self.conns.on_data(&head, payload, m, &mut self.finished)
            }
            Record::Close(ev) => self.conns.on_close(&ev, m, &mut self.finished),
            Record::Inject(ev) => self.stitcher.on_inject(&ev, m),
            Record::Exec(ev) => {
                let pid = ev.hdr.tgid;
                if self.traced.contains(&pid) && self.cfg.selector.excludes(pid) {
                    tracing::info!(pid, "traced process exec'd a program a config rule excludes: no longer tracing it");
                    self.untrace(pid, ev.hdr.ts_ns);
                } else if self.traced.contains(&pid) {
                    // Same process, new program: describe it afresh, probe its TLS afresh.
                    self.probes.detach_tls(pid);
                    self.probes.attach_tls(pid);
                    self.stitcher.resources.forget(pid);
                    self.stitcher.resources.set_comm(pid, comm(&ev.comm));
                    self.describe(pid);
                } else if process::exe_matches(pid, &self.cfg.selector.exes)
                    || process::comm_matches(&comm(&ev.comm), &self.cfg.selector.exes)
                {
                    // (Second case: possibly gone already, e.g. `psql -c`: the kernel traced it by
                    // the same comm at exec and may have untraced it at exit since.)
                    self.stitcher.resources.set_comm(pid, comm(&ev.comm));
                    if !self.trace(pid, "exec matches --exe") {
                        // The kernel may have added it already (its comm is an --exe name).
                        self.probes.remove_target(pid);
                    }
                } else if self.probes.is_target(pid) {
                    // Added by the kernel on a comm match user space does not confirm.
                    self.probes.remove_target(pid);
                }
            }
            Record::Fork(ev) => {
                self.stitcher.resources.set_parent(ev.hdr.tgid, ev.other);
                if self.adopt(ev.hdr.tgid) {
                    tracing::debug!(pid = ev.hdr.tgid, parent = ev.other, comm = %comm(&ev.comm), "traced process forked");
                }
            }
            Record::Exit(ev) => {
                tracing::debug!(pid = ev.hdr.tgid, "traced process exited");
                self.untrace(ev.hdr.tgid, ev.hdr.ts_ns);
            }
            Record::PortMatch(ev) => {
                if self.adopt(ev.hdr.tgid) {
                    tracing::info!(pid = ev.hdr.tgid, port = ev.other, comm = %comm(&ev.comm), "tracing process (uses a --port)");
                }
            }
        }
        self.flush_finished();
    }

    fn flush_finished(&mut self) {
        for f in self.finished.drain(..) {
            if let Some(span) = self.stitcher.span(f, &self.metrics) {
                self.outgoing.push(span);
            }
        }
        if self.outgoing.len() >= MAX_SHIP {
            self.ship();
        }
    }

    /// Measures the spans built so far and queues them for the exporter as one batch.
    fn ship(&mut self) {
        if self.outgoing.is_empty() {
            return;
        }
        let mut batch = std::mem::replace(&mut self.outgoing, crate::stitch::span::batch_vec());
        self.tee.pass(&mut batch);
        let dropped = self.spans.try_send(batch);
        self.metrics.spans_dropped_queue_full.add(dropped as u64);
    }

    fn refresh_lost(&self) {
        let l = self.probes.lost_counters();
        self.metrics.lost_ringbuf_full.set(l[LOST_RINGBUF_FULL as usize]);
        self.metrics.lost_payload_truncated.set(l[LOST_PAYLOAD_TRUNCATED as usize]);
        self.metrics.lost_stash_full.set(l[LOST_STASH_FULL as usize]);
        self.metrics.lost_read_user.set(l[LOST_READ_USER as usize]);
        for (c, v) in self.metrics.inject.iter().zip(self.probes.inject_counters()) {
            c.set(v);
        }
    }

    /// Reads records until the buffer is empty or `slice` bytes were read: (bytes read, whether
    /// the drain was cut with records possibly left).
    fn drain_slice(&mut self, rb: &mut RingBuf<MapData>, slice: u64) -> (u64, bool) {
        let mut bytes = 0u64;
        while let Some(item) = rb.next() {
            bytes += item.len() as u64;
            self.handle(&item);
            crate::sched::courtesy();
            if bytes >= slice {
                return (bytes, true);
            }
        }
        (bytes, false)
    }

    /// The housekeeping of the [`TICK`]: idle connections and contexts; every `rescan_every`, the
    /// kernel's loss counters and the /proc rescan.
    fn tick(&mut self, last_scan: &mut std::time::Instant) {
        let now = Clock::monotonic_now();
        self.conns.sweep(now, &self.metrics, &mut self.finished);
        self.stitcher.sweep(now, &self.metrics);
        self.flush_finished();
        if last_scan.elapsed() >= self.cfg.rescan_every {
            *last_scan = std::time::Instant::now();
            // With the rescan, not at every tick: each counter is a bpf() call that copies
            // every CPU's value (~17 calls, 13 % of an idle agent's CPU at every tick).
            let lost = self.metrics.lost_ringbuf_full.get();
            self.refresh_lost();
            // Lost records may have been exec or listen events: look at every process again.
            self.rescan(self.metrics.lost_ringbuf_full.get() != lost);
        }
    }

    /// Runs until `shutdown` resolves; then drains what the kernel already produced.
    ///
    /// Three things make it drain: the kernel's wake-up (at each eighth of the ring buffer,
    /// or at the first record after the loop went to sleep), the [`DRAIN_EVERY`] timer, and the
    /// continuation of a drain cut into slices. A timer drain that finds the buffer empty puts
    /// the loop to sleep: it sets `AGENT_SLEEPING` for the kernel side and disarms the drain
    /// timer, so an idle agent wakes only for the housekeeping [`TICK`] (which also drains, for a
    /// record submitted while the flag was being set) and for the first record of new traffic.
    pub async fn run(
        mut self,
        ring: RingBuf<MapData>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        use std::time::Instant;
        // The CPU watchdog polls its own duplicate of the ring buffer fd.
        let ring_fd = std::os::fd::AsFd::as_fd(&ring).try_clone_to_owned()?;
        // SAFETY: the RingBuf owns its map fd and lives inside the AsyncFd, so the fd stays open
        // for as long as it is registered.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        let mut cpu = CpuGovernor::start(&self.cfg, &self.metrics, ring_fd);
        let mut timer = super::timer::Wakeup::new()?;
        let start = Instant::now();
        let mut drain_at = Some(start + DRAIN_EVERY);
        let mut tick_at = start;
        // AGENT_SLEEPING is set and the drain timer disarmed.
        let mut asleep = false;
        let mut last_scan = Instant::now();
        let slice = (u64::from(self.cfg.ring_buffer_bytes) / DRAIN_SLICE_OF_RING).max(64 << 10);
        // A drain cut at `slice` with records left: go on after one yield. `drained` adds up the
        // bytes of every slice of that drain (what the CPU governor reads as "waiting").
        let mut more = false;
        let mut drained = 0u64;
        tokio::pin!(shutdown);
        loop {
            // While traffic flows the timer waits for the drain; a due tick rides on it.
            timer.arm_at(drain_at.unwrap_or(tick_at))?;
            // (drain now, woken by the kernel)
            let (pending, woken) = tokio::select! {
                guard = ring.readable_mut() => {
                    guard?.clear_ready();
                    self.metrics.drains_wakeup.inc();
                    (true, true)
                }
                fired = timer.fired() => {
                    fired?;
                    let now = Instant::now();
                    let mut due = drain_at.is_some_and(|d| d <= now);
                    if due {
                        self.metrics.drains_timer.inc();
                    }
                    if tick_at <= now {
                        self.tick(&mut last_scan);
                        tick_at = now + if asleep { IDLE_TICK } else { TICK };
                        // Asleep, the tick drains too: a record submitted while the flag was set
                        // may not have woken the loop.
                        if asleep {
                            self.metrics.drains_tick.inc();
                            due = true;
                        }
                    }
                    (due, false)
                }
                // Continuing a cut drain (the yield to the exporter came after the last slice).
                _ = std::future::ready(()), if more => (true, false),
                _ = &mut shutdown => break,
            };
            if pending {
                if !more {
                    drained = 0;
                    crate::sched::courtesy_restart();
                }
                let this;
                (this, more) = self.drain_slice(ring.get_mut(), slice);
                drained += this;
                if this > 0 || more || woken {
                    asleep = false;
                } else if !asleep && self.probes.set_sleeping(true) {
                    // Records submitted before the kernel side saw the flag did not wake us: one
                    // more look, after the flag is set.
                    let (late, m) = self.drain_slice(ring.get_mut(), slice);
                    (drained, more) = (drained + late, m);
                    asleep = late == 0 && !m;
                }
                drain_at = (!asleep).then(|| Instant::now() + DRAIN_EVERY);
                cpu.set_asleep(asleep);
                self.metrics.event_loop_asleep.set(u64::from(asleep));
            }
            if woken && tick_at <= Instant::now() {
                // Housekeeping due: done now, after this drain, not on a wake-up of its own.
                self.tick(&mut last_scan);
                tick_at = Instant::now() + TICK;
            }
            self.ship();
            if pending {
                cpu.after_drain(drained, &self.probes, &self.spans, &self.metrics);
            }
            if more {
                // Always between two slices, whichever branch wakes the loop next: the exporter,
                // on this thread, takes this slice's spans first.
                tokio::task::yield_now().await;
            }
        }
        // What the kernel already produced, in slices too: the exporter keeps taking spans.
        loop {
            let (_, more) = self.drain_slice(ring.get_mut(), slice);
            self.ship();
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.refresh_lost();
        Ok(())
    }
}

/// Applies `--cpu-policy` to the agent's threads as the load changes (crate::sched).
struct CpuGovernor {
    gov: crate::sched::Governor,
    /// Only for the adaptive policy.
    watchdog: Option<crate::sched::Watchdog>,
    /// Kernel-side lost records and queue-dropped spans at the previous drain.
    lost_seen: u64,
}

impl CpuGovernor {
    fn start(cfg: &PipelineConfig, metrics: &Metrics, ring: std::os::fd::OwnedFd) -> Self {
        use crate::sched::{CpuPolicy, Governor, Mode, Watchdog, apply_all, can_return_from_yield};
        let mut policy = cfg.cpu_policy;
        if policy == CpuPolicy::Adaptive && !can_return_from_yield() {
            tracing::warn!("--cpu-policy adaptive needs root or CAP_SYS_NICE to leave SCHED_IDLE again: using batch");
            policy = CpuPolicy::Batch;
        }
        let gov = Governor::new(policy, cfg.ring_buffer_bytes, std::time::Instant::now());
        let watchdog = (policy == CpuPolicy::Adaptive).then(|| Watchdog::spawn(ring, u64::from(cfg.ring_buffer_bytes)));
        if gov.mode() == Mode::Yield {
            apply_all(Mode::Yield);
        }
        if let Some(w) = &watchdog {
            w.set_mode(gov.mode());
        }
        metrics.cpu_yielding.set(u64::from(gov.mode() == Mode::Yield));
        CpuGovernor { gov, watchdog, lost_seen: 0 }
    }

    /// Tells the watchdog whether the event loop sleeps without a drain timer.
    fn set_asleep(&self, asleep: bool) {
        if let Some(w) = &self.watchdog {
            w.set_asleep(asleep);
        }
    }

    fn after_drain(&mut self, drained: u64, probes: &Probes, spans: &SpanSender, metrics: &Metrics) {
        use crate::sched::{DrainSignal, Mode, apply_all};
        // Fixed policies never switch: no signals to gather.
        let Some(w) = &self.watchdog else { return };
        let now = std::time::Instant::now();
        w.drained();
        if self.gov.mode() == Mode::Yield && w.rescued() {
            self.gov.rescued(now);
            metrics.cpu_yielding.set(0);
            metrics.cpu_policy_switches.inc();
            tracing::debug!("agent CPU policy: starved while yielding, competing (watchdog)");
        }
        let lost = probes.ringbuf_lost() + metrics.spans_dropped_queue_full.get();
        let losing = lost != self.lost_seen || spans.filling();
        self.lost_seen = lost;
        if let Some(mode) = self.gov.after_drain(DrainSignal { bytes: drained, losing }, now) {
            let threads = apply_all(mode);
            w.set_mode(mode);
            tracing::debug!(?mode, threads, drained, losing, "agent CPU policy switched");
            metrics.cpu_yielding.set(u64::from(mode == Mode::Yield));
            metrics.cpu_policy_switches.inc();
        }
    }
}
