//! The OTLP exporter against a real OTLP receiver (rotel, `pip install rotel==0.0.1a15`): spans
//! of two processes over gRPC and over HTTP/protobuf with gzip, checked field by field as received.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use waybill::export::otlp::{Compression, ExportStats, OtlpConfig, Protocol, spawn_otlp};
use waybill::stitch::span::{AttrValue, ParentSource, ProcessResource, SpanKind, SpanRecord, SpanStatus, hex};
use waybill_tests::otlp_receiver::{Proto, ReceivedSpan, Receiver};

const T0: u64 = 1_700_000_000_000_000_000;
const MS: u64 = 1_000_000;

fn process(pid: u32, service: &str) -> Arc<ProcessResource> {
    Arc::new(ProcessResource {
        pid,
        service_name: service.into(),
        attributes: vec![
            ("service.name".into(), service.to_string().into()),
            ("process.pid".into(), AttrValue::Int(pid.into())),
            ("process.executable.name".into(), format!("{service}-bin").into()),
        ],
    })
}

/// A trace across two processes: shop's SERVER root (error, tracestate), its CLIENT call, and
/// api's SERVER span parented by that call through the `traceparent` header.
fn records(trace_byte: u8) -> Vec<SpanRecord> {
    let shop = process(4121, "shop");
    let api = process(77, "api");
    let trace_id = [trace_byte; 16];
    let base = SpanRecord {
        trace_id,
        span_id: [0; 8],
        parent_span_id: None,
        trace_state: None,
        sampled: true,
        name: "".into(),
        kind: SpanKind::Server,
        start_unix_ns: T0,
        end_unix_ns: T0,
        attributes: Vec::new(),
        status: SpanStatus::Unset,
        parent_source: ParentSource::None,
        resource: Arc::clone(&shop),
    };
    vec![
        SpanRecord {
            span_id: [0x11; 8],
            trace_state: Some("rojo=00f067aa0ba902b7".into()),
            name: "POST /orders".into(),
            end_unix_ns: T0 + 847 * MS,
            attributes: vec![
                ("http.request.method".into(), "POST".into()),
                ("http.response.status_code".into(), AttrValue::Int(500)),
                ("url.path".into(), "/orders".into()),
            ],
            status: SpanStatus::Error("HTTP 500".into()),
            ..base.clone()
        },
        SpanRecord {
            span_id: [0x22; 8],
            parent_span_id: Some([0x11; 8]),
            name: "GET".into(),
            kind: SpanKind::Client,
            start_unix_ns: T0 + 25 * MS,
            end_unix_ns: T0 + 755 * MS,
            attributes: vec![
                ("http.request.method".into(), "GET".into()),
                ("server.address".into(), "api".into()),
                ("network.peer.port".into(), AttrValue::Int(8080)),
                ("waybill.truncated".into(), AttrValue::Bool(false)),
            ],
            ..base.clone()
        },
        SpanRecord {
            span_id: [0x33; 8],
            parent_span_id: Some([0x22; 8]),
            name: "GET /price".into(),
            start_unix_ns: T0 + 30 * MS,
            end_unix_ns: T0 + 750 * MS,
            attributes: vec![("http.request.method".into(), "GET".into())],
            parent_source: ParentSource::Header,
            resource: api,
            ..base
        },
    ]
}

/// Sends `spans`, runs `before_close` (blocking) with the channel still open, then closes the
/// channel and waits for the export task to flush and end.
fn export(cfg: OtlpConfig, spans: Vec<SpanRecord>, before_close: impl FnOnce() + Send + 'static) -> Arc<ExportStats> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let stats = Arc::new(ExportStats::default());
        let (tx, rx) = waybill::export::span_queue(16);
        let task = spawn_otlp(cfg, rx, Arc::clone(&stats)).expect("exporter builds");
        assert_eq!(tx.try_send(spans), 0, "queue has room");
        tokio::task::spawn_blocking(before_close).await.unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("export task ends after the channel closes")
            .unwrap();
        stats
    })
}

fn by_id(spans: &[ReceivedSpan], id: [u8; 8]) -> &ReceivedSpan {
    let id = hex(&id);
    spans.iter().find(|s| s.span_id == id).unwrap_or_else(|| panic!("span {id} not received: {spans:#?}"))
}

