//! Turns finished exchanges into spans: names, semantic-convention attributes, status, ids and
//! the parent link. Trace membership and parents come from `context.rs` (rules documented there);
//! an unsampled incoming trace produces no spans (counted in `waybill_spans_unsampled_total`).

pub mod context;
pub mod span;

use std::{borrow::Cow, fmt::Write as _, net::IpAddr, sync::Arc};

// FxHash: the tables below are keyed by integers (connection ids, pids, fds, ports, kernel
// timestamps), looked up per request.
use rustc_hash::{FxHashMap, FxHashSet};

use waybill_common::{AF_INET, AF_INET6, Tuple};
use waybill_protocols::{
    db::{DbCall, DbSystem},
    http1::{self, HttpExchange},
};

use crate::{
    clock::Clock,
    conn::{ConnMeta, Finished, Role},
    metrics::Metrics,
    process::Resources,
};
use context::{Correlator, Endpoint, KernelIds, RequestStart, Resolved};
use span::{Attr, AttrStr, AttrValue, ParentSource, SpanKind, SpanRecord, SpanStatus};
use waybill_common::{CTX_FROM_HEADER, CTX_HAS_PARENT, CTX_SAMPLED, CtxTrailer, InjectEvent};

/// `m` if the HTTP semantic conventions name it (others become `_OTHER`): a match compiles to a
/// comparison of lengths and words, not a string comparison per method.
fn semconv_method(m: &str) -> Option<&'static str> {
    Some(match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "PATCH" => "PATCH",
        "QUERY" => "QUERY",
        _ => return None,
    })
}

pub fn ip(t: &Tuple, local: bool) -> Option<IpAddr> {
    let a = if local { &t.laddr } else { &t.raddr };
    match t.family {
        AF_INET => Some(IpAddr::from([a[0], a[1], a[2], a[3]])),
        AF_INET6 => {
            let v6 = std::net::Ipv6Addr::from(*a);
            Some(v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)))
        }
        _ => None,
    }
}

/// Splits a Host header into host and optional port (IPv6 literals in brackets kept whole).
fn split_host(h: &str) -> (&str, Option<u16>) {
    let h = h.trim();
    if let Some(rest) = h.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    // Byte searches: ':' is ASCII, so the cut is a char boundary.
    match memchr::memrchr(b':', h.as_bytes()) {
        Some(i) if memchr::memchr(b':', &h.as_bytes()[..i]).is_none() => (&h[..i], h[i + 1..].parse().ok()),
        _ => (h, None),
    }
}

/// `ip.to_string()`, without the formatting machinery for IPv4 (every span formats one or two).
fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
            s
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// A semantic-convention attribute: the key is static, so it costs no allocation.
fn attr(k: &'static str, v: impl Into<AttrValue>) -> Attr {
    (Cow::Borrowed(k), v.into())
}

fn push_opt(a: &mut Vec<Attr>, k: &'static str, v: Option<impl Into<AttrValue>>) {
    if let Some(v) = v {
        a.push(attr(k, v));
    }
}

fn request_start(
    meta: &ConnMeta,
    start_ns: u64,
    traceparent: Option<Arc<str>>,
    tracestate: Option<Arc<str>>,
) -> RequestStart {
    RequestStart {
        pid: meta.pid,
        tid: meta.tid,
        server: meta.role != Role::Client,
        local: endpoint(&meta.tuple, true),
        remote: endpoint(&meta.tuple, false),
        start_ns,
        traceparent,
        tracestate,
        kernel: None,
    }
}

/// Bounds of the tables of kernel-decided ids waiting for their request head.
const MAX_PENDING_KERNEL: usize = 16384;
const MAX_INJECTIONS_PER_CONN: usize = 16;
/// Bounds of the database writes waiting for their reply (per connection, connections).
const MAX_DB_SENDS_PER_CONN: usize = 16;
const MAX_DB_CONNS: usize = 16384;
/// A write this soon after an unanswered one on the same database connection continues it or is
/// pipelined behind it: it belongs to the same request.
const DB_AFFINITY_NS: u64 = 50_000_000;

/// A database write and the server request it was attributed to when it was written:
/// (timestamp, server context, uncertain).
type DbClaim = (u64, Option<u64>, bool);

/// Writes of one database connection whose reply has not been parsed yet.
#[derive(Default)]
struct DbSends {
    q: std::collections::VecDeque<DbClaim>,
    /// The newest claim already matched (pipelined calls of one write share it).
    last: Option<DbClaim>,
    active_ns: u64,
}

fn call_kind(system: DbSystem) -> u8 {
    match system {
        DbSystem::Postgresql => 1,
        DbSystem::Redis => 2,
    }
}

pub struct Stitcher {
    clock: Clock,
    pub resources: Resources,
    corr: Correlator,
    /// (connection id, request sequence number) → context id.
    ctx_of: FxHashMap<(u64, u64), u64>,
    /// (pid, fd, timestamp of the read) → the ids the kernel decided for the request it starts.
    server_ids: FxHashMap<(u32, u32, u64), KernelIds>,
    /// (pid, local port, remote port) → injections not yet claimed by a client request head.
    injections: FxHashMap<(u32, u16, u16), std::collections::VecDeque<(u64, KernelIds)>>,
    /// Connection id → database writes not yet answered, with the request each was claimed by.
    db_sends: FxHashMap<u64, DbSends>,
    /// Address and host texts of span attributes, interned.
    texts: Texts,
    /// Also set the attributes the semantic conventions mark Opt-In (`--opt-in-attributes`).
    opt_in: bool,
}

