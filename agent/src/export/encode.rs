//! OTLP protobuf encoding of [`SpanRecord`]s, straight from Waybill's own span model.
//!
//! The agent builds every span itself (ids, parents, timestamps), so going through the SDK's
//! `SpanData` and then `opentelemetry-proto`'s message structs would copy every attribute key and
//! value twice per span, and a retry would copy the whole batch again. Instead one batch is
//! encoded once, into one `ExportTraceServiceRequest` body (one `ResourceSpans` per traced
//! process), with `prost`'s wire-format primitives, and the same bytes are sent again on a retry.
//!
//! Every message is written with its exact length computed first (`*_len`), as `prost`'s generated
//! code does. The unit tests decode the output with `opentelemetry-proto`'s generated types and
//! compare field by field, so the encoding is checked by the official schema.
//!
//! Field numbers are those of `opentelemetry/proto/{collector/trace,trace,resource,common}/v1`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use opentelemetry::Value;
use opentelemetry::trace::TraceState;
use opentelemetry_sdk::Resource;
use prost::encoding::{WireType, encoded_len_varint, key_len};

use super::otlp::{PARENT_SOURCE_ATTR, SCOPE_NAME, to_resource};
use crate::stitch::span::{AttrValue, ParentSource, ProcessResource, SpanKind, SpanRecord, SpanStatus};

/// `Span.flags`: bit 8 says whether bit 9 (parent is remote) is known.
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;
const TRACE_FLAG_SAMPLED: u32 = 0x01;
/// `Span.SpanKind`.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// `Status.StatusCode`.
const STATUS_ERROR: u64 = 2;

/// Length of a length-delimited field with tag `tag` and a body of `n` bytes.
fn ld_len(tag: u32, n: usize) -> usize {
    key_len(tag) + encoded_len_varint(n as u64) + n
}

// The writers below go to a `Vec<u8>` whose capacity is the exact total computed first, and are
// small enough to inline: most varints here (tags, lengths) are one byte, and a call per byte
// through `BufMut` was a tenth of the encoder's time.

#[inline(always)]
fn put_raw_varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[inline(always)]
fn put_key(tag: u32, wire: WireType, buf: &mut Vec<u8>) {
    put_raw_varint(u64::from(tag << 3 | wire as u32), buf);
}

#[inline(always)]
fn put_ld_header(tag: u32, n: usize, buf: &mut Vec<u8>) {
    put_key(tag, WireType::LengthDelimited, buf);
    put_raw_varint(n as u64, buf);
}

#[inline(always)]
fn put_bytes(tag: u32, v: &[u8], buf: &mut Vec<u8>) {
    put_ld_header(tag, v.len(), buf);
    buf.extend_from_slice(v);
}

#[inline(always)]
fn put_fixed64(tag: u32, v: u64, buf: &mut Vec<u8>) {
    put_key(tag, WireType::SixtyFourBit, buf);
    buf.extend_from_slice(&v.to_le_bytes());
}

#[inline(always)]
fn put_varint(tag: u32, v: u64, buf: &mut Vec<u8>) {
    put_key(tag, WireType::Varint, buf);
    put_raw_varint(v, buf);
}

/// An attribute value as OTLP `AnyValue` sees it.
enum Any<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    Double(f64),
}

impl<'a> From<&'a AttrValue> for Any<'a> {
    fn from(v: &'a AttrValue) -> Self {
        match v {
            AttrValue::Str(s) => Any::Str(s.as_ref()),
            AttrValue::Shared(s) => Any::Str(s),
            AttrValue::Int(i) => Any::Int(*i),
            AttrValue::Bool(b) => Any::Bool(*b),
        }
    }
}

