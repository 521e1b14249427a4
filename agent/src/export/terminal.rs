//! The terminal view: one waterfall per trace, printed once the trace has settled.
//!
//! ```text
//! Trace 4bf92f35…  POST /orders  847 ms  shop (pid 4121)  200
//! ├─ SELECT cards       5–25 ms  postgresql
//! ├─ POST /charges    25–755 ms  http
//! └─ SET order:42    755–757 ms  redis
//! ```
//!
//! [`render_trace`] is pure. [`TraceGrouper`] decides when a trace is printed, from times it is
//! given (so tests drive it deterministically); [`spawn_terminal`] runs it on the Tokio clock.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::export::SpanReceiver;
use tokio::task::JoinHandle;

use crate::stitch::span::{AttrValue, ParentSource, SpanKind, SpanRecord, SpanStatus, hex};

/// Longest name column (tree prefix included) before names are cut with `…`.
const MAX_NAME_COLUMN: usize = 56;

/// Whether `s` starts its trace here: no parent, or a parent outside (an incoming header).
fn is_root(s: &SpanRecord) -> bool {
    s.parent_span_id.is_none() || s.parent_source == ParentSource::Header
}

/// A duration, smartly: `850 µs`, `4.2 ms`, `847 ms`, `12.5 s`.
pub fn format_duration(ns: u64) -> String {
    let unit = Unit::for_ns(ns);
    format!("{} {}", unit.number(ns as i128), unit.suffix())
}

/// An offset range in the unit of its end: `5–25 ms`, `120–850 µs`.
fn format_range(start_ns: i128, end_ns: i128) -> String {
    let unit = Unit::for_ns(end_ns.unsigned_abs().min(u64::MAX as u128) as u64);
    format!("{}–{} {}", unit.number(start_ns), unit.number(end_ns), unit.suffix())
}

#[derive(Clone, Copy)]
enum Unit {
    Micros,
    MillisTenths,
    Millis,
    Seconds,
}

impl Unit {
    fn for_ns(ns: u64) -> Unit {
        match ns {
            0..1_000_000 => Unit::Micros,
            1_000_000..10_000_000 => Unit::MillisTenths,
            10_000_000..10_000_000_000 => Unit::Millis,
            _ => Unit::Seconds,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Unit::Micros => "µs",
            Unit::MillisTenths | Unit::Millis => "ms",
            Unit::Seconds => "s",
        }
    }

    /// `ns` in this unit, rounded half away from zero.
    fn number(self, ns: i128) -> String {
        let (div, tenths) = match self {
            Unit::Micros => (1_000, false),
            Unit::MillisTenths => (100_000, true),
            Unit::Millis => (1_000_000, false),
            Unit::Seconds => (100_000_000, true),
        };
        let sign = if ns < 0 { "-" } else { "" };
        let q = (ns.unsigned_abs() + div / 2) / div;
        if tenths { format!("{sign}{}.{}", q / 10, q % 10) } else { format!("{sign}{q}") }
    }
}

/// The short protocol column of a span.
fn protocol(s: &SpanRecord) -> String {
    for key in ["db.system.name", "db.system", "rpc.system", "messaging.system"] {
        if let Some(v) = s.attr(key) {
            return v.to_string();
        }
    }
    if s.attr("http.request.method").is_some() {
        return "http".to_string();
    }
    if let Some(v) = s.attr("network.protocol.name") {
        return v.to_string();
    }
    match s.kind {
        SpanKind::Server => "server".to_string(),
        SpanKind::Client => "client".to_string(),
    }
}

fn status_code(s: &SpanRecord) -> Option<String> {
    ["http.response.status_code", "rpc.grpc.status_code"].iter().find_map(|k| s.attr(k)).map(|v| match v {
        AttrValue::Str(s) => s.to_string(),
        AttrValue::Shared(s) => s.to_string(),
        other => other.to_string(),
    })
}

fn is_error(s: &SpanRecord) -> bool {
    matches!(s.status, SpanStatus::Error(_))
}