/// Distinct addresses, distinct `Host` names and distinct span names, interned at most (each lives as long as the
/// agent); past that, a new one is formatted or copied for every span.
const MAX_INTERNED: usize = 4096;
/// Longest `Host` name interned (the header is the client's to choose: with this cap the
/// interned names hold at most 4096 × 64 B); longer ones are copied per span.
const MAX_INTERNED_HOST: usize = 64;
/// Longest HTTP span name interned ("METHOD route": at most 4096 × 128 B held). The route is
/// the low-cardinality template (ids become `{id}`), so a service has a few dozen; a client
/// that sends thousands of distinct word paths fills the table, after which new names are
/// allocated per span, as before interning.
const MAX_INTERNED_NAME: usize = 128;

/// The texts a span names its ends with (`client.address`, `network.peer.address`,
/// `server.address`), and HTTP server span names: a service talks to a few addresses and is called under a few host names
/// again and again, and each span would otherwise format or copy the same text two or three
/// times. Interned texts are `&'static` (leaked once), so attributes borrow them for free.
#[derive(Default)]
struct Texts {
    addrs: FxHashMap<IpAddr, &'static str>,
    hosts: FxHashSet<&'static str>,
    /// HTTP span names ("GET /users/{id}").
    names: FxHashSet<&'static str>,
    /// Where a span name is put together before it is looked up.
    scratch: String,
    /// The last two addresses asked for (a span names both ends of its connection), checked
    /// before the table.
    recent: [Option<(IpAddr, &'static str)>; 2],
    next: usize,
}

impl Texts {
    fn addr(&mut self, ip: IpAddr) -> AttrStr {
        for (a, s) in self.recent.iter().flatten() {
            if *a == ip {
                return Cow::Borrowed(s);
            }
        }
        let s = match self.addrs.get(&ip) {
            Some(&s) => s,
            None => {
                let text = ip_text(ip);
                if self.addrs.len() >= MAX_INTERNED {
                    return Cow::Owned(text);
                }
                let s: &'static str = Box::leak(text.into_boxed_str());
                self.addrs.insert(ip, s);
                s
            }
        };
        self.recent[self.next] = Some((ip, s));
        self.next ^= 1;
        Cow::Borrowed(s)
    }

    /// A span name (see [`MAX_INTERNED_NAME`]).
    fn name(&mut self, n: &str) -> AttrStr {
        intern(&mut self.names, n, MAX_INTERNED_NAME)
    }

    fn host(&mut self, h: &str) -> AttrStr {
        intern(&mut self.hosts, h, MAX_INTERNED_HOST)
    }
}

/// `text` borrowed from `set`, added to it (leaked, kept for the agent's life) if new, while the
/// set holds fewer than [`MAX_INTERNED`] texts and `text` is at most `max_len` bytes; otherwise
/// a copy of its own.
fn intern(set: &mut FxHashSet<&'static str>, text: &str, max_len: usize) -> AttrStr {
    if let Some(s) = set.get(text) {
        return Cow::Borrowed(s);
    }
    if set.len() >= MAX_INTERNED || text.len() > max_len {
        return Cow::Owned(text.to_string());
    }
    let s: &'static str = Box::leak(text.into());
    set.insert(s);
    Cow::Borrowed(s)
}

/// A connection end as the correlator compares it: an IPv4-mapped IPv6 address (a dual-stack
/// socket, e.g. every JVM server) is stored like the IPv4 address its peer's socket reports.
fn endpoint(t: &Tuple, local: bool) -> Endpoint {
    let (a, port) = if local { (t.laddr, t.lport) } else { (t.raddr, t.rport) };
    if t.family == AF_INET6 && a[..10] == [0; 10] && a[10..12] == [0xff, 0xff] {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&a[12..16]);
        return (v4, port);
    }
    (a, port)
}

impl Stitcher {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            resources: Resources::new(),
            corr: Correlator::new(),
            ctx_of: FxHashMap::default(),
            server_ids: FxHashMap::default(),
            injections: FxHashMap::default(),
            db_sends: FxHashMap::default(),
            texts: Texts::default(),
            opt_in: false,
        }
    }

    /// With `on`, spans also carry the attributes the semantic conventions mark Opt-In, which
    /// instrumentations set only when the operator asks: `client.port`, `network.transport`,
    /// `network.protocol.name = http`, `http.request.body.size`, `http.response.body.size`, and
    /// `user_agent.original` on CLIENT spans. Off by default (each costs bytes on every span, in
    /// the agent, the collector and the backend).
    pub fn set_opt_in_attributes(&mut self, on: bool) {
        self.opt_in = on;
    }

    /// The kernel decided the ids of the server request that starts in the data record read by
    /// process `tgid` on `fd` at `ts_ns` (the record that carried them).
    pub fn on_server_ctx(&mut self, tgid: u32, fd: u32, ts_ns: u64, ev: &CtxTrailer, m: &Metrics) {
        if self.server_ids.len() >= MAX_PENDING_KERNEL {
            // Records whose request head never came (parser bound, lost data record).
            m.inject_unmatched.add(self.server_ids.len() as u64);
            self.server_ids.clear();
        }
        let from_header = ev.flags & CTX_FROM_HEADER != 0;
        self.server_ids.insert(
            (tgid, fd, ts_ns),
            KernelIds {
                trace_id: ev.trace_id,
                span_id: ev.span_id,
                parent_span_id: from_header.then_some(ev.parent_span_id),
                sampled: ev.flags & CTX_SAMPLED != 0,
                from_header,
                injected: false,
            },
        );
    }

    /// The kernel inserted a traceparent into a request the traced process is sending.
    pub fn on_inject(&mut self, ev: &InjectEvent, m: &Metrics) {
        let key = (ev.hdr.tgid, ev.tuple.lport, ev.tuple.rport);
        if !self.injections.contains_key(&key) && self.injections.len() >= MAX_PENDING_KERNEL {
            m.inject_unmatched.add(self.injections.values().map(|q| q.len() as u64).sum());
            self.injections.clear();
        }
        let q = self.injections.entry(key).or_default();
        if q.len() >= MAX_INJECTIONS_PER_CONN {
            q.pop_front();
            m.inject_unmatched.inc();
        }
        q.push_back((
            ev.hdr.ts_ns,
            KernelIds {
                trace_id: ev.trace_id,
                span_id: ev.span_id,
                parent_span_id: (ev.flags & CTX_HAS_PARENT != 0).then_some(ev.parent_span_id),
                sampled: ev.flags & CTX_SAMPLED != 0,
                from_header: false,
                injected: true,
            },
        ));
    }

    /// Kernel ids for a request head seen now.
    fn kernel_ids(&mut self, meta: &ConnMeta, start_ns: u64, m: &Metrics) -> Option<KernelIds> {
        if meta.role == Role::Client {
            let key = (meta.pid, meta.tuple.lport, meta.tuple.rport);
            let q = self.injections.get_mut(&key)?;
            // The injection happened inside the send of this head's first bytes: the newest one
            // not later than the head. Older ones were never claimed.
            let mut found = None;
            while let Some((ts, _)) = q.front() {
                if *ts > start_ns {
                    break;
                }
                if let Some(prev) = found.replace(q.pop_front().expect("front exists").1) {
                    let _ = prev;
                    m.inject_unmatched.inc();
                }
            }
            if q.is_empty() {
                self.injections.remove(&key);
            }
            found
        } else {
            self.server_ids.remove(&(meta.pid, meta.fd, start_ns))
        }
    }

    /// Takes one event from the connection table; returns a span when an exchange finished and
    /// must be exported.
    pub fn span(&mut self, f: Finished, m: &Metrics) -> Option<SpanRecord> {
        match f {
            Finished::HttpStart { meta, seq, traceparent, tracestate, start_ns } => {
                let mut start = request_start(&meta, start_ns, traceparent, tracestate);
                start.kernel = self.kernel_ids(&meta, start_ns, m);
                let id = self.corr.start(start);
                self.ctx_of.insert((meta.conn_id, seq), id);
                None
            }
            Finished::Http(meta, seq, ex) => self.http_span(&meta, seq, ex, m),
            Finished::Db(meta, call) => self.db_span(&meta, call, m),
            Finished::DbSend { meta, system, ts_ns } => {
                self.on_db_send(&meta, system, ts_ns);
                None
            }
        }
    }

    /// A database write by a client: the thread rule is applied now, while the requests open on
    /// the thread are those open when the query left (the reply may come after others opened).
    fn on_db_send(&mut self, meta: &ConnMeta, system: DbSystem, ts_ns: u64) {
        if meta.role != Role::Client {
            return;
        }
        if !self.db_sends.contains_key(&meta.conn_id) && self.db_sends.len() >= MAX_DB_CONNS {
            self.db_sends.clear();
        }
        let st = self.db_sends.entry(meta.conn_id).or_default();
        st.active_ns = ts_ns;
        let claim = match st.q.back() {
            Some(&(ts, ctx, uncertain)) if ts_ns.saturating_sub(ts) < DB_AFFINITY_NS => (ts_ns, ctx, uncertain),
            _ => match self.corr.claim_server(meta.pid, meta.tid, call_kind(system)) {
                Some((ctx, uncertain)) => (ts_ns, Some(ctx), uncertain),
                None => (ts_ns, None, false),
            },
        };
        st.q.push_back(claim);
        if st.q.len() > MAX_DB_SENDS_PER_CONN {
            st.q.pop_front();
        }
    }

    /// The claim made when the call's first bytes were written (None: that write was not seen).
    fn db_claim(&mut self, conn_id: u64, start_ns: u64, end_ns: u64) -> Option<(Option<u64>, bool)> {
        let st = self.db_sends.get_mut(&conn_id)?;
        let mut chosen = None;
        while let Some(&e) = st.q.front().filter(|e| e.0 <= start_ns) {
            chosen = Some(e);
            st.q.pop_front();
        }
        let chosen = chosen.or(st.last.filter(|l| l.0 <= start_ns));
        if let Some(c) = chosen {
            st.last = Some(c);
        }
        // Writes before this reply ended continued this call or were pipelined behind it.
        while let Some(&e) = st.q.front().filter(|e| e.0 <= end_ns) {
            st.last = Some(e);
            st.q.pop_front();
        }
        chosen.map(|c| (c.1, c.2))
    }

    /// Parent of a database call: the server request its thread was serving when the call was
    /// written (client side; claimed in `on_db_send`), or a new trace (server side, i.e. the
    /// traced process is PostgreSQL or Redis).
    fn db_context(&mut self, meta: &ConnMeta, call: &DbCall) -> Resolved {
        let (parent, uncertain) = match meta.role {
            Role::Client => match self.db_claim(meta.conn_id, call.start_ns, call.end_ns) {
                Some(claim) => claim,
                None => self.corr.current_server(meta.pid, meta.tid).map_or((None, false), |(p, u)| (Some(p), u)),
            },
            _ => (None, false),
        };
        let mut r = Resolved::root(crate::ids::trace_id(), crate::ids::span_id());
        if let Some(p) = parent.and_then(|p| self.corr.resolve(p)) {
            r.trace_id = p.trace_id;
            r.parent_span_id = Some(p.span_id);
            r.sampled = p.sampled;
            r.trace_state = p.trace_state;
            r.source = ParentSource::Thread;
            r.uncertain = uncertain;
        }
        r
    }

    fn db_span(&mut self, meta: &ConnMeta, call: DbCall, m: &Metrics) -> Option<SpanRecord> {
        let server = meta.role == Role::Server;
        let ctx = self.db_context(meta, &call);
        if !Self::admit(&ctx, m) {
            return None;
        }
        let system = call.system.as_str();
        let name: AttrStr = call.summary.as_deref().or(call.operation.as_deref()).unwrap_or(system).to_string().into();
        let DbCall {
            operation,
            collection,
            query_text,
            summary,
            namespace,
            status_code,
            error_message,
            rows,
            batch_size,
            start_ns,
            end_ns,
            approximate,
            ..
        } = call;
        let mut a = span::attr_list(16);
        a.push(attr("db.system.name", system));
        push_opt(&mut a, "db.operation.name", operation);
        push_opt(&mut a, "db.collection.name", collection);
        push_opt(&mut a, "db.query.text", query_text);
        push_opt(&mut a, "db.query.summary", summary);
        push_opt(&mut a, "db.namespace", namespace);
        push_opt(&mut a, "db.response.status_code", status_code.clone());
        if let Some(n) = rows {
            a.push(attr("db.response.returned_rows", n as i64));
        }
        if let Some(n) = batch_size {
            a.push(attr("db.operation.batch.size", n as i64));
        }
        // The server is the remote end for a client, this process for a server.
        let remote = ip(&meta.tuple, false).map(|i| self.texts.addr(i));
        let (srv, srv_port) = if server {
            (ip(&meta.tuple, true).map(|i| self.texts.addr(i)), meta.tuple.lport)
        } else {
            (remote.clone(), meta.tuple.rport)
        };
        if let Some(s) = srv {
            a.push(attr("server.address", s));
            a.push(attr("server.port", srv_port as i64));
        }
        if let Some(p) = remote {
            if server {
                a.push(attr("network.peer.address", p.clone()));
                a.push(attr("network.peer.port", meta.tuple.rport as i64));
                a.push(attr("client.address", p));
                if self.opt_in {
                    a.push(attr("client.port", meta.tuple.rport as i64));
                }
            } else {
                a.push(attr("network.peer.address", p));
                a.push(attr("network.peer.port", meta.tuple.rport as i64));
            }
        }
        if self.opt_in {
            a.push(attr("network.transport", "tcp"));
        }
        if meta.tls {
            a.push(attr("tls.protocol.name", "tls"));
        }
        if approximate {
            a.push(attr("waybill.timing.approximate", true));
        }
        let status = match (status_code, error_message) {
            (Some(code), msg) => {
                let msg = msg.unwrap_or_else(|| code.clone());
                a.push(attr("error.type", code));
                SpanStatus::Error(msg)
            }
            (None, Some(msg)) => SpanStatus::Error(msg),
            (None, None) => SpanStatus::Unset,
        };
        Some(self.record(meta, ctx, m, name, (start_ns, end_ns.max(start_ns)), a, status))
    }

    /// Whether a span with this context is exported (the caller's sampled flag), counting its
    /// parent provenance if so.
    fn admit(ctx: &Resolved, m: &Metrics) -> bool {
        if !ctx.sampled {
            m.spans_unsampled.inc();
            return false;
        }
        match ctx.source {
            ParentSource::None => m.parent_source_none.inc(),
            ParentSource::Header => m.parent_source_header.inc(),
            ParentSource::Thread => m.parent_source_thread.inc(),
            ParentSource::Connection => m.parent_source_connection.inc(),
        }
        true
    }

    /// The finished span: the context's ids, the process's resource, wall-clock times of the
    /// kernel timestamps `(start, end)`; an ambiguous parent is flagged and counted.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        meta: &ConnMeta,
        ctx: Resolved,
        m: &Metrics,
        name: AttrStr,
        (start_ns, end_ns): (u64, u64),
        mut attributes: Vec<Attr>,
        status: SpanStatus,
    ) -> SpanRecord {
        if ctx.uncertain {
            m.parent_uncertain.inc();
            attributes.push(attr("waybill.parent.uncertain", true));
        }
        m.spans_created.inc();
        SpanRecord {
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            parent_span_id: ctx.parent_span_id,
            trace_state: ctx.trace_state,
            sampled: ctx.sampled,
            name,
            kind: if meta.role == Role::Server { SpanKind::Server } else { SpanKind::Client },
            start_unix_ns: self.clock.to_unix_ns(start_ns),
            end_unix_ns: self.clock.to_unix_ns(end_ns),
            attributes,
            status,
            parent_source: ctx.source,
            resource: self.resources.get(meta.pid),
        }
    }

    /// Periodic clean-up of request contexts.
    pub fn sweep(&mut self, now_ns: u64, m: &Metrics) {
        self.corr.sweep(now_ns);
        m.contexts_evicted.set(self.corr.evicted);
        // Kernel ids older than a minute never met their head.
        let before = self.server_ids.len();
        self.server_ids.retain(|(_, _, ts), _| now_ns.saturating_sub(*ts) < 60_000_000_000);
        m.inject_unmatched.add((before - self.server_ids.len()) as u64);
        let mut dropped = 0u64;
        self.injections.retain(|_, q| {
            let n = q.len();
            q.retain(|(ts, _)| now_ns.saturating_sub(*ts) < 60_000_000_000);
            dropped += (n - q.len()) as u64;
            !q.is_empty()
        });
        m.inject_unmatched.add(dropped);
        self.db_sends.retain(|_, st| now_ns.saturating_sub(st.active_ns) < 60_000_000_000);
        // Heads whose exchange never came (dropped by a parser bound) would otherwise pile up.
        if self.ctx_of.len() > 2 * self.corr.len() + 1024 {
            self.ctx_of.clear();
        }
    }

    /// A process exited.
    pub fn forget(&mut self, pid: u32) {
        self.resources.forget(pid);
        self.corr.forget_process(pid);
    }

    /// The context of an exchange: the one registered at its head, or one made now.
    fn resolve(&mut self, meta: &ConnMeta, seq: u64, ex: &HttpExchange) -> Resolved {
        let req = &ex.request;
        let id = self.ctx_of.remove(&(meta.conn_id, seq)).unwrap_or_else(|| {
            self.corr.start(request_start(meta, ex.request_start_ns, req.traceparent.clone(), req.tracestate.clone()))
        });
        let end = ex.response_end_ns.max(ex.request_end_ns);
        match self.corr.finish(id, end) {
            Some(r) => r,
            None => {
                // Expired while in flight (a very long request): resolve it afresh.
                let id = self.corr.start(request_start(meta, ex.request_start_ns, req.traceparent.clone(), None));
                self.corr.finish(id, end).expect("just created")
            }
        }
    }

    fn http_span(&mut self, meta: &ConnMeta, seq: u64, ex: HttpExchange, m: &Metrics) -> Option<SpanRecord> {
        let server = meta.role != Role::Client;
        // The context first: an exchange that is not exported builds no attributes.
        let ctx = self.resolve(meta, seq, &ex);
        if ctx.malformed_header {
            m.traceparent_malformed.inc();
        }
        if ctx.kernel_mismatch {
            m.kernel_context_mismatch.inc();
        }
        if !Self::admit(&ctx, m) {
            return None;
        }
        let end = if ex.response_end_ns != 0 { ex.response_end_ns } else { ex.request_end_ns.max(ex.request_start_ns) };
        let (start, approximate) = (ex.request_start_ns, ex.approximate);
        // The exchange is ours: its strings move into the attributes instead of being copied.
        let HttpExchange { request: req, response, .. } = ex;
        let known = semconv_method(&req.method);
        let method = known.unwrap_or("_OTHER");
        let name = if server {
            // "METHOD route": few distinct values per service, interned (no allocation per span).
            let mut n = std::mem::take(&mut self.texts.scratch);
            n.clear();
            n.push_str(method);
            n.push(' ');
            http1::push_path_template(&mut n, &req.path);
            let name = self.texts.name(&n);
            self.texts.scratch = n;
            name
        } else {
            Cow::Borrowed(method)
        };
        let mut a = span::attr_list(20);
        a.push(attr("http.request.method", method));
        if known.is_none() {
            a.push(attr("http.request.method_original", req.method));
        }
        let remote = ip(&meta.tuple, false).map(|i| self.texts.addr(i));
        let (host, host_port) = req.host.as_deref().map(split_host).unwrap_or_default();
        if server {
            a.push(attr("url.path", req.path));
            if let Some(q) = req.query {
                a.push(attr("url.query", q));
            }
            a.push(attr("url.scheme", if meta.tls { "https" } else { "http" }));
            let server_addr = if host.is_empty() {
                ip(&meta.tuple, true).map(|i| self.texts.addr(i)).unwrap_or_default()
            } else {
                self.texts.host(host)
            };
            if !server_addr.is_empty() {
                a.push(attr("server.address", server_addr));
            }
            if let Some(p) = host_port.or((meta.tuple.lport != 0).then_some(meta.tuple.lport)) {
                a.push(attr("server.port", p as i64));
            }
            if let Some(r) = remote {
                a.push(attr("client.address", r.clone()));
                if self.opt_in {
                    a.push(attr("client.port", meta.tuple.rport as i64));
                }
                a.push(attr("network.peer.address", r));
                a.push(attr("network.peer.port", meta.tuple.rport as i64));
            }
        } else {
            let addr = if host.is_empty() { remote.clone().unwrap_or_default() } else { self.texts.host(host) };
            let port = host_port.unwrap_or(meta.tuple.rport);
            let default_port = if meta.tls { 443 } else { 80 };
            let scheme = if meta.tls { "https://" } else { "http://" };
            let query_len = req.query.as_ref().map_or(0, |q| q.len() + 1);
            let mut full = String::with_capacity(scheme.len() + addr.len() + 6 + req.path.len() + query_len);
            full.push_str(scheme);
            full.push_str(&addr);
            if port != default_port && port != 0 {
                let _ = write!(full, ":{port}");
            }
            full.push_str(&req.path);
            // A client's URL goes to another service: every query value is redacted (names kept).
            if let Some(q) = &req.query {
                full.push('?');
                full.push_str(&http1::redact_all_query_values(q));
            }
            a.push(attr("url.full", full));
            if !addr.is_empty() {
                a.push(attr("server.address", addr));
            }
            if port != 0 {
                a.push(attr("server.port", port as i64));
            }
            if let Some(r) = remote {
                a.push(attr("network.peer.address", r));
                a.push(attr("network.peer.port", meta.tuple.rport as i64));
            }
        }
        if meta.tls {
            // Plaintext from the TLS uprobes (semconv `tls.protocol.name`: "tls" or "ssl").
            a.push(attr("tls.protocol.name", "tls"));
        }
        // Opt-In in the HTTP conventions (`network.protocol.name` is required only when it is
        // not "http"); `user_agent.original` is Recommended on SERVER spans, Opt-In on CLIENT.
        let opt_in = self.opt_in;
        if opt_in {
            a.push(attr("network.transport", "tcp"));
            a.push(attr("network.protocol.name", "http"));
        }
        a.push(attr("network.protocol.version", if req.version_minor == 0 { "1.0" } else { "1.1" }));
        if let Some(ua) = req.user_agent.filter(|_| server || opt_in) {
            a.push(attr("user_agent.original", ua));
        }
        if let Some(n) = req.content_length.filter(|n| opt_in && *n > 0) {
            a.push(attr("http.request.body.size", n as i64));
        }
        let status = match &response {
            Some(r) => {
                a.push(attr("http.response.status_code", r.status as i64));
                if let Some(n) = r.content_length.filter(|_| opt_in) {
                    a.push(attr("http.response.body.size", n as i64));
                }
                let is_err = if server { r.status >= 500 } else { r.status >= 400 };
                if is_err {
                    a.push(attr("error.type", r.status.to_string()));
                    SpanStatus::Error(format!("HTTP {}", r.status))
                } else {
                    SpanStatus::Unset
                }
            }
            None => {
                a.push(attr("error.type", "no_response"));
                SpanStatus::Error("no response before the connection ended".into())
            }
        };
        if approximate {
            a.push(attr("waybill.timing.approximate", true));
        }
        if req.head_truncated {
            a.push(attr("waybill.request.head_truncated", true));
        }
        if ctx.injected {
            a.push(attr("waybill.traceparent.injected", true));
        }
        Some(self.record(meta, ctx, m, name, (start, end), a, status))
    }
}