impl Any<'_> {
    /// Length of the `AnyValue` message body.
    fn len(&self) -> usize {
        match self {
            Any::Str(s) => ld_len(1, s.len()),
            Any::Bool(_) => key_len(2) + 1,
            Any::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
            Any::Double(_) => key_len(4) + 8,
        }
    }

    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Any::Str(s) if s.len() < 0x80 => {
                buf.extend_from_slice(&[0x0a, s.len() as u8]);
                buf.extend_from_slice(s.as_bytes());
            }
            Any::Str(s) => put_bytes(1, s.as_bytes(), buf),
            Any::Bool(b) => put_varint(2, u64::from(*b), buf),
            Any::Int(i) => put_varint(3, *i as u64, buf),
            Any::Double(d) => {
                put_key(4, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&d.to_le_bytes());
            }
        }
    }
}

/// Length of a `KeyValue` message body.
fn kv_len(key: &str, v: &Any<'_>) -> usize {
    ld_len(1, key.len()) + ld_len(2, v.len())
}

/// A `KeyValue` as field `tag` of its parent.
fn put_kv(tag: u32, key: &str, v: &Any<'_>, buf: &mut Vec<u8>) {
    let v_len = v.len();
    let len = ld_len(1, key.len()) + ld_len(2, v_len);
    if tag < 16 && len < 0x80 {
        // Nearly every attribute: each tag and length is one byte, so the headers go in as two
        // short runs instead of one `push` (and capacity check) per byte.
        buf.extend_from_slice(&[(tag << 3) as u8 | WireType::LengthDelimited as u8, len as u8, 0x0a, key.len() as u8]);
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&[0x12, v_len as u8]);
        v.put(buf);
        return;
    }
    put_ld_header(tag, len, buf);
    put_bytes(1, key.as_bytes(), buf);
    put_ld_header(2, v_len, buf);
    v.put(buf);
}

/// A span's `tracestate`, if it is valid W3C `tracestate` (as the SDK would have exported it).
fn trace_state(r: &SpanRecord) -> Option<String> {
    let ts = TraceState::from_str(r.trace_state.as_deref()?).ok()?.header();
    (!ts.is_empty()).then_some(ts)
}

/// One span, with the length of its message body computed once.
struct SpanEnc<'a> {
    r: &'a SpanRecord,
    trace_state: Option<String>,
    status_len: usize,
    len: usize,
}

impl<'a> SpanEnc<'a> {
    fn new(r: &'a SpanRecord) -> Self {
        let trace_state = r.trace_state.as_ref().and_then(|_| trace_state(r));
        let status_len = match &r.status {
            SpanStatus::Unset => 0,
            SpanStatus::Error(m) => ld_len(2, m.len()) + key_len(3) + 1,
        };
        let mut len = ld_len(1, 16) + ld_len(2, 8);
        if let Some(ts) = &trace_state {
            len += ld_len(3, ts.len());
        }
        if r.parent_span_id.is_some() {
            len += ld_len(4, 8);
        }
        len += ld_len(5, r.name.len()) + key_len(6) + 1 + (key_len(7) + 8) + (key_len(8) + 8);
        for (k, v) in &r.attributes {
            let k: &str = k.as_ref();
            len += ld_len(9, kv_len(k, &Any::from(v)));
        }
        len += ld_len(9, kv_len(PARENT_SOURCE_ATTR, &Any::Str(r.parent_source.as_str())));
        if status_len > 0 {
            len += ld_len(15, status_len);
        }
        len += key_len(16) + 4;
        SpanEnc { r, trace_state, status_len, len }
    }

    fn put(&self, buf: &mut Vec<u8>) {
        let r = self.r;
        put_ld_header(2, self.len, buf);
        put_bytes(1, &r.trace_id, buf);
        put_bytes(2, &r.span_id, buf);
        if let Some(ts) = &self.trace_state {
            put_bytes(3, ts.as_bytes(), buf);
        }
        if let Some(p) = &r.parent_span_id {
            put_bytes(4, p, buf);
        }
        put_bytes(5, r.name.as_bytes(), buf);
        put_varint(
            6,
            match r.kind {
                SpanKind::Server => KIND_SERVER,
                SpanKind::Client => KIND_CLIENT,
            },
            buf,
        );
        put_fixed64(7, r.start_unix_ns, buf);
        put_fixed64(8, r.end_unix_ns, buf);
        for (k, v) in &r.attributes {
            let k: &str = k.as_ref();
            put_kv(9, k, &Any::from(v), buf);
        }
        put_kv(9, PARENT_SOURCE_ATTR, &Any::Str(r.parent_source.as_str()), buf);
        if let SpanStatus::Error(m) = &r.status {
            put_ld_header(15, self.status_len, buf);
            put_bytes(2, m.as_bytes(), buf);
            put_varint(3, STATUS_ERROR, buf);
        }
        put_key(16, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&flags(r).to_le_bytes());
    }
}