fn check(received: &[ReceivedSpan], trace_byte: u8) {
    assert_eq!(received.len(), 3, "{received:#?}");
    let trace = hex(&[trace_byte; 16]);
    for s in received {
        assert_eq!(s.trace_id, trace);
        assert_eq!(s.scope_name, "waybill");
        assert_eq!(s.scope_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(s.resource["telemetry.sdk.language"], "rust");
        assert_eq!(s.resource["telemetry.sdk.name"], "opentelemetry");
        assert_eq!(s.resource["telemetry.distro.name"], "waybill");
        assert!(s.resource.contains_key("host.name"), "{s:#?}");
    }

    let root = by_id(received, [0x11; 8]);
    assert_eq!(root.parent_span_id, None);
    assert_eq!(root.name, "POST /orders");
    assert_eq!(root.kind, "Server");
    assert_eq!(root.trace_state, "rojo=00f067aa0ba902b7");
    assert_eq!((root.start_unix_ns, root.end_unix_ns), (T0, T0 + 847 * MS));
    assert_eq!(root.status_code, "Error");
    assert_eq!(root.status_message, "HTTP 500");
    assert_eq!(root.attributes["http.request.method"], "POST");
    assert_eq!(root.attributes["http.response.status_code"], "500");
    assert_eq!(root.attribute_types["http.response.status_code"], "Int");
    assert_eq!(root.attributes["waybill.parent.source"], "none");
    assert_eq!(root.resource["service.name"], "shop");
    assert_eq!(root.resource["process.pid"], "4121");
    assert_eq!(root.resource_types["process.pid"], "Int");
    assert_eq!(root.resource["process.executable.name"], "shop-bin");

    let call = by_id(received, [0x22; 8]);
    assert_eq!(call.parent_span_id.as_deref(), Some(hex(&[0x11; 8]).as_str()));
    assert_eq!(call.name, "GET");
    assert_eq!(call.kind, "Client");
    assert_eq!(call.status_code, "Unset");
    assert_eq!(call.trace_state, "");
    assert_eq!(call.attributes["network.peer.port"], "8080");
    assert_eq!(call.attributes["waybill.truncated"], "false");
    assert_eq!(call.attribute_types["waybill.truncated"], "Bool");
    assert_eq!(call.attributes.len(), 5, "{call:#?}");
    assert_eq!(call.resource["service.name"], "shop");
    assert_eq!(call.resource["process.pid"], "4121");

    let served = by_id(received, [0x33; 8]);
    assert_eq!(served.parent_span_id.as_deref(), Some(hex(&[0x22; 8]).as_str()));
    assert_eq!(served.kind, "Server");
    assert_eq!(served.attributes["waybill.parent.source"], "header");
    assert_eq!(served.resource["service.name"], "api");
    assert_eq!(served.resource["process.pid"], "77");
    assert_eq!(served.resource["process.executable.name"], "api-bin");
}

fn quick(mut cfg: OtlpConfig) -> OtlpConfig {
    cfg.schedule_delay = Duration::from_millis(100);
    cfg.timeout = Some(Duration::from_secs(5));
    cfg
}

#[test]
fn exports_over_grpc() {
    let receiver = Arc::new(Receiver::start(Proto::Grpc));
    let cfg = quick(OtlpConfig::new(Protocol::Grpc, &receiver.endpoint()));
    // Exported on the schedule delay, while the channel is still open.
    let r = Arc::clone(&receiver);
    let stats = export(cfg, records(0xa1), move || {
        let spans = r.wait_for_spans(3, Duration::from_secs(5));
        assert_eq!(spans.len(), 3, "not exported within 5 s: {}", r.raw_output());
    });
    assert_eq!(stats.exported.load(Ordering::Relaxed), 3, "{stats:?}");
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0, "{stats:?}");
    check(&receiver.spans(), 0xa1);
}

#[test]
fn exports_over_http_protobuf_gzip() {
    let receiver = Receiver::start(Proto::HttpProtobuf);
    let mut cfg = quick(OtlpConfig::new(Protocol::HttpProtobuf, &receiver.endpoint()));
    assert!(cfg.endpoint.ends_with("/v1/traces"), "{}", cfg.endpoint);
    cfg.compression = Some(Compression::Gzip);
    let stats = export(cfg, records(0xb2), || {});
    assert_eq!(stats.exported.load(Ordering::Relaxed), 3, "{stats:?}");
    let spans = receiver.wait_for_spans(3, Duration::from_secs(10));
    check(&spans, 0xb2);
}

#[test]
fn unreachable_collector_counts_retries_and_failures() {
    // A port nobody listens on: every request fails fast (connection refused).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let mut cfg = quick(OtlpConfig::new(protocol, &format!("http://127.0.0.1:{port}")));
        cfg.max_retries = 2;
        cfg.initial_backoff = Duration::from_millis(10);
        let stats = export(cfg, records(0xc3), || {});
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(get(&stats.exported), 0, "{protocol:?} {stats:?}");
        assert_eq!(get(&stats.failed), 3, "{protocol:?} {stats:?}");
        // Two groups (shop: 2 spans, api: 1), each retried twice.
        assert_eq!(get(&stats.retried), 6, "{protocol:?} {stats:?}");
    }
}

#[test]
fn exports_over_grpc_gzip() {
    let receiver = Receiver::start(Proto::Grpc);
    let mut cfg = quick(OtlpConfig::new(Protocol::Grpc, &receiver.endpoint()));
    cfg.compression = Some(Compression::Gzip);
    let stats = export(cfg, records(0xd4), || {});
    assert_eq!(stats.exported.load(Ordering::Relaxed), 3, "{stats:?}");
    let spans = receiver.wait_for_spans(3, Duration::from_secs(10));
    check(&spans, 0xd4);
}