#[cfg(test)]
mod tests {
    use waybill_protocols::{Chunk, FlowDir, http1::Http1Conn};

    use super::*;

    fn exchange(req: &[u8], resp: &[u8]) -> HttpExchange {
        let mut c = Http1Conn::new();
        let mut out = Vec::new();
        c.feed(Chunk { dir: FlowDir::ToServer, data: req, total: req.len(), ts_ns: 1_000_000 }, &mut out);
        c.feed(Chunk { dir: FlowDir::ToClient, data: resp, total: resp.len(), ts_ns: 3_000_000 }, &mut out);
        out.pop().expect("one exchange")
    }

    fn meta(role: Role) -> ConnMeta {
        let mut t = Tuple { family: AF_INET, lport: 8080, rport: 40000, ..Default::default() };
        t.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        t.raddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        ConnMeta { conn_id: 1, pid: std::process::id(), fd: 3, tuple: t, role, tid: 1, tls: false }
    }

    #[test]
    fn span_names_are_interned_within_bounds() {
        let mut t = Texts::default();
        let (a, b) = (t.name("GET /users/{id}"), t.name("GET /users/{id}"));
        assert!(matches!((&a, &b), (Cow::Borrowed(x), Cow::Borrowed(y)) if std::ptr::eq(*x, *y)));
        let long = format!("GET /{}", "w".repeat(MAX_INTERNED_NAME));
        assert!(matches!(t.name(&long), Cow::Owned(n) if n == long));
        for i in 1..MAX_INTERNED {
            assert!(matches!(t.name(&format!("GET /r{i}")), Cow::Borrowed(_)));
        }
        // The table is full: a new name is copied (and not kept), a known one still borrowed.
        assert!(matches!(t.name("GET /new"), Cow::Owned(n) if n == "GET /new"));
        assert!(matches!(t.name("GET /users/{id}"), Cow::Borrowed(_)));
        assert_eq!(t.names.len(), MAX_INTERNED);
    }

