//! Trace context: which trace each request belongs to and which span is its parent.
//!
//! A context is created when a request's head is seen (server side: the thread that read it;
//! client side: the thread that wrote it), long before its exchange finishes, so calls made while
//! serving a request can find it. Its trace id and parent are resolved lazily, on first use,
//! by these rules in order:
//!
//! | source (`waybill.parent.source`) | rule |
//! | --- | --- |
//! | `header` | server request with a valid W3C `traceparent`: child of the remote span (the header may have been injected by Waybill on the caller's host) |
//! | `connection` | server request whose connection's client side is a traced process on this host (tuple mirrored): child of that CLIENT span |
//! | `thread` | client call made by a thread that is currently serving a server request: child of that SERVER span |
//! | `none` | nothing applies: a new trace |
//!
//! Kernel-decided ids ([`KernelIds`], see ebpf-probes/src/inject.rs) come first when present: a
//! server request keeps the span id (and, without a parent, the trace id) the kernel chose when
//! its head was read, and a client request whose `traceparent` the kernel injected keeps exactly
//! the injected trace id, span id and parent, because the downstream already received them.
//! When an injected header reaches a traced server on this host, header and connection rules
//! agree and the span reports `connection`.
//!
//! Event-loop servers (one thread, many requests open at once) make the `thread` rule ambiguous,
//! and every span it links then is marked `waybill.parent.uncertain = true`. Database calls are
//! decided when their request bytes are written ([`Correlator::claim_server`]), first-in
//! first-out: the oldest open request of the thread that has not yet started a call to that
//! database system gets it (event loops and FIFO connection pools serve requests, and issue
//! their first query, in arrival order); when every open request already made one, the most
//! recent. HTTP client calls take the most recent request (as the kernel does when it injects).
//! A thread's current request is forgotten when its response has been written, so a later call
//! on that thread never joins an old trace.
//!
//! Bounds: at most `MAX_CONTEXTS` contexts; unfinished ones are dropped after `MAX_AGE_NS`.
//! A finished context that parents a call (a client request or a database call was attributed
//! to it while it was open) is kept `KEEP_FINISHED_NS`, since the call may end after the request
//! did and resolve its parent then. Any other finished context is kept `KEEP_FINISHED_LEAF_NS`,
//! for the lookups by tuple that trail its finish by the event stream's disorder. When the table
//! is full the context that finished first makes room, leaves before parents (only when every
//! context is still open, the
//! oldest open one): a long request keeps its context through any burst of short ones. At
//! 100 000 requests/s a finished context still stays ~160 ms, far longer than any lookup needs.

use std::{collections::VecDeque, sync::Arc};

// FxHash: every key here is an integer the agent or the kernel chose (context ids, pid/tid,
// socket endpoints of the traced processes' own outgoing connections), hashed per request.
use rustc_hash::FxHashMap;

use super::span::ParentSource;
use crate::ids::{self, TraceParent};

const MAX_CONTEXTS: usize = 16384;
/// Keep time of a finished context that parents a call (see the module's Bounds).
const KEEP_FINISHED_NS: u64 = 10_000_000_000;
/// Keep time of any other finished context. Short, so that the table holds about one second of
/// requests instead of `MAX_CONTEXTS` at every rate above ~1 600 requests/s: a request then
/// touches a context written a second ago, not one evicted from a 4 MiB table after ~5 s (agent
/// CPU per request at 3000 req/s 3.37 → 3.11 µs with 10 s → 1 s, docs/performance.md).
const KEEP_FINISHED_LEAF_NS: u64 = 1_000_000_000;
const MAX_AGE_NS: u64 = 600_000_000_000;
/// How many of a thread's open requests (oldest first) [`Correlator::claim_server`] looks at.
const MAX_FIFO_SCAN: usize = 32;
/// A client context found by tuple must have started at most this long after the server's
/// request start (clocks are the same: both are kernel timestamps).
const TUPLE_SLACK_NS: u64 = 5_000_000;

/// Connection endpoints as (local, remote) `ip:port` strings-free keys.
pub type Endpoint = ([u8; 16], u16);

/// What is known at a request's head.
#[derive(Clone, Debug)]
pub struct RequestStart {
    pub pid: u32,
    pub tid: u32,
    pub server: bool,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub start_ns: u64,
    pub traceparent: Option<Arc<str>>,
    pub tracestate: Option<Arc<str>>,
    /// Ids the kernel already decided (and may have sent downstream) for this request.
    pub kernel: Option<KernelIds>,
}

/// Ids decided in the kernel before user space saw the request (ebpf-probes/src/inject.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Client: the server span the sending thread was serving. Server: the header's parent.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    /// Server: the kernel found the request's own traceparent.
    pub from_header: bool,
    /// Client: these ids travelled downstream in an injected `traceparent`.
    pub injected: bool,
}

