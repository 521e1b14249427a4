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
    Int(i64),
    Bool(bool),
}

impl AttrValue {
    /// The text of a string value (None for other kinds).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
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
    pub trace_state: Option<String>,
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

/// Lower-case hex of an id.
pub fn hex(id: &[u8]) -> String {
    use std::fmt::Write;
    id.iter().fold(String::with_capacity(id.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