    #[test]
    fn server_span_has_semconv_attributes() {
        let m = Metrics::default();
        let mut s = Stitcher::new(Clock::new());
        let ex = exchange(
            b"GET /users/123?page=2 HTTP/1.1\r\nHost: shop.local:8080\r\nUser-Agent: curl/8\r\n\r\n",
            b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n",
        );
        let sp = s.span(Finished::Http(meta(Role::Server), 0, ex), &m).unwrap();
        assert_eq!(sp.name, "GET /users/{id}");
        assert_eq!(sp.kind, SpanKind::Server);
        let get = |k: &str| sp.attr(k).map(|v| v.to_string());
        assert_eq!(get("http.request.method").as_deref(), Some("GET"));
        assert_eq!(get("url.path").as_deref(), Some("/users/123"));
        assert_eq!(get("url.query").as_deref(), Some("page=2"));
        assert_eq!(get("server.address").as_deref(), Some("shop.local"));
        assert_eq!(get("server.port").as_deref(), Some("8080"));
        assert_eq!(get("client.address").as_deref(), Some("127.0.0.2"));
        assert_eq!(get("network.peer.port").as_deref(), Some("40000"));
        assert_eq!(get("http.response.status_code").as_deref(), Some("503"));
        assert_eq!(get("user_agent.original").as_deref(), Some("curl/8"));
        assert_eq!(get("network.protocol.version").as_deref(), Some("1.1"));
        // Opt-In attributes only when asked for.
        for k in ["client.port", "network.transport", "network.protocol.name", "http.response.body.size"] {
            assert_eq!(get(k), None, "{k}");
        }
        assert!(matches!(sp.status, SpanStatus::Error(_)));
        assert_eq!(sp.end_unix_ns - sp.start_unix_ns, 2_000_000);
        assert_eq!(sp.parent_source, ParentSource::None);
        assert_eq!(m.spans_created.get(), 1);
    }