/// A resolved context: what the span is exported with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    pub trace_state: Option<Arc<str>>,
    pub source: ParentSource,
    pub uncertain: bool,
    /// The incoming traceparent was present but malformed.
    pub malformed_header: bool,
    /// Client: the kernel injected a traceparent carrying these ids.
    pub injected: bool,
    /// Server: the request's traceparent was parsed here but the kernel's bounded scan missed it
    /// (calls it made downstream carried the kernel's own trace id).
    pub kernel_mismatch: bool,
}

impl Resolved {
    /// A span with no parent (yet): the root of trace `trace_id`, sampled.
    pub fn root(trace_id: [u8; 16], span_id: [u8; 8]) -> Self {
        Resolved {
            trace_id,
            span_id,
            parent_span_id: None,
            sampled: true,
            trace_state: None,
            source: ParentSource::None,
            uncertain: false,
            malformed_header: false,
            injected: false,
            kernel_mismatch: false,
        }
    }
}

#[derive(Debug)]
struct Ctx {
    start: RequestStart,
    span_id: [u8; 8],
    /// Client contexts: the server context of the thread at the time of the call.
    thread_parent: Option<u64>,
    uncertain: bool,
    resolved: Option<Resolved>,
    finished_ns: Option<u64>,
    /// Server contexts: bit set of the call kinds (`claim_server`) already attributed to it.
    calls: u8,
    /// Server contexts: a client context took this one as its thread parent.
    parent_of_call: bool,
}

impl Ctx {
    /// A later span may need this context after it finished: keep it `KEEP_FINISHED_NS`.
    fn parents_a_call(&self) -> bool {
        self.calls != 0 || self.parent_of_call
    }
}

/// Contexts by id. A slab, not a hash map: when the table is full (every request at high rates),
/// the context evicted is read where the new one is then written (the slot freed last is reused
/// first), one cache miss instead of a hash bucket to find plus a cold bucket to fill. An id is
/// (generation << 32 | slot); removal bumps the slot's generation, so a stale id finds nothing.
///
/// The slots live in chunks of [`SLAB_CHUNK`] that never move: a table that grows does not copy
/// the contexts it holds (one `Vec` grown by doubling copied them all at every step, into freshly
/// faulted pages — a tenth of the agent's CPU in its first seconds at 3000 requests/s — and held
/// the old and the new array at once at each step).
struct Slab<T> {
    chunks: Vec<Vec<Slot<T>>>,
    free: Vec<u32>,
    len: usize,
}

/// Slots per chunk of a [`Slab`].
const SLAB_CHUNK: usize = 1024;

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { chunks: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, value: T) -> u64 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.chunks.last().is_none_or(|c| c.len() == SLAB_CHUNK) {
                    self.chunks.push(Vec::with_capacity(SLAB_CHUNK));
                }
                let n = self.chunks.len();
                let chunk = &mut self.chunks[n - 1];
                chunk.push(Slot { generation: 0, value: None });
                ((n - 1) * SLAB_CHUNK + chunk.len() - 1) as u32
            }
        };
        let slot = self.slot_at(index).expect("a free or new slot exists");
        slot.value = Some(value);
        let id = (u64::from(slot.generation) << 32) | u64::from(index);
        self.len += 1;
        id
    }

    fn slot_at(&mut self, index: u32) -> Option<&mut Slot<T>> {
        let i = index as usize;
        self.chunks.get_mut(i / SLAB_CHUNK)?.get_mut(i % SLAB_CHUNK)
    }

    fn slot(&self, id: u64) -> Option<&Slot<T>> {
        let i = id as u32 as usize;
        self.chunks.get(i / SLAB_CHUNK)?.get(i % SLAB_CHUNK).filter(|s| s.generation == (id >> 32) as u32)
    }

    fn slot_mut(&mut self, id: u64) -> Option<&mut Slot<T>> {
        self.slot_at(id as u32).filter(|s| s.generation == (id >> 32) as u32)
    }

    fn get(&self, id: &u64) -> Option<&T> {
        self.slot(*id)?.value.as_ref()
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut T> {
        self.slot_mut(*id)?.value.as_mut()
    }

    fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    /// Drops the value in place (no move out of its slot).
    fn delete(&mut self, id: u64) {
        let Some(slot) = self.slot_mut(id) else { return };
        if slot.value.take().is_none() {
            return;
        }
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id as u32);
        self.len -= 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.chunks
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, s)| s.value.as_ref().map(|v| ((u64::from(s.generation) << 32) | i as u64, v)))
    }
}

