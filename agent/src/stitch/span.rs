//! The agent's span model: what the stitcher builds from parsed exchanges and what every
//! exporter (OTLP, terminal) consumes. Ids, parents and timestamps are decided by Waybill.

use std::{borrow::Cow, sync::Arc};

/// Attribute text: semantic-convention keys and constant values (`"tcp"`, `"GET"`, …) are
/// borrowed `'static` strings and cost no allocation per span; text taken from traffic or from a
/// process's environment is owned.
pub type AttrStr = Cow<'static, str>;

/// An attribute value (the subset of OpenTelemetry's `AnyValue` that Waybill produces).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AttrValue {
    Str(AttrStr),
    /// Text shared with other spans (a connection's `User-Agent`): no copy per span.
    Shared(Arc<str>),
    Int(i64),
    Bool(bool),
}

impl AttrValue {
    /// The text of a string value (None for other kinds).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            AttrValue::Shared(s) => Some(s),
            _ => None,
        }
    }
}

impl From<&'static str> for AttrValue {
    fn from(v: &'static str) -> Self {
        AttrValue::Str(Cow::Borrowed(v))
    }
}
impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(Cow::Owned(v))
    }
}
impl From<AttrStr> for AttrValue {
    fn from(v: AttrStr) -> Self {
        AttrValue::Str(v)
    }
}
impl From<Arc<str>> for AttrValue {
    fn from(v: Arc<str>) -> Self {
        AttrValue::Shared(v)
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Str(s) => f.write_str(s),
            AttrValue::Shared(s) => f.write_str(s),
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A key/value attribute. Keys are OpenTelemetry semantic-convention names (static), or, for
/// process resources, names from the process's `OTEL_RESOURCE_ATTRIBUTES` (owned).
pub type Attr = (AttrStr, AttrValue);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Error(String),
}

/// How a span's parent was found (exported as `waybill.parent.source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentSource {
    /// No parent: the span starts a trace.
    None,
    /// An incoming W3C `traceparent` header.
    Header,
    /// The calling thread was serving this server request when it made the call.
    Thread,
    /// Same host: the client side of this connection is a traced process's CLIENT span.
    Connection,
}

impl ParentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentSource::None => "none",
            ParentSource::Header => "header",
            ParentSource::Thread => "thread",
            ParentSource::Connection => "connection",
        }
    }
}

/// The OpenTelemetry resource of one traced process.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessResource {
    pub pid: u32,
    pub service_name: String,
    /// All resource attributes, `service.name` included.
    pub attributes: Vec<Attr>,
}

impl ProcessResource {
    /// A minimal resource (`service.name`, `process.pid`) for tests.
    #[cfg(test)]
    pub fn for_test(pid: u32, service: &str) -> std::sync::Arc<Self> {
        std::sync::Arc::new(ProcessResource {
            pid,
            service_name: service.to_string(),
            attributes: vec![
                ("service.name".into(), service.to_string().into()),
                ("process.pid".into(), AttrValue::Int(pid as i64)),
            ],
        })
    }
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C `tracestate` carried from the incoming request, if any.
    pub trace_state: Option<Arc<str>>,
    pub sampled: bool,
    /// Interned (borrowed) for the HTTP names that repeat, owned otherwise.
    pub name: AttrStr,
    pub kind: SpanKind,
    /// Wall-clock start and end, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Vec<Attr>,
    pub status: SpanStatus,
    pub parent_source: ParentSource,
    pub resource: Arc<ProcessResource>,
}

impl SpanRecord {
    /// A 5 ms SERVER span `span {n}` with ids made of `n`, one attribute, for tests.
    #[cfg(test)]
    pub fn for_test(n: u8, resource: &Arc<ProcessResource>) -> SpanRecord {
        SpanRecord {
            trace_id: [n; 16],
            span_id: [n; 8],
            parent_span_id: None,
            trace_state: None,
            sampled: true,
            name: format!("span {n}").into(),
            kind: SpanKind::Server,
            start_unix_ns: 1_700_000_000_000_000_000,
            end_unix_ns: 1_700_000_000_005_000_000,
            attributes: vec![("http.request.method".into(), "GET".into())],
            status: SpanStatus::Unset,
            parent_source: ParentSource::None,
            resource: Arc::clone(resource),
        }
    }