    #[test]
    fn opt_in_attributes_when_asked_for() {
        let m = Metrics::default();
        let mut s = Stitcher::new(Clock::new());
        s.set_opt_in_attributes(true);
        let req = b"POST /orders HTTP/1.1\r\nHost: shop\r\nUser-Agent: curl/8\r\nContent-Length: 2\r\n\r\n{}";
        let resp = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nmade!";
        let server = s.span(Finished::Http(meta(Role::Server), 0, exchange(req, resp)), &m).unwrap();
        let get = |sp: &SpanRecord, k: &str| sp.attr(k).map(|v| v.to_string());
        assert_eq!(get(&server, "client.port").as_deref(), Some("40000"));
        assert_eq!(get(&server, "network.transport").as_deref(), Some("tcp"));
        assert_eq!(get(&server, "network.protocol.name").as_deref(), Some("http"));
        assert_eq!(get(&server, "http.request.body.size").as_deref(), Some("2"));
        assert_eq!(get(&server, "http.response.body.size").as_deref(), Some("5"));
        // `user_agent.original` is Opt-In on CLIENT spans only.
        let client = s.span(Finished::Http(meta(Role::Client), 0, exchange(req, resp)), &m).unwrap();
        assert_eq!(get(&client, "user_agent.original").as_deref(), Some("curl/8"));
        s.set_opt_in_attributes(false);
        let client = s.span(Finished::Http(meta(Role::Client), 1, exchange(req, resp)), &m).unwrap();
        assert_eq!(get(&client, "user_agent.original"), None);
        assert_eq!(get(&client, "http.request.body.size"), None);
        assert_eq!(get(&client, "http.response.status_code").as_deref(), Some("201"));
    }