#[derive(Default)]
pub struct Correlator {
    ctxs: Slab<Ctx>,
    /// (pid, tid) → server contexts open on that thread, most recent last.
    threads: FxHashMap<(u32, u32), Vec<u64>>,
    /// (local, remote) of client contexts, for the server side on this host to find.
    clients: FxHashMap<(Endpoint, Endpoint), VecDeque<u64>>,
    /// Context ids in creation order, so the oldest is found in O(1); ids removed
    /// by other paths are skipped lazily, and the queue is compacted once it holds more than
    /// twice as many ids as there are contexts (amortised O(1) per context).
    order: VecDeque<u64>,
    /// (finish time, id) in the order `finish` was called: finish times come from the event
    /// stream, so this is their order up to the stream's small disorder, and expired finished
    /// contexts are found at its front. An entry whose context was removed (or finished again)
    /// since is stale and skipped. Contexts that parent no call (`KEEP_FINISHED_LEAF_NS`).
    finished: VecDeque<(u64, u64)>,
    /// The same for contexts that parent a call (`KEEP_FINISHED_NS`).
    finished_parents: VecDeque<(u64, u64)>,
    /// Contexts dropped because the table was full.
    pub evicted: u64,
}

impl Correlator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.ctxs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ctxs.is_empty()
    }

    /// Registers a request whose head was just seen; returns its context id.
    pub fn start(&mut self, s: RequestStart) -> u64 {
        if self.ctxs.len() >= MAX_CONTEXTS {
            self.evict_oldest();
        }
        let key = (s.pid, s.tid);
        let (thread_parent, uncertain) = if s.server {
            (None, false)
        } else {
            let open = self.threads.get(&key).map(|v| v.as_slice()).unwrap_or(&[]);
            (open.last().copied(), open.len() > 1)
        };
        if let Some(p) = thread_parent.and_then(|p| self.ctxs.get_mut(&p)) {
            p.parent_of_call = true;
        }
        let span_id = s.kernel.map(|k| k.span_id).unwrap_or_else(ids::span_id);
        let server = s.server;
        let client_key = (s.local, s.remote);
        let id = self.ctxs.insert(Ctx {
            start: s,
            span_id,
            thread_parent,
            uncertain,
            resolved: None,
            finished_ns: None,
            calls: 0,
            parent_of_call: false,
        });
        self.order.push_back(id);
        if server {
            self.threads.entry(key).or_default().push(id);
        } else {
            let q = self.clients.entry(client_key).or_default();
            q.push_back(id);
            if q.len() > 64 {
                q.pop_front();
            }
        }
        id
    }

    /// The trace context of `id` (resolved on first call). None if it expired.
    pub fn resolve(&mut self, id: u64) -> Option<Resolved> {
        self.resolve_depth(id, 0)
    }

    fn resolve_depth(&mut self, id: u64, depth: u32) -> Option<Resolved> {
        let ctx = self.ctxs.get(&id)?;
        if let Some(r) = &ctx.resolved {
            return Some(r.clone());
        }
        let span_id = ctx.span_id;
        let uncertain = ctx.uncertain;
        let thread_parent = ctx.thread_parent;
        // What the rules need of the request, copied out (no clone of its header strings).
        let st = &ctx.start;
        let (server, start_ns, local, remote, kernel) = (st.server, st.start_ns, st.local, st.remote, st.kernel);
        let header =
            if server { st.traceparent.as_deref().map(|tp| (TraceParent::parse(tp), &st.tracestate)) } else { None };
        let mut out = Resolved::root([0; 16], span_id);
        let mut parent: Option<Resolved> = None;
        let mut source = ParentSource::None;
        if server {
            if let Some((tp, tracestate)) = header {
                match tp {
                    Some(tp) => {
                        out.trace_id = tp.trace_id;
                        out.parent_span_id = Some(tp.parent_id);
                        out.sampled = tp.sampled;
                        out.trace_state = tracestate.clone();
                        out.source = ParentSource::Header;
                        out.kernel_mismatch = kernel.is_some_and(|k| !k.from_header || k.trace_id != tp.trace_id);
                    }
                    None => out.malformed_header = true,
                }
            }
            if depth < 16 {
                // Same host: is the other end of this connection a traced client?
                let start = start_ns;
                let key = (remote, local);
                let candidate = self.clients.get(&key).and_then(|q| {
                    q.iter()
                        .rev()
                        .copied()
                        .find(|c| self.ctxs.get(c).is_some_and(|cc| cc.start.start_ns <= start + TUPLE_SLACK_NS))
                });
                if let Some(c) = candidate {
                    let p = self.resolve_depth(c, depth + 1);
                    if out.source == ParentSource::None {
                        parent = p;
                        source = ParentSource::Connection;
                    } else if p.is_some_and(|p| Some(p.span_id) == out.parent_span_id && p.trace_id == out.trace_id) {
                        // The header was injected by this agent on the caller's side of this
                        // very connection: both rules agree; the connection is the stronger fact.
                        out.source = ParentSource::Connection;
                    }
                }
            }
        } else if let Some(k) = kernel.filter(|k| k.injected) {
            // The kernel already sent these ids downstream: they are the truth for this span.
            out.trace_id = k.trace_id;
            out.parent_span_id = k.parent_span_id;
            out.sampled = k.sampled;
            out.injected = true;
            if k.parent_span_id.is_some() {
                out.source = ParentSource::Thread;
                out.uncertain = uncertain;
                if let Some(p) = thread_parent.and_then(|p| self.resolve_depth(p, depth + 1)) {
                    if p.trace_id == k.trace_id {
                        out.trace_state = p.trace_state;
                    }
                }
            }
        } else if let Some(p) = thread_parent {
            if depth < 16 {
                parent = self.resolve_depth(p, depth + 1);
                source = ParentSource::Thread;
            }
        }
        if out.source == ParentSource::None {
            match parent {
                Some(p) => {
                    out.trace_id = p.trace_id;
                    out.parent_span_id = Some(p.span_id);
                    out.sampled = p.sampled;
                    out.trace_state = p.trace_state;
                    out.source = source;
                    out.uncertain = uncertain && source == ParentSource::Thread;
                }
                None => match kernel {
                    // A server request with no parent: the kernel's trace id, which calls made
                    // while serving it already carried downstream.
                    Some(k) if server => {
                        out.trace_id = k.trace_id;
                        out.sampled = k.sampled;
                    }
                    _ => out.trace_id = ids::trace_id(),
                },
            }
        }
        if let Some(ctx) = self.ctxs.get_mut(&id) {
            ctx.resolved = Some(out.clone());
        }
        Some(out)
    }

    /// The request's exchange finished: resolve it, and stop offering it as a thread's current
    /// request. It stays findable for a while (late lookups by tuple).
    pub fn finish(&mut self, id: u64, now_ns: u64) -> Option<Resolved> {
        let r = self.resolve(id);
        if let Some(ctx) = self.ctxs.get_mut(&id) {
            ctx.finished_ns = Some(now_ns);
            // (Field by field: `ctx` still borrows the slab, so not through `finish_queue`.)
            let queue = if ctx.parents_a_call() { &mut self.finished_parents } else { &mut self.finished };
            queue.push_back((now_ns, id));
            if ctx.start.server {
                let key = (ctx.start.pid, ctx.start.tid);
                // An emptied list stays (with its memory) for the thread's next request; the
                // sweep drops empty ones.
                if let Some(v) = self.threads.get_mut(&key) {
                    v.retain(|x| *x != id);
                }
            }
        }
        r
    }

    /// The server request `tid` of `pid` is serving now (for calls whose start was not seen).
    pub fn current_server(&self, pid: u32, tid: u32) -> Option<(u64, bool)> {
        let v = self.threads.get(&(pid, tid))?;
        Some((*v.last()?, v.len() > 1))
    }

    /// The server request a call of `kind` (a bit: one per database system) that `tid` of `pid`
    /// is writing now belongs to, and whether that is uncertain (several requests open on the
    /// thread). One open request: it. Several (an event loop): the oldest that has not yet made a
    /// call of this kind, else the most recent. The chosen request is marked as having made one.
    pub fn claim_server(&mut self, pid: u32, tid: u32, kind: u8) -> Option<(u64, bool)> {
        let v = self.threads.get(&(pid, tid))?;
        let last = *v.last()?;
        let uncertain = v.len() > 1;
        let pick = if uncertain {
            v.iter()
                .take(MAX_FIFO_SCAN)
                .copied()
                .find(|id| self.ctxs.get(id).is_some_and(|c| c.calls & kind == 0))
                .unwrap_or(last)
        } else {
            last
        };
        if let Some(c) = self.ctxs.get_mut(&pick) {
            c.calls |= kind;
        }
        Some((pick, uncertain))
    }

    /// Forgets a process's thread state (it exited).
    pub fn forget_process(&mut self, pid: u32) {
        self.threads.retain(|(p, _), _| *p != pid);
    }

    /// Drops expired contexts: finished ones `KEEP_FINISHED_LEAF_NS` or `KEEP_FINISHED_NS` (those
    /// that parent a call) after they finished, unfinished
    /// ones `MAX_AGE_NS` after they started. Both are found at the front of their queue (finish
    /// order, creation order), so a sweep costs what it removes, not the table's size.
    pub fn sweep(&mut self, now_ns: u64) {
        for parents in [false, true] {
            let keep = if parents { KEEP_FINISHED_NS } else { KEEP_FINISHED_LEAF_NS };
            loop {
                let queue = self.finish_queue(parents);
                let Some(&(f, id)) = queue.front() else { break };
                if now_ns.saturating_sub(f) <= keep {
                    break;
                }
                queue.pop_front();
                if self.ctxs.get(&id).is_some_and(|c| c.finished_ns == Some(f)) {
                    self.remove(id);
                }
            }
        }
        // Unfinished contexts start in creation order, give or take the event stream's disorder.
        // A finished one ahead stops the scan until the loop above drops it (at most
        // KEEP_FINISHED_NS later): on a 10-minute limit, that delay does not matter.
        while let Some(&id) = self.order.front() {
            match self.ctxs.get(&id) {
                None => {}
                Some(c) if c.finished_ns.is_none() && now_ns.saturating_sub(c.start.start_ns) > MAX_AGE_NS => {
                    self.remove(id)
                }
                Some(_) => break,
            }
            self.order.pop_front();
        }
        self.compact();
        // The per-thread and per-connection lists that emptied since the last sweep: kept until
        // now so that a thread's or connection's next request reuses the list's memory.
        self.threads.retain(|_, v| !v.is_empty());
        self.clients.retain(|_, q| !q.is_empty());
    }

    /// Drops stale entries of the queues once they outnumber the contexts (amortised O(1)).
    fn compact(&mut self) {
        let limit = 2 * self.ctxs.len() + 1024;
        let ctxs = &self.ctxs;
        if self.order.len() > limit {
            self.order.retain(|id| ctxs.contains_key(id));
        }
        for queue in [&mut self.finished, &mut self.finished_parents] {
            if queue.len() > limit {
                queue.retain(|(f, id)| ctxs.get(id).is_some_and(|c| c.finished_ns == Some(*f)));
            }
        }
    }

    /// The finish queue of contexts that parent a call, or of the others.
    fn finish_queue(&mut self, parents: bool) -> &mut VecDeque<(u64, u64)> {
        if parents { &mut self.finished_parents } else { &mut self.finished }
    }

    /// Makes room: the context that finished first goes (one that parents no call before one
    /// that does), else (all still open) the oldest.
    fn evict_oldest(&mut self) {
        for parents in [false, true] {
            while let Some((f, id)) = self.finish_queue(parents).pop_front() {
                if self.ctxs.get(&id).is_some_and(|c| c.finished_ns == Some(f)) {
                    self.remove(id);
                    self.evicted += 1;
                    return;
                }
            }
        }
        while let Some(id) = self.order.pop_front() {
            if self.ctxs.contains_key(&id) {
                self.remove(id);
                self.evicted += 1;
                return;
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(c) = self.ctxs.get(&id) {
            let (server, pid, tid, local, remote) =
                (c.start.server, c.start.pid, c.start.tid, c.start.local, c.start.remote);
            self.ctxs.delete(id);
            // Emptied lists stay until the sweep, as in `finish`.
            if server {
                if let Some(v) = self.threads.get_mut(&(pid, tid)) {
                    v.retain(|x| *x != id);
                }
            } else if let Some(q) = self.clients.get_mut(&(local, remote)) {
                q.retain(|x| *x != id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[127, 0, 0, 1]);
        (a, port)
    }

    fn start(pid: u32, tid: u32, server: bool, local: u16, remote: u16, ts: u64, tp: Option<&str>) -> RequestStart {
        RequestStart {
            pid,
            tid,
            server,
            local: ep(local),
            remote: ep(remote),
            start_ns: ts,
            traceparent: tp.map(Arc::from),
            tracestate: None,
            kernel: None,
        }
    }

    #[test]
    fn header_then_thread_then_connection() {
        let mut c = Correlator::new();
        // Service A (pid 1) receives a request with a traceparent on thread 11…
        let a = c.start(start(
            1,
            11,
            true,
            8080,
            50000,
            100,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ));
        // …and calls service B (pid 2) from the same thread.
        let call = c.start(start(1, 11, false, 40000, 9090, 200, None));
        // B's server side sees the mirrored tuple, slightly later.
        let b = c.start(start(2, 21, true, 9090, 40000, 210, None));
        let rb = c.finish(b, 300).unwrap();
        let rcall = c.finish(call, 310).unwrap();
        let ra = c.finish(a, 400).unwrap();
        assert_eq!(ra.source, ParentSource::Header);
        assert_eq!(ra.parent_span_id, Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]));
        assert_eq!(rcall.source, ParentSource::Thread);
        assert_eq!(rcall.trace_id, ra.trace_id);
        assert_eq!(rcall.parent_span_id, Some(ra.span_id));
        assert_eq!(rb.source, ParentSource::Connection);
        assert_eq!(rb.trace_id, ra.trace_id);
        assert_eq!(rb.parent_span_id, Some(rcall.span_id));
        assert!(!rcall.uncertain);
    }

    #[test]
    fn emptied_thread_lists_are_reused_then_swept() {
        let mut c = Correlator::new();
        let a = c.start(start(1, 11, true, 8080, 50000, 100, None));
        c.finish(a, 150);
        // Kept, empty, for the thread's next request: it reads as "no current request".
        assert!(c.threads.get(&(1, 11)).is_some_and(Vec::is_empty));
        assert_eq!(c.current_server(1, 11), None);
        let call = c.start(start(1, 11, false, 40000, 9090, 200, None));
        assert_eq!(c.finish(call, 210).unwrap().source, ParentSource::None);
        let b = c.start(start(1, 11, true, 8080, 50000, 300, None));
        assert_eq!(c.current_server(1, 11).map(|(id, _)| id), Some(b));
        c.finish(b, 350);
        c.sweep(400);
        assert!(!c.threads.contains_key(&(1, 11)), "the sweep drops emptied lists");
    }

    #[test]
    fn thread_forgets_finished_request_and_flags_ambiguity() {
        let mut c = Correlator::new();
        let a = c.start(start(1, 11, true, 8080, 50000, 100, None));
        c.finish(a, 150);
        let late = c.start(start(1, 11, false, 40000, 9090, 200, None));
        let r = c.finish(late, 210).unwrap();
        assert_eq!(r.source, ParentSource::None, "no merging into a finished request's trace");
        // Event loop: two requests open on one thread.
        let x = c.start(start(1, 11, true, 8080, 50001, 300, None));
        let y = c.start(start(1, 11, true, 8080, 50002, 301, None));
        let call = c.start(start(1, 11, false, 40001, 9090, 302, None));
        let r = c.finish(call, 310).unwrap();
        assert_eq!(r.source, ParentSource::Thread);
        assert!(r.uncertain);
        assert_eq!(r.parent_span_id, Some(c.resolve(y).unwrap().span_id));
        let _ = c.finish(x, 320);
    }

    #[test]
    fn claim_server_is_fifo_per_kind_on_an_event_loop() {
        const PG: u8 = 1;
        const REDIS: u8 = 2;
        let mut c = Correlator::new();
        // Thread per request: the one open request, certain, however many calls it makes.
        let t = c.start(start(1, 5, true, 8080, 50000, 10, None));
        assert_eq!(c.claim_server(1, 5, PG), Some((t, false)));
        assert_eq!(c.claim_server(1, 5, PG), Some((t, false)));
        assert_eq!(c.claim_server(1, 6, PG), None, "another thread serves nothing");
        // Event loop: a, b, d arrive; a's query is written before b arrives.
        let a = c.start(start(1, 11, true, 8080, 50001, 100, None));
        assert_eq!(c.claim_server(1, 11, PG), Some((a, false)));
        let b = c.start(start(1, 11, true, 8080, 50002, 101, None));
        let d = c.start(start(1, 11, true, 8080, 50003, 102, None));
        // b waited for a pooled connection: its query comes after d arrived. Oldest without one.
        assert_eq!(c.claim_server(1, 11, PG), Some((b, true)));
        // Another kind is counted apart: a is the oldest without a Redis call.
        assert_eq!(c.claim_server(1, 11, REDIS), Some((a, true)));
        assert_eq!(c.claim_server(1, 11, PG), Some((d, true)));
        // Everyone has made one: the most recent.
        assert_eq!(c.claim_server(1, 11, PG), Some((d, true)));
        // a answered: b is the oldest open one, and it already made its query.
        c.finish(a, 200);
        let e = c.start(start(1, 11, true, 8080, 50004, 201, None));
        assert_eq!(c.claim_server(1, 11, PG), Some((e, true)));
        c.finish(b, 210);
        c.finish(d, 211);
        assert_eq!(c.claim_server(1, 11, PG), Some((e, false)), "one open request: certain again");
    }

    #[test]
    fn unsampled_propagates_and_malformed_is_flagged() {
        let mut c = Correlator::new();
        let a = c.start(start(1, 1, true, 80, 5, 1, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")));
        let call = c.start(start(1, 1, false, 6, 90, 2, None));
        assert!(!c.finish(call, 3).unwrap().sampled);
        assert!(!c.finish(a, 4).unwrap().sampled);
        let m = c.start(start(1, 2, true, 80, 7, 5, Some("nonsense")));
        let r = c.finish(m, 6).unwrap();
        assert!(r.malformed_header && r.source == ParentSource::None && r.sampled);
    }

    #[test]
    fn bounded_and_expiring() {
        let mut c = Correlator::new();
        let a = c.start(start(1, 1, true, 80, 5, 1, None));
        c.finish(a, 10);
        c.sweep(10 + KEEP_FINISHED_NS + 1);
        assert!(c.is_empty());
        for i in 0..(MAX_CONTEXTS + 10) {
            c.start(start(1, i as u32, true, 80, 5, 1, None));
        }
        assert_eq!(c.len(), MAX_CONTEXTS);
        assert_eq!(c.evicted, 10);
    }

    #[test]
    fn a_full_table_evicts_finished_before_open() {
        let mut c = Correlator::new();
        // The oldest context is a long request still open; then a flood of short ones.
        let long = c.start(start(1, 1, true, 80, 5, 1, None));
        for i in 0..(3 * MAX_CONTEXTS) {
            let id = c.start(start(1, 2 + i as u32, true, 80, 6, 2 + i as u64, None));
            c.finish(id, 10 + i as u64);
        }
        assert!(c.ctxs.contains_key(&long), "the open request survives the flood");
        assert_eq!(c.len(), MAX_CONTEXTS);
        // With every context open, the oldest open one goes.
        let mut c = Correlator::new();
        let first = c.start(start(1, 1, true, 80, 5, 1, None));
        for i in 0..MAX_CONTEXTS {
            c.start(start(1, 2 + i as u32, true, 80, 6, 2, None));
        }
        assert!(!c.ctxs.contains_key(&first));
        assert_eq!(c.evicted, 1);
    }

    #[test]
    fn sweep_expires_finished_by_finish_time_and_unfinished_by_age() {
        let mut c = Correlator::new();
        let old = c.start(start(1, 1, true, 80, 5, 1, None));
        let a = c.start(start(1, 2, true, 80, 6, 2, None));
        let b = c.start(start(1, 3, true, 80, 7, 3, None));
        c.finish(b, 100);
        c.finish(a, 200);
        // b is due, a is not: b goes though it was created after both others.
        c.sweep(100 + KEEP_FINISHED_LEAF_NS + 1);
        assert!(c.ctxs.contains_key(&old) && c.ctxs.contains_key(&a) && !c.ctxs.contains_key(&b));
        c.sweep(200 + KEEP_FINISHED_LEAF_NS);
        assert!(c.ctxs.contains_key(&a), "kept KEEP_FINISHED_LEAF_NS after its finish, not less");
        c.sweep(200 + KEEP_FINISHED_LEAF_NS + 1);
        assert!(!c.ctxs.contains_key(&a));
        assert!(c.ctxs.contains_key(&old), "unfinished: kept until MAX_AGE_NS");
        c.sweep(1 + MAX_AGE_NS);
        assert!(c.ctxs.contains_key(&old));
        c.sweep(1 + MAX_AGE_NS + 1);
        assert!(c.is_empty());
        assert!(c.order.is_empty() && c.finished.is_empty());
    }

    #[test]
    fn a_context_that_parents_a_call_is_kept_longer_and_its_late_call_still_joins_it() {
        let mut c = Correlator::new();
        // An HTTP server request that makes an HTTP call, one that makes a database call, and
        // one that makes none; all three finish at 1000, the two calls end much later.
        let http_parent = c.start(start(1, 1, true, 8080, 50000, 100, None));
        let call = c.start(start(1, 1, false, 40000, 9090, 200, None));
        let db_parent = c.start(start(1, 2, true, 8080, 50001, 100, None));
        assert_eq!(c.claim_server(1, 2, 1), Some((db_parent, false)));
        let leaf = c.start(start(1, 3, true, 8080, 50002, 100, None));
        let parent_trace = c.finish(http_parent, 1000).unwrap().trace_id;
        c.finish(db_parent, 1000);
        c.finish(leaf, 1000);
        c.sweep(1000 + KEEP_FINISHED_LEAF_NS + 1);
        assert!(!c.ctxs.contains_key(&leaf), "a leaf goes after KEEP_FINISHED_LEAF_NS");
        assert!(c.ctxs.contains_key(&http_parent) && c.ctxs.contains_key(&db_parent));
        // The call ends after the leaf keep time: it still resolves into its parent's trace.
        let r = c.finish(call, 1000 + KEEP_FINISHED_LEAF_NS + 2).unwrap();
        assert_eq!((r.trace_id, r.source), (parent_trace, ParentSource::Thread));
        assert!(c.resolve(db_parent).is_some());
        c.sweep(1000 + KEEP_FINISHED_NS);
        assert!(c.ctxs.contains_key(&http_parent) && c.ctxs.contains_key(&db_parent), "not less");
        c.sweep(1000 + KEEP_FINISHED_NS + 1);
        assert!(!c.ctxs.contains_key(&http_parent) && !c.ctxs.contains_key(&db_parent));
        // A full table evicts leaves before parents, whatever finished first.
        let mut c = Correlator::new();
        let p = c.start(start(1, 1, true, 8080, 50000, 1, None));
        c.start(start(1, 1, false, 40000, 9090, 2, None));
        c.finish(p, 3);
        let l = c.start(start(1, 2, true, 8080, 50001, 4, None));
        c.finish(l, 5);
        c.evict_oldest();
        assert!(c.ctxs.contains_key(&p) && !c.ctxs.contains_key(&l));
    }

    #[test]
    fn slab_reuses_slots_and_never_answers_a_stale_id() {
        let mut s: Slab<u32> = Slab::default();
        let a = s.insert(1);
        let b = s.insert(2);
        assert_eq!((s.get(&a), s.get(&b), s.len()), (Some(&1), Some(&2), 2));
        s.delete(a);
        s.delete(a); // twice: no effect
        assert_eq!((s.get(&a), s.len()), (None, 1));
        // The freed slot is reused first, under a new generation: the old id stays dead.
        let c = s.insert(3);
        assert_eq!(c as u32, a as u32);
        assert_ne!(c, a);
        assert_eq!((s.get(&a), s.get(&c), s.get(&b)), (None, Some(&3), Some(&2)));
        *s.get_mut(&c).unwrap() = 4;
        assert_eq!(s.get(&c), Some(&4));
        assert!(s.get_mut(&a).is_none() && !s.contains_key(&a));
        assert_eq!(s.iter().map(|(id, v)| (id, *v)).collect::<Vec<_>>(), vec![(c, 4), (b, 2)]);
        s.delete(b);
        s.delete(c);
        assert!(s.is_empty());
        assert!(s.get(&(1u64 << 40 | 99)).is_none(), "an id past the slots");
        // Across chunks: ids stay valid while the slab grows, and freed slots are reused first.
        let ids: Vec<u64> = (0..3 * SLAB_CHUNK as u32).map(|v| s.insert(v)).collect();
        assert_eq!(s.chunks.len(), 3);
        assert!(ids.iter().enumerate().all(|(v, id)| s.get(id) == Some(&(v as u32))));
        s.delete(ids[SLAB_CHUNK + 5]);
        let again = s.insert(7);
        assert_eq!(again as u32, ids[SLAB_CHUNK + 5] as u32);
        assert_eq!((s.chunks.len(), s.get(&again), s.get(&ids[SLAB_CHUNK + 5])), (3, Some(&7), None));
        let next = s.insert(8);
        assert_eq!((next as u32 as usize, s.chunks.len()), (3 * SLAB_CHUNK, 4));
    }

    #[test]
    fn sweep_drops_what_is_due_and_nothing_else() {
        // A random workload with time going forward: after each sweep no finished context is
        // past its keep time, and every context dropped by a sweep was due.
        let mut c = Correlator::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut open: Vec<u64> = Vec::new();
        let mut now = 0u64;
        for _ in 0..20_000 {
            now += next(100_000_000);
            match next(3) {
                0 | 1 => open.push(c.start(start(1, next(8) as u32, next(2) == 0, 80, 5, now, None))),
                _ if !open.is_empty() => {
                    let id = open.swap_remove(next(open.len() as u64) as usize);
                    c.finish(id, now);
                }
                _ => {}
            }
            if next(20) == 0 {
                let before: Vec<(u64, Option<u64>, u64, bool)> =
                    c.ctxs.iter().map(|(id, x)| (id, x.finished_ns, x.start.start_ns, x.parents_a_call())).collect();
                c.sweep(now);
                for (id, finished, started, parent) in before {
                    let keep = if parent { KEEP_FINISHED_NS } else { KEEP_FINISHED_LEAF_NS };
                    let due = match finished {
                        Some(f) => now - f > keep,
                        None => now - started > MAX_AGE_NS,
                    };
                    if finished.is_some() {
                        assert_eq!(c.ctxs.contains_key(&id), !due, "finished context {id}");
                    } else if !due {
                        assert!(c.ctxs.contains_key(&id), "unfinished context {id} dropped early");
                    }
                }
            }
        }
    }

    #[test]
    fn queues_stay_bounded_behind_a_long_request() {
        let mut c = Correlator::new();
        let long = c.start(start(1, 1, true, 80, 5, 0, None));
        for i in 1..10_000u64 {
            let id = c.start(start(1, 2, true, 80, 6, i, None));
            c.finish(id, i);
            c.sweep(i + KEEP_FINISHED_NS + 1);
            assert!(c.order.len() <= 2 * c.len() + 1024 && c.finished.len() <= 2 * c.len() + 1024);
            assert!(c.finished_parents.is_empty());
        }
        assert_eq!(c.len(), 1);
        assert!(c.ctxs.contains_key(&long));
        // Finished again (a re-resolved exchange): the newer time counts.
        let x = c.start(start(1, 3, true, 80, 7, 20_000, None));
        c.finish(x, 20_000);
        c.finish(x, 30_000);
        c.sweep(20_000 + KEEP_FINISHED_LEAF_NS + 1);
        assert!(c.ctxs.contains_key(&x));
        c.sweep(30_000 + KEEP_FINISHED_LEAF_NS + 1);
        assert!(!c.ctxs.contains_key(&x));
    }
}