fn cut(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

struct Row {
    left: String,
    range: String,
    right: String,
}

/// Renders one trace (spans of one trace id, any order) as a waterfall.
///
/// The header is the root: the earliest span starting the trace here ([`ParentSource::None`] or
/// [`ParentSource::Header`]) whose parent is not among `spans`. Below it, every other span as a
/// tree along `parent_span_id`, children by start time, with offsets from the root's start. Spans
/// whose parent is missing hang at the top level. Without a root the header says `(incomplete)`
/// and offsets count from the earliest span.
pub fn render_trace(spans: &[SpanRecord]) -> String {
    let Some(first) = spans.iter().min_by_key(|s| (s.start_unix_ns, s.end_unix_ns)) else {
        return String::new();
    };
    let ids: HashMap<[u8; 8], usize> = spans.iter().enumerate().map(|(i, s)| (s.span_id, i)).collect();
    let parent_of =
        |s: &SpanRecord| s.parent_span_id.and_then(|p| ids.get(&p).copied()).filter(|&p| spans[p].span_id != s.span_id);
    let root = spans
        .iter()
        .enumerate()
        .filter(|(_, s)| is_root(s) && parent_of(s).is_none())
        .min_by_key(|(_, s)| (s.start_unix_ns, s.end_unix_ns))
        .map(|(i, _)| i);

    let mut children: HashMap<Option<usize>, Vec<usize>> = HashMap::new();
    for (i, s) in spans.iter().enumerate() {
        if Some(i) == root {
            continue;
        }
        let parent = parent_of(s).filter(|&p| Some(p) != root || root.is_some());
        // Top-level spans (parent missing) hang under the root, when there is one.
        let parent = parent.or(root);
        children.entry(parent).or_default().push(i);
    }
    for list in children.values_mut() {
        list.sort_by_key(|&i| (spans[i].start_unix_ns, spans[i].end_unix_ns, spans[i].span_id));
    }

    let mut out = String::new();
    let base = match root {
        Some(r) => {
            let s = &spans[r];
            let _ = write!(
                out,
                "Trace {}…  {}  {}  {} (pid {})",
                &hex(&s.trace_id)[..8],
                s.name,
                format_duration(s.end_unix_ns.saturating_sub(s.start_unix_ns)),
                s.resource.service_name,
                s.resource.pid
            );
            if s.kind == SpanKind::Server
                && let Some(code) = status_code(s)
            {
                let _ = write!(out, "  {code}");
            }
            if is_error(s) {
                out.push_str("  [ERROR]");
            }
            s.start_unix_ns
        }
        None => {
            let _ = write!(
                out,
                "Trace {}…  (incomplete)  {} span{}  {} (pid {})",
                &hex(&first.trace_id)[..8],
                spans.len(),
                if spans.len() == 1 { "" } else { "s" },
                first.resource.service_name,
                first.resource.pid
            );
            first.start_unix_ns
        }
    };
    out.push('\n');

    // Depth-first walk, iteratively (a pathological trace must not overflow the stack).
    let mut rows = Vec::new();
    let mut visited = vec![false; spans.len()];
    // (span, prefix of its line, prefix for its children)
    let mut stack: Vec<(usize, String, String)> = Vec::new();
    let push_children = |stack: &mut Vec<(usize, String, String)>, list: &[usize], prefix: &str| {
        for (n, &c) in list.iter().enumerate().rev() {
            let last = n + 1 == list.len();
            let (branch, cont) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
            stack.push((c, format!("{prefix}{branch}"), format!("{prefix}{cont}")));
        }
    };
    push_children(&mut stack, children.get(&root).map_or(&[], |v| v), "");
    while let Some((i, line_prefix, child_prefix)) = stack.pop() {
        if std::mem::replace(&mut visited[i], true) {
            continue;
        }
        let s = &spans[i];
        let parent_pid =
            parent_of(s).map_or(root.map_or(first.resource.pid, |r| spans[r].resource.pid), |p| spans[p].resource.pid);
        let mut right = protocol(s);
        if s.resource.pid != parent_pid {
            let _ = write!(right, "  {} (pid {})", s.resource.service_name, s.resource.pid);
        }
        if let Some(code) = status_code(s).filter(|_| s.kind == SpanKind::Server) {
            let _ = write!(right, "  {code}");
        }
        if is_error(s) {
            right.push_str("  [ERROR]");
        }
        let name_room = MAX_NAME_COLUMN.saturating_sub(line_prefix.chars().count()).max(8);
        rows.push(Row {
            left: format!("{line_prefix}{}", cut(&s.name, name_room)),
            range: format_range(s.start_unix_ns as i128 - base as i128, s.end_unix_ns as i128 - base as i128),
            right,
        });
        push_children(&mut stack, children.get(&Some(i)).map_or(&[], |v| v), &child_prefix);
    }
    // Spans on a parent cycle (never reachable from the top): list them flat.
    for (i, s) in spans.iter().enumerate() {
        if !visited[i] && Some(i) != root {
            rows.push(Row {
                left: format!("?  {}", cut(&s.name, MAX_NAME_COLUMN - 3)),
                range: format_range(s.start_unix_ns as i128 - base as i128, s.end_unix_ns as i128 - base as i128),
                right: protocol(s),
            });
        }
    }

    let left_w = rows.iter().map(|r| r.left.chars().count()).max().unwrap_or(0);
    let range_w = rows.iter().map(|r| r.range.chars().count()).max().unwrap_or(0);
    for r in rows {
        let pad_l = left_w - r.left.chars().count();
        let pad_r = range_w - r.range.chars().count();
        let _ = writeln!(out, "{}{}  {}{}  {}", r.left, " ".repeat(pad_l), " ".repeat(pad_r), r.range, r.right);
    }
    out
}

/// When traces are printed.
#[derive(Clone, Debug)]
pub struct GroupingConfig {
    /// A trace whose root has arrived is printed once no span of it arrived for this long.
    pub settle: Duration,
    /// Any trace is printed this long after its first span, root or not.
    pub max_wait: Duration,
    /// Most traces held; beyond, the oldest is printed at once.
    pub max_pending: usize,
}

impl Default for GroupingConfig {
    fn default() -> Self {
        GroupingConfig { settle: Duration::from_millis(300), max_wait: Duration::from_secs(5), max_pending: 10_000 }
    }
}

struct Pending {
    spans: Vec<SpanRecord>,
    seq: u64,
    first_seen: Instant,
    last_seen: Instant,
    has_root: bool,
}

/// Collects spans into traces and says when each is ready, from the times it is given.
pub struct TraceGrouper {
    cfg: GroupingConfig,
    /// std's SipHash on purpose: trace ids come from incoming `traceparent` headers, i.e. from
    /// the traffic, and could be chosen to collide under FxHash.
    pending: HashMap<[u8; 16], Pending>,
    /// Arrival order of traces (`seq`, id); entries whose trace left or was re-created are stale.
    order: VecDeque<(u64, [u8; 16])>,
    next_seq: u64,
}

impl TraceGrouper {
    pub fn new(cfg: GroupingConfig) -> TraceGrouper {
        TraceGrouper { cfg, pending: HashMap::new(), order: VecDeque::new(), next_seq: 0 }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Adds a span seen at `now`. Returns the traces pushed out to stay within `max_pending`.
    pub fn push(&mut self, span: SpanRecord, now: Instant) -> Vec<Vec<SpanRecord>> {
        let mut evicted = Vec::new();
        if !self.pending.contains_key(&span.trace_id) {
            while self.pending.len() >= self.cfg.max_pending.max(1) {
                match self.pop_oldest() {
                    Some(t) => evicted.push(t),
                    None => break,
                }
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.order.push_back((seq, span.trace_id));
            self.pending.insert(
                span.trace_id,
                Pending { spans: Vec::new(), seq, first_seen: now, last_seen: now, has_root: false },
            );
        }
        let p = self.pending.get_mut(&span.trace_id).expect("inserted above");
        p.last_seen = now;
        p.has_root |= is_root(&span);
        p.spans.push(span);
        evicted
    }

    fn pop_oldest(&mut self) -> Option<Vec<SpanRecord>> {
        while let Some((seq, id)) = self.order.pop_front() {
            if self.pending.get(&id).is_some_and(|p| p.seq == seq) {
                return self.pending.remove(&id).map(|p| p.spans);
            }
        }
        None
    }

    /// Traces ready at `now`, oldest first: rooted ones quiet for `settle`, any after `max_wait`.
    pub fn poll(&mut self, now: Instant) -> Vec<Vec<SpanRecord>> {
        let cfg = &self.cfg;
        let mut ready: Vec<(u64, [u8; 16])> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                (p.has_root && now.saturating_duration_since(p.last_seen) >= cfg.settle)
                    || now.saturating_duration_since(p.first_seen) >= cfg.max_wait
            })
            .map(|(id, p)| (p.seq, *id))
            .collect();
        ready.sort_unstable();
        let out: Vec<_> = ready.into_iter().filter_map(|(_, id)| self.pending.remove(&id).map(|p| p.spans)).collect();
        if self.order.len() > 2 * self.pending.len() + 64 {
            let pending = &self.pending;
            self.order.retain(|(seq, id)| pending.get(id).is_some_and(|p| p.seq == *seq));
        }
        out
    }

    /// Everything still held, oldest first (shutdown).
    pub fn drain(&mut self) -> Vec<Vec<SpanRecord>> {
        let mut out = Vec::new();
        while let Some(t) = self.pop_oldest() {
            out.push(t);
        }
        out
    }
}

/// Prints settled traces to `out` until `rx` closes, then prints what is left and returns.
pub fn spawn_terminal(rx: SpanReceiver, out: Box<dyn Write + Send>) -> JoinHandle<()> {
    tokio::spawn(run_terminal(rx, out, GroupingConfig::default()))
}

async fn run_terminal(mut rx: SpanReceiver, mut out: Box<dyn Write + Send>, cfg: GroupingConfig) {
    let mut grouper = TraceGrouper::new(cfg);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut broken = false;
    let mut print = |traces: Vec<Vec<SpanRecord>>, out: &mut Box<dyn Write + Send>| {
        if broken || traces.is_empty() {
            return;
        }
        let mut text = String::new();
        for t in traces {
            text.push_str(&render_trace(&t));
            text.push('\n');
        }
        if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
            // A closed terminal or pipe: keep draining the channel, stop writing.
            broken = true;
        }
    };
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(spans) => {
                    for span in spans {
                        let evicted = grouper.push(span, tokio::time::Instant::now().into_std());
                        print(evicted, &mut out);
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                let ready = grouper.poll(tokio::time::Instant::now().into_std());
                print(ready, &mut out);
            }
        }
    }
    let rest = grouper.drain();
    print(rest, &mut out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stitch::span::ProcessResource;
    use std::sync::{Arc, Mutex};

    const T0: u64 = 1_700_000_000_000_000_000;
    const MS: u64 = 1_000_000;

    fn proc_(pid: u32, name: &str) -> Arc<ProcessResource> {
        Arc::new(ProcessResource {
            pid,
            service_name: name.into(),
            attributes: vec![("service.name".into(), name.to_string().into())],
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        tid: u8,
        id: u8,
        parent: Option<u8>,
        src: ParentSource,
        name: &str,
        kind: SpanKind,
        start_ms: f64,
        end_ms: f64,
        attrs: &[(&str, AttrValue)],
        p: &Arc<ProcessResource>,
    ) -> SpanRecord {
        let mut trace_id = [0u8; 16];
        trace_id[..4].copy_from_slice(&[0x4b, 0xf9, 0x2f, 0x35]);
        trace_id[15] = tid;
        SpanRecord {
            trace_id,
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            trace_state: None,
            sampled: true,
            name: name.to_string().into(),
            kind,
            start_unix_ns: T0 + (start_ms * MS as f64) as u64,
            end_unix_ns: T0 + (end_ms * MS as f64) as u64,
            attributes: attrs.iter().map(|(k, v)| (k.to_string().into(), v.clone())).collect(),
            status: SpanStatus::Unset,
            parent_source: src,
            resource: Arc::clone(p),
        }
    }

    /// A local child: a parent id that did not come from a header.
    fn child(
        id: u8,
        parent: u8,
        name: &str,
        start_ms: f64,
        end_ms: f64,
        attrs: &[(&str, AttrValue)],
        p: &Arc<ProcessResource>,
    ) -> SpanRecord {
        span(1, id, Some(parent), ParentSource::None, name, SpanKind::Client, start_ms, end_ms, attrs, p)
    }

    fn shop_trace() -> Vec<SpanRecord> {
        let shop = proc_(4121, "shop");
        let mut root = span(
            1,
            1,
            None,
            ParentSource::None,
            "POST /orders",
            SpanKind::Server,
            0.0,
            847.0,
            &[("http.request.method", "POST".into()), ("http.response.status_code", AttrValue::Int(201))],
            &shop,
        );
        root.attributes.push(("url.path".into(), "/orders".into()));
        vec![
            child(4, 1, "SET order:42", 755.0, 757.0, &[("db.system.name", "redis".into())], &shop),
            root,
            child(2, 1, "SELECT cards", 5.0, 25.0, &[("db.system.name", "postgresql".into())], &shop),
            child(3, 1, "POST api.stripe.com/charges", 25.0, 755.0, &[("http.request.method", "POST".into())], &shop),
        ]
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(0), "0 µs");
        assert_eq!(format_duration(850_400), "850 µs");
        assert_eq!(format_duration(999_999), "1000 µs");
        assert_eq!(format_duration(4_249_000), "4.2 ms");
        assert_eq!(format_duration(9_940_000), "9.9 ms");
        assert_eq!(format_duration(847 * MS), "847 ms");
        assert_eq!(format_duration(9_999 * MS), "9999 ms");
        assert_eq!(format_duration(12_500 * MS), "12.5 s");
        assert_eq!(format_range(120_000, 850_000), "120–850 µs");
        assert_eq!(format_range(1_200_000, 3_450_000), "1.2–3.5 ms");
        assert_eq!(format_range(5 * MS as i128, 25 * MS as i128), "5–25 ms");
        assert_eq!(format_range(-2 * MS as i128, 30 * MS as i128), "-2–30 ms");
    }

    #[test]
    fn render_flat_trace() {
        let got = render_trace(&shop_trace());
        let want = "\
Trace 4bf92f35…  POST /orders  847 ms  shop (pid 4121)  201
├─ SELECT cards                    5–25 ms  postgresql
├─ POST api.stripe.com/charges   25–755 ms  http
└─ SET order:42                 755–757 ms  redis
";
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn render_nested_cross_process_and_errors() {
        let front = proc_(100, "front");
        let api = proc_(200, "api");
        let mut root = span(
            2,
            1,
            Some(0xee),
            ParentSource::Header,
            "GET /checkout",
            SpanKind::Server,
            0.0,
            12_400.0,
            &[("http.request.method", "GET".into()), ("http.response.status_code", AttrValue::Int(502))],
            &front,
        );
        root.status = SpanStatus::Error("502".into());
        let call = span(
            2,
            2,
            Some(1),
            ParentSource::None,
            "GET /price",
            SpanKind::Client,
            0.2,
            3.7,
            &[("http.request.method", "GET".into())],
            &front,
        );
        let mut served = span(
            2,
            3,
            Some(2),
            ParentSource::Header,
            "GET /price",
            SpanKind::Server,
            0.5,
            3.5,
            &[("http.request.method", "GET".into()), ("http.response.status_code", AttrValue::Int(500))],
            &api,
        );
        served.status = SpanStatus::Error("500".into());
        let query = span(
            2,
            4,
            Some(3),
            ParentSource::None,
            "SELECT price",
            SpanKind::Client,
            0.6,
            0.9,
            &[("db.system.name", "mysql".into())],
            &api,
        );
        let cache = span(
            2,
            5,
            Some(1),
            ParentSource::None,
            "GET price:7",
            SpanKind::Client,
            4.0,
            12_000.0,
            &[("db.system.name", "redis".into())],
            &front,
        );
        let got = render_trace(&[cache, query, served, call, root]);
        let want = "\
Trace 4bf92f35…  GET /checkout  12.4 s  front (pid 100)  502  [ERROR]
├─ GET /price          0.2–3.7 ms  http
│  └─ GET /price       0.5–3.5 ms  http  api (pid 200)  500  [ERROR]
│     └─ SELECT price  600–900 µs  mysql
└─ GET price:7         0.0–12.0 s  redis
";
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn render_incomplete_and_long_names() {
        let p = proc_(7, "worker");
        let long = "x".repeat(80);
        let a = span(3, 2, Some(1), ParentSource::None, &long, SpanKind::Client, 10.0, 30.0, &[], &p);
        let b = span(
            3,
            3,
            Some(1),
            ParentSource::None,
            "PING",
            SpanKind::Client,
            12.0,
            13.0,
            &[("db.system.name", "redis".into())],
            &p,
        );
        let got = render_trace(&[b, a]);
        // Offsets from the earliest span; names cut to the column limit; ranges right-aligned.
        let want = format!(
            "\
Trace 4bf92f35…  (incomplete)  2 spans  worker (pid 7)
├─ {x}…     0–20 ms  client
└─ PING{pad}  2.0–3.0 ms  redis
",
            x = "x".repeat(52),
            pad = " ".repeat(49)
        );
        assert_eq!(got, want, "\n{got}");
        assert_eq!(render_trace(&[]), "");
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn names(traces: &[Vec<SpanRecord>]) -> Vec<Vec<String>> {
        traces.iter().map(|t| t.iter().map(|s| s.name.to_string()).collect()).collect()
    }

    #[test]
    fn grouping_waits_for_root_and_quiet() {
        let p = proc_(1, "svc");
        let base = Instant::now();
        let mut g = TraceGrouper::new(GroupingConfig::default());
        let c = |id, tid| span(tid, id, Some(1), ParentSource::None, "child", SpanKind::Client, 1.0, 2.0, &[], &p);
        let r = |tid| span(tid, 1, None, ParentSource::None, "root", SpanKind::Server, 0.0, 3.0, &[], &p);
        assert!(g.push(c(2, 1), at(base, 0)).is_empty());
        // No root yet: not ready however quiet.
        assert!(g.poll(at(base, 1000)).is_empty());
        g.push(r(1), at(base, 1000));
        assert!(g.poll(at(base, 1299)).is_empty());
        // A late child resets the quiet period.
        g.push(c(3, 1), at(base, 1200));
        assert!(g.poll(at(base, 1499)).is_empty());
        assert_eq!(names(&g.poll(at(base, 1500))), vec![vec!["child", "root", "child"]]);
        assert_eq!(g.pending(), 0);
    }

    #[test]
    fn grouping_incomplete_after_max_wait_and_order() {
        let p = proc_(1, "svc");
        let base = Instant::now();
        let mut g = TraceGrouper::new(GroupingConfig::default());
        let c = |tid, name: &str| span(tid, 2, Some(1), ParentSource::None, name, SpanKind::Client, 1.0, 2.0, &[], &p);
        g.push(c(1, "a"), at(base, 0));
        g.push(c(2, "b"), at(base, 10));
        g.push(c(1, "a2"), at(base, 4000));
        assert!(g.poll(at(base, 4999)).is_empty());
        assert_eq!(names(&g.poll(at(base, 5000))), vec![vec!["a", "a2"]]);
        assert_eq!(names(&g.poll(at(base, 5010))), vec![vec!["b"]]);
        // Both ready at once: oldest first.
        g.push(c(3, "c"), at(base, 6000));
        g.push(c(4, "d"), at(base, 6001));
        assert_eq!(names(&g.poll(at(base, 20_000))), vec![vec!["c"], vec!["d"]]);
    }

    #[test]
    fn grouping_bounded_oldest_first() {
        let p = proc_(1, "svc");
        let base = Instant::now();
        let mut g = TraceGrouper::new(GroupingConfig { max_pending: 2, ..Default::default() });
        let c = |tid, name: &str| span(tid, 2, Some(1), ParentSource::None, name, SpanKind::Client, 1.0, 2.0, &[], &p);
        assert!(g.push(c(1, "a"), at(base, 0)).is_empty());
        assert!(g.push(c(2, "b"), at(base, 1)).is_empty());
        // Same trace: no eviction.
        assert!(g.push(c(2, "b2"), at(base, 2)).is_empty());
        assert_eq!(names(&g.push(c(3, "c"), at(base, 3))), vec![vec!["a"]]);
        assert_eq!(names(&g.push(c(4, "d"), at(base, 4))), vec![vec!["b", "b2"]]);
        assert_eq!(g.pending(), 2);
        assert_eq!(names(&g.drain()), vec![vec!["c"], vec!["d"]]);
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn terminal_task_prints_settled_traces() {
        let buf = Buf::default();
        let (tx, rx) = crate::export::span_queue(16);
        let task = spawn_terminal(rx, Box::new(buf.clone()));
        assert_eq!(tx.try_send(shop_trace()), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(buf.0.lock().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, format!("{}\n", render_trace(&shop_trace())));
        // A rootless trace is flushed at shutdown.
        let p = proc_(9, "late");
        assert_eq!(
            tx.try_send(vec![span(9, 2, Some(1), ParentSource::None, "orphan", SpanKind::Client, 0.0, 1.0, &[], &p)]),
            0
        );
        drop(tx);
        task.await.unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("(incomplete)  1 span  late (pid 9)\n└─ orphan"), "{text}");
    }
}