    #[test]
    fn traceparent_joins_and_unsampled_is_dropped() {
        let m = Metrics::default();
        let mut s = Stitcher::new(Clock::new());
        let ex = exchange(
            b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: k=v\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        let sp = s.span(Finished::Http(meta(Role::Server), 0, ex), &m).unwrap();
        assert_eq!(span::hex(&sp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sp.parent_span_id.map(|p| span::hex(&p)).as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(sp.trace_state.as_deref(), Some("k=v"));
        assert_eq!(sp.parent_source, ParentSource::Header);
        let ex = exchange(
            b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(s.span(Finished::Http(meta(Role::Server), 0, ex), &m).is_none());
        assert_eq!(m.spans_unsampled.get(), 1);
        let ex = exchange(
            b"GET / HTTP/1.1\r\ntraceparent: garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        let sp = s.span(Finished::Http(meta(Role::Server), 0, ex), &m).unwrap();
        assert_eq!(sp.parent_source, ParentSource::None);
        assert_eq!(m.traceparent_malformed.get(), 1);
    }

    #[test]
    fn client_span_uses_url_full_and_4xx_is_error() {
        let m = Metrics::default();
        let mut s = Stitcher::new(Clock::new());
        let ex = exchange(
            b"GET /v1/x?token=abc&page=2 HTTP/1.1\r\nHost: api:9000\r\n\r\n",
            b"HTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n",
        );
        let sp = s.span(Finished::Http(meta(Role::Client), 0, ex), &m).unwrap();
        assert_eq!(sp.kind, SpanKind::Client);
        assert_eq!(sp.name, "GET");
        let full = sp.attr("url.full").unwrap().to_string();
        assert_eq!(full, "http://api:9000/v1/x?token=?&page=?");
        assert!(matches!(sp.status, SpanStatus::Error(_)));
    }

    #[test]
    fn host_header_split() {
        assert_eq!(split_host("a.b:81"), ("a.b", Some(81)));
        assert_eq!(split_host("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host("host"), ("host", None));
        assert_eq!(split_host(" host:x "), ("host", None));
        assert_eq!(split_host("::1"), ("::1", None));
        assert_eq!(split_host("[::1]"), ("::1", None));
    }

    #[test]
    fn methods_outside_the_conventions_are_other() {
        let m = Metrics::default();
        let mut s = Stitcher::new(Clock::new());
        let mut method_of = |req: &[u8]| {
            let ex = exchange(req, b"HTTP/1.1 207 Multi\r\nContent-Length: 0\r\n\r\n");
            let sp = s.span(Finished::Http(meta(Role::Server), 0, ex), &m).unwrap();
            let get = |k: &str| sp.attr(k).map(|v| v.to_string());
            (sp.name.to_string(), get("http.request.method"), get("http.request.method_original"))
        };
        let (name, method, original) = method_of(b"PROPFIND /d HTTP/1.1\r\n\r\n");
        assert_eq!(
            (name.as_str(), method.as_deref(), original.as_deref()),
            ("_OTHER /d", Some("_OTHER"), Some("PROPFIND"))
        );
        let (name, method, original) = method_of(b"PATCH /d HTTP/1.1\r\n\r\n");
        assert_eq!((name.as_str(), method.as_deref(), original), ("PATCH /d", Some("PATCH"), None));
    }

    #[test]
    fn span_texts_are_interned_up_to_the_bound() {
        let mut t = Texts::default();
        let a: IpAddr = "10.1.2.3".parse().unwrap();
        let (x, y) = (t.addr(a), t.addr(a));
        assert!(matches!((&x, &y), (Cow::Borrowed(p), Cow::Borrowed(q)) if std::ptr::eq(*p, *q)));
        assert_eq!(x, "10.1.2.3");
        assert!(matches!(t.host("api.example"), Cow::Borrowed("api.example")));
        // A long Host name is never kept.
        let long = "x".repeat(MAX_INTERNED_HOST + 1);
        assert!(matches!(t.host(&long), Cow::Owned(s) if s == long));
        assert_eq!(t.hosts.len(), 1);
        for i in 0..MAX_INTERNED as u32 {
            let _ = t.addr(IpAddr::from(i.to_be_bytes()));
            let _ = t.host(&format!("h{i}"));
        }
        assert_eq!((t.addrs.len(), t.hosts.len()), (MAX_INTERNED, MAX_INTERNED));
        // Past the bound: the right text, owned, nothing more kept.
        let late: IpAddr = "192.0.2.77".parse().unwrap();
        assert!(matches!(t.addr(late), Cow::Owned(s) if s == "192.0.2.77"));
        assert!(matches!(t.host("late.example"), Cow::Owned(s) if s == "late.example"));
        assert_eq!((t.addrs.len(), t.hosts.len()), (MAX_INTERNED, MAX_INTERNED));
        // Known ones still borrow.
        assert!(matches!(t.addr(a), Cow::Borrowed("10.1.2.3")));
    }

    #[test]
    fn ip_text_matches_display() {
        for o in [0u8, 1, 9, 10, 42, 99, 100, 127, 199, 200, 255] {
            let v4 = IpAddr::from([o, 255 - o, o / 2, 7]);
            assert_eq!(ip_text(v4), v4.to_string());
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_text(v6), v6.to_string());
    }

    #[test]
    fn dual_stack_server_finds_ipv4_client_by_connection() {
        // A JVM server's socket is AF_INET6 and reports ::ffff:127.0.0.1; its IPv4 client's
        // socket reports 127.0.0.1. Same connection: the server span is the client span's child.
        let m = Metrics::default();
        let mut s = Stitcher::new(Clock::new());
        let mut ct = Tuple { family: AF_INET, lport: 40000, rport: 9090, ..Default::default() };
        ct.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ct.raddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let client = ConnMeta { conn_id: 1, pid: 10, fd: 3, tuple: ct, role: Role::Client, tid: 10, tls: false };
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
        let st = Tuple { family: AF_INET6, lport: 9090, rport: 40000, laddr: mapped, raddr: mapped, _pad: 0 };
        let server = ConnMeta { conn_id: 2, pid: 20, fd: 4, tuple: st, role: Role::Server, tid: 21, tls: false };
        let req = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let start = |meta: &ConnMeta| Finished::HttpStart {
            meta: *meta,
            seq: 0,
            traceparent: None,
            tracestate: None,
            start_ns: 1_000_000,
        };
        assert!(s.span(start(&client), &m).is_none());
        assert!(s.span(start(&server), &m).is_none());
        let sp_server = s.span(Finished::Http(server, 0, exchange(req, resp)), &m).unwrap();
        let sp_client = s.span(Finished::Http(client, 0, exchange(req, resp)), &m).unwrap();
        assert_eq!(sp_server.parent_source, ParentSource::Connection);
        assert_eq!(sp_server.parent_span_id, Some(sp_client.span_id));
        assert_eq!(sp_server.trace_id, sp_client.trace_id);
    }

    #[test]
    fn event_loop_query_belongs_to_the_request_open_when_it_was_written() {
        let m = Metrics::default();
        let mut s = Stitcher::new(Clock::new());
        let srv = |conn_id: u64, rport: u16| {
            let mut t = meta(Role::Server);
            t.conn_id = conn_id;
            t.tuple.rport = rport;
            t.tid = 7;
            t
        };
        let mut db = meta(Role::Client);
        db.conn_id = 100;
        db.tuple.lport = 45000;
        db.tuple.rport = 5432;
        db.tid = 7;
        let head = |meta: ConnMeta, ts: u64| Finished::HttpStart {
            meta,
            seq: 0,
            traceparent: None,
            tracestate: None,
            start_ns: ts,
        };
        let query = |conn_id: u64, start: u64, end: u64| {
            let c =
                DbCall { operation: Some("SELECT".into()), end_ns: end, ..DbCall::new(DbSystem::Postgresql, start) };
            let mut mt = db;
            mt.conn_id = conn_id;
            Finished::Db(mt, c)
        };
        let send = |conn_id: u64, ts: u64| {
            let mut mt = db;
            mt.conn_id = conn_id;
            Finished::DbSend { meta: mt, system: DbSystem::Postgresql, ts_ns: ts }
        };
        // One thread: a arrives and writes its query on connection 100; b arrives, then waits for
        // a pooled connection; a's reply comes, the connection goes to b; b's reply comes.
        s.span(head(srv(1, 50001), 1_000_000), &m);
        s.span(send(100, 1_100_000), &m);
        s.span(head(srv(2, 50002), 1_200_000), &m);
        let qa = s.span(query(100, 1_100_000, 1_300_000), &m).unwrap();
        s.span(send(100, 1_400_000), &m);
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let a = s.span(Finished::Http(srv(1, 50001), 0, exchange(b"GET /a HTTP/1.1\r\n\r\n", ok)), &m).unwrap();
        let qb = s.span(query(100, 1_400_000, 1_600_000), &m).unwrap();
        let b = s.span(Finished::Http(srv(2, 50002), 0, exchange(b"GET /b HTTP/1.1\r\n\r\n", ok)), &m).unwrap();
        assert_eq!(qa.parent_span_id, Some(a.span_id), "a's query, though b was open when its reply came");
        assert_eq!(qb.parent_span_id, Some(b.span_id), "b's query: the oldest open request without one");
        let uncertain = |q: &SpanRecord| {
            q.attributes.iter().any(|(k, v)| k == "waybill.parent.uncertain" && v.to_string() == "true")
        };
        assert_eq!(qa.parent_source, ParentSource::Thread);
        assert_eq!(qb.parent_source, ParentSource::Thread);
        assert!(!uncertain(&qa), "a was the only request open when its query was written");
        assert!(uncertain(&qb), "a and b were open when b's query was written");
        // A write while the thread serves nothing starts a trace of its own, even if a request
        // opens before its reply.
        s.span(send(101, 2_000_000), &m);
        s.span(head(srv(3, 50003), 2_100_000), &m);
        let q = s.span(query(101, 2_000_000, 2_200_000), &m).unwrap();
        assert_eq!(q.parent_source, ParentSource::None);
        assert_eq!(q.parent_span_id, None);
    }
}