/// W3C trace flags plus whether the parent is remote (a parent from an incoming header is).
fn flags(r: &SpanRecord) -> u32 {
    let mut f = FLAGS_HAS_IS_REMOTE;
    if r.sampled {
        f |= TRACE_FLAG_SAMPLED;
    }
    if r.parent_span_id.is_some() && r.parent_source == ParentSource::Header {
        f |= FLAGS_IS_REMOTE;
    }
    f
}

/// A resource attribute value.
fn any_of(v: &Value) -> (Any<'_>, Option<String>) {
    match v {
        Value::String(s) => (Any::Str(s.as_str()), None),
        Value::I64(i) => (Any::Int(*i), None),
        Value::Bool(b) => (Any::Bool(*b), None),
        Value::F64(d) => (Any::Double(*d), None),
        // Arrays do not occur in Waybill's resources; kept readable rather than dropped.
        other => (Any::Str(""), Some(other.to_string())),
    }
}

/// The `Resource` message body of one process (its SDK [`Resource`], encoded).
fn resource_body(res: &Resource) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    for (k, v) in res.iter() {
        let (any, text) = any_of(v);
        let any = match &text {
            Some(t) => Any::Str(t.as_str()),
            None => any,
        };
        put_kv(1, k.as_str(), &any, &mut out);
    }
    out
}

/// Length of the `InstrumentationScope` message body.
fn scope_len() -> usize {
    ld_len(1, SCOPE_NAME.len()) + ld_len(2, env!("CARGO_PKG_VERSION").len())
}

fn put_scope(buf: &mut Vec<u8>) {
    put_ld_header(1, scope_len(), buf);
    put_bytes(1, SCOPE_NAME.as_bytes(), buf);
    put_bytes(2, env!("CARGO_PKG_VERSION").as_bytes(), buf);
}

/// Encodes batches into `ExportTraceServiceRequest` bodies. Holds the encoded `Resource` of every
/// process seen recently (a resource is the same for all of a process's spans).
pub struct Encoder {
    host: Option<String>,
    /// Keyed by the `Arc`'s address; the `Weak` tells whether that `Arc` is still the one (an
    /// address can be reused once the resource is freed).
    resources: HashMap<usize, (std::sync::Weak<ProcessResource>, Bytes)>,
}

/// Resources cached at most; beyond, the cache is rebuilt from the live ones.
const MAX_CACHED_RESOURCES: usize = 4096;

impl Encoder {
    pub fn new(host: Option<String>) -> Self {
        Encoder { host, resources: HashMap::new() }
    }

    fn resource(&mut self, p: &Arc<ProcessResource>) -> Bytes {
        let key = Arc::as_ptr(p) as usize;
        if let Some((weak, body)) = self.resources.get(&key) {
            if weak.upgrade().is_some_and(|live| Arc::ptr_eq(&live, p)) {
                return body.clone();
            }
        }
        if self.resources.len() >= MAX_CACHED_RESOURCES {
            self.resources.retain(|_, (w, _)| w.strong_count() > 0);
            if self.resources.len() >= MAX_CACHED_RESOURCES {
                self.resources.clear();
            }
        }
        let body = Bytes::from(resource_body(&to_resource(p, self.host.as_deref())));
        self.resources.insert(key, (Arc::downgrade(p), body.clone()));
        body
    }