    /// The value of attribute `key`, if present.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Attribute lists of encoded spans, kept on their thread for the next spans built there
/// ([`attr_list`]): the event loop and the exporter share one thread, so each span's list
/// (~1 KiB) is memory the previous drain already used, not a fresh allocator page that the
/// allocator hands back to the kernel between drains and faults in again (measured on the live
/// agent at 3000 requests/s: ~160 page faults a second, mostly here).
const ATTR_POOL_MAX: usize = 1024;
/// Lists that grew larger than this are not kept (bounds the pool at ~3 MiB).
const ATTR_POOL_MAX_CAPACITY: usize = 64;
/// Emptied span batches kept the same way ([`batch_vec`], [`recycle_batch`]).
const BATCH_POOL_MAX: usize = 4;

thread_local! {
    static ATTR_POOL: std::cell::RefCell<Vec<Vec<Attr>>> = const { std::cell::RefCell::new(Vec::new()) };
    static BATCH_POOL: std::cell::RefCell<Vec<Vec<SpanRecord>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty attribute list with room for `n`: a recycled one when this thread has one.
pub fn attr_list(n: usize) -> Vec<Attr> {
    match ATTR_POOL.with_borrow_mut(Vec::pop) {
        Some(mut v) => {
            v.reserve(n);
            v
        }
        None => Vec::with_capacity(n),
    }
}

/// Ends `spans` (an exporter calls this once it has encoded them), keeping their attribute
/// lists for [`attr_list`] up to the pool's bound.
pub fn recycle(spans: &mut Vec<SpanRecord>) {
    ATTR_POOL.with_borrow_mut(|pool| {
        for s in spans.drain(..) {
            let mut a = s.attributes;
            if pool.len() < ATTR_POOL_MAX && (1..=ATTR_POOL_MAX_CAPACITY).contains(&a.capacity()) {
                a.clear();
                pool.push(a);
            }
        }
    });
}

/// An empty batch for the event loop to collect spans in: a recycled one when this thread has
/// one (its room is that of a drain before).
pub fn batch_vec() -> Vec<SpanRecord> {
    BATCH_POOL.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// Keeps a batch's room for [`batch_vec`] (up to the pool's bound); callers hand it over empty.
pub fn recycle_batch(mut batch: Vec<SpanRecord>) {
    batch.clear();
    BATCH_POOL.with_borrow_mut(|pool| {
        if batch.capacity() > 0 && pool.len() < BATCH_POOL_MAX {
            pool.push(batch);
        }
    });
}

/// Lower-case hex of an id.
pub fn hex(id: &[u8]) -> String {
    use std::fmt::Write;
    id.iter().fold(String::with_capacity(id.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(n: u8) -> Vec<SpanRecord> {
        let r = ProcessResource::for_test(1, "a");
        (0..n).map(|i| SpanRecord::for_test(i, &r)).collect()
    }

    /// Encoded spans' attribute lists come back emptied to the next spans built on the thread,
    /// up to the pool's bound; lists that grew too large and batches are handled alike.
    #[test]
    fn attribute_lists_and_batches_are_reused_within_bounds() {
        // Tests share threads of the harness: start from an empty pool.
        ATTR_POOL.with_borrow_mut(Vec::clear);
        BATCH_POOL.with_borrow_mut(Vec::clear);
        let mut batch = spans(3);
        batch[0].attributes.reserve(20);
        batch[2].attributes = Vec::with_capacity(ATTR_POOL_MAX_CAPACITY + 1);
        let kept = batch[0].attributes.as_ptr();
        recycle(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(ATTR_POOL.with_borrow(Vec::len), 2, "the oversized list is not kept");
        let a = attr_list(20);
        let b = attr_list(20);
        assert!(a.is_empty() && b.is_empty() && a.capacity() >= 20 && b.capacity() >= 20);
        assert!([a.as_ptr(), b.as_ptr()].contains(&kept));
        assert_eq!(attr_list(4).capacity(), 4, "a fresh list once the pool is empty");

        let mut many = spans(200);
        for _ in 0..6 {
            many.extend(spans(200));
        }
        recycle(&mut many);
        assert_eq!(ATTR_POOL.with_borrow(Vec::len), ATTR_POOL_MAX);
        ATTR_POOL.with_borrow_mut(Vec::clear);

        let room = batch.capacity();
        recycle_batch(batch);
        assert_eq!(batch_vec().capacity(), room);
        assert_eq!(batch_vec().capacity(), 0, "a new batch once the pool is empty");
        for _ in 0..BATCH_POOL_MAX + 2 {
            recycle_batch(Vec::with_capacity(8));
        }
        assert_eq!(BATCH_POOL.with_borrow(Vec::len), BATCH_POOL_MAX);
        BATCH_POOL.with_borrow_mut(Vec::clear);
    }
}