    /// One request body for `batch`: one `ResourceSpans` per process, in order of first
    /// appearance, spans in arrival order within each.
    pub fn encode(&mut self, batch: &[SpanRecord]) -> Bytes {
        // Group by process (the batch holds every `Arc`, so addresses are stable while grouping).
        let mut groups: Vec<(&Arc<ProcessResource>, Vec<SpanEnc<'_>>)> = Vec::new();
        let mut index: HashMap<*const ProcessResource, usize> = HashMap::new();
        for r in batch {
            let i = *index.entry(Arc::as_ptr(&r.resource)).or_insert_with(|| {
                groups.push((&r.resource, Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(SpanEnc::new(r));
            crate::sched::courtesy();
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut total = 0;
        for (p, spans) in &groups {
            let resource = self.resource(p);
            let scope_spans = ld_len(1, scope_len()) + spans.iter().map(|s| ld_len(2, s.len)).sum::<usize>();
            let resource_spans = ld_len(1, resource.len()) + ld_len(2, scope_spans);
            total += ld_len(1, resource_spans);
            parts.push((resource, scope_spans, resource_spans));
        }
        let mut buf = Vec::with_capacity(total);
        for ((_, spans), (resource, scope_spans, resource_spans)) in groups.iter().zip(parts) {
            // ExportTraceServiceRequest.resource_spans
            put_ld_header(1, resource_spans, &mut buf);
            // ResourceSpans.resource
            put_bytes(1, &resource, &mut buf);
            // ResourceSpans.scope_spans
            put_ld_header(2, scope_spans, &mut buf);
            put_scope(&mut buf);
            for s in spans {
                s.put(&mut buf);
                crate::sched::courtesy();
            }
        }
        debug_assert_eq!(buf.len(), total);
        Bytes::from(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as PV;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind as PKind;
    use prost::Message;

    fn record(n: u8, p: &Arc<ProcessResource>) -> SpanRecord {
        let mut r = SpanRecord::for_test(n, p);
        r.attributes.extend([
            ("http.response.status_code".into(), AttrValue::Int(200)),
            ("server.port".into(), AttrValue::Int(-1)),
            ("tls".into(), AttrValue::Bool(true)),
            ("long".into(), AttrValue::from("x".repeat(300))),
        ]);
        r
    }

    fn decode(b: &Bytes) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(b.as_ref()).expect("valid OTLP protobuf")
    }

    fn attr(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<PV> {
        kvs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()).and_then(|v| v.value)
    }

    #[test]
    fn spans_decode_with_the_official_schema() {
        let p = ProcessResource::for_test(7, "shop");
        let mut a = record(1, &p);
        a.parent_span_id = Some([9; 8]);
        a.parent_source = ParentSource::Header;
        a.trace_state = Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".into());
        a.kind = SpanKind::Client;
        a.status = SpanStatus::Error("boom".into());
        let mut b = record(2, &p);
        b.trace_state = Some("not a valid=trace state=".into());
        b.sampled = false;
        let req = decode(&Encoder::new(Some("box".into())).encode(&[a, b]));
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let res = rs.resource.as_ref().unwrap();
        assert_eq!(attr(&res.attributes, "service.name"), Some(PV::StringValue("shop".into())));
        assert_eq!(attr(&res.attributes, "process.pid"), Some(PV::IntValue(7)));
        assert_eq!(attr(&res.attributes, "host.name"), Some(PV::StringValue("box".into())));
        assert_eq!(attr(&res.attributes, "telemetry.sdk.language"), Some(PV::StringValue("rust".into())));
        assert_eq!(rs.scope_spans.len(), 1);
        let scope = rs.scope_spans[0].scope.as_ref().unwrap();
        assert_eq!((scope.name.as_str(), scope.version.as_str()), ("waybill", env!("CARGO_PKG_VERSION")));
        let spans = &rs.scope_spans[0].spans;
        assert_eq!(spans.len(), 2);

        let s = &spans[0];
        assert_eq!((s.trace_id.as_slice(), s.span_id.as_slice()), (&[1u8; 16][..], &[1u8; 8][..]));
        assert_eq!(s.parent_span_id, vec![9; 8]);
        assert_eq!(s.trace_state, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
        assert_eq!(s.name, "span 1");
        assert_eq!(s.kind, PKind::Client as i32);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 5_000_000);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(s.flags, 0x301);
        let st = s.status.as_ref().unwrap();
        assert_eq!((st.code, st.message.as_str()), (2, "boom"));
        assert_eq!(attr(&s.attributes, "http.request.method"), Some(PV::StringValue("GET".into())));
        assert_eq!(attr(&s.attributes, "http.response.status_code"), Some(PV::IntValue(200)));
        assert_eq!(attr(&s.attributes, "server.port"), Some(PV::IntValue(-1)));
        assert_eq!(attr(&s.attributes, "tls"), Some(PV::BoolValue(true)));
        assert_eq!(attr(&s.attributes, "long"), Some(PV::StringValue("x".repeat(300))));
        assert_eq!(attr(&s.attributes, PARENT_SOURCE_ATTR), Some(PV::StringValue("header".into())));

        let s = &spans[1];
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.trace_state, "");
        assert_eq!(s.kind, PKind::Server as i32);
        assert_eq!(s.flags, 0x100);
        assert!(s.status.is_none());
    }

    /// Keys and values on both sides of the one-byte lengths (the short form of `put_kv`) and
    /// past them decode to what was encoded; the body is exactly as long as computed.
    #[test]
    fn attributes_of_every_length_around_one_byte_lengths() {
        let p = ProcessResource::for_test(7, "shop");
        let mut r = SpanRecord::for_test(1, &p);
        r.attributes.clear();
        let keys: Vec<String> = [1, 60, 120, 127, 128, 200].iter().map(|&n| "k".repeat(n)).collect();
        for (i, key) in keys.iter().enumerate() {
            for n in (0..140).chain([200, 16_383, 16_384]) {
                r.attributes.push((format!("{i}{key}{n}").into(), AttrValue::from("v".repeat(n))));
            }
            r.attributes.push((format!("{i}{key}int").into(), AttrValue::Int(i64::MIN)));
        }
        let req = decode(&Encoder::new(None).encode(std::slice::from_ref(&r)));
        let got = &req.resource_spans[0].scope_spans[0].spans[0].attributes;
        assert_eq!(got.len(), r.attributes.len() + 1);
        for (k, v) in &r.attributes {
            let want = match v {
                AttrValue::Str(s) => PV::StringValue(s.to_string()),
                AttrValue::Shared(s) => PV::StringValue(s.to_string()),
                AttrValue::Int(i) => PV::IntValue(*i),
                AttrValue::Bool(b) => PV::BoolValue(*b),
            };
            assert_eq!(attr(got, k), Some(want), "{k}");
        }
    }

    #[test]
    fn one_resource_spans_per_process_in_arrival_order() {
        let (a, b) = (ProcessResource::for_test(1, "a"), ProcessResource::for_test(2, "b"));
        let batch = [record(1, &a), record(2, &b), record(3, &a)];
        let mut enc = Encoder::new(None);
        let req = decode(&enc.encode(&batch));
        let got: Vec<(Option<PV>, Vec<String>)> = req
            .resource_spans
            .iter()
            .map(|rs| {
                (
                    attr(&rs.resource.as_ref().unwrap().attributes, "service.name"),
                    rs.scope_spans[0].spans.iter().map(|s| s.name.clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(PV::StringValue("a".into())), vec!["span 1".to_string(), "span 3".to_string()]),
                (Some(PV::StringValue("b".into())), vec!["span 2".to_string()]),
            ]
        );
        // The cached resource is reused, and an empty batch is an empty request.
        assert_eq!(decode(&enc.encode(&batch)), req);
        assert!(decode(&enc.encode(&[])).resource_spans.is_empty());
    }

    #[test]
    fn a_replaced_resource_is_encoded_afresh() {
        let mut enc = Encoder::new(None);
        let a = ProcessResource::for_test(1, "before");
        let _ = enc.encode(&[record(1, &a)]);
        drop(a);
        let b = ProcessResource::for_test(1, "after");
        let req = decode(&enc.encode(&[record(1, &b)]));
        let res = req.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(attr(&res.attributes, "service.name"), Some(PV::StringValue("after".into())));
    }
}
