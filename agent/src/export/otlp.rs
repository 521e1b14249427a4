//! OTLP trace export: one task per agent, fed batches of finished spans.
//!
//! Waybill decides span ids, parents and timestamps itself, so it uses neither the SDK's tracer nor
//! its batch processor nor its `SpanData`: the task collects [`SpanRecord`]s into batches by size
//! (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512) or time (`OTEL_BSP_SCHEDULE_DELAY`, 1000 ms after the
//! first span of a batch), encodes each batch once into an OTLP `ExportTraceServiceRequest`
//! ([`super::encode`]: one `ResourceSpans` per traced process) and sends the bytes over gRPC or
//! HTTP/protobuf ([`super::transport`]). While a request is in flight the task keeps receiving and
//! encoding, so the span queue never backs up behind a slow collector.
//!
//! Failed requests are retried with exponential backoff, the same bytes again. Retryable failures
//! (collector unreachable, timeouts, gRPC `UNAVAILABLE`/`RESOURCE_EXHAUSTED`/…, HTTP
//! 429/502/503/504) are retried without a limit by default: during a collector outage nothing is
//! lost until the backlog bound (`--export-backlog`, in spans) is reached; past it the oldest
//! waiting batch is dropped and counted. Permanent failures (a collector that rejects the data)
//! are given up on at once and counted as failed, as are spans a collector reports rejected in a
//! `partial_success`. When the channel closes the task flushes what is left, bounded in time.
//!
//! Configuration follows the OpenTelemetry exporter environment variables, see
//! [`OtlpConfig::from_env`].

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::SpanReceiver;
use super::encode::Encoder;
use super::transport::{Accepted, SendError, Sender};
use crate::stitch::span::{AttrValue, ProcessResource, SpanRecord};

pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_COMPRESSION";
pub const OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION";
pub const OTEL_EXPORTER_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
pub const OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
pub const OTEL_EXPORTER_OTLP_INSECURE: &str = "OTEL_EXPORTER_OTLP_INSECURE";
pub const OTEL_EXPORTER_OTLP_TRACES_INSECURE: &str = "OTEL_EXPORTER_OTLP_TRACES_INSECURE";
pub const OTEL_BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
pub const OTEL_EXPORTER_OTLP_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
pub const OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";
pub const OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE";
pub const OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE";
pub const OTEL_EXPORTER_OTLP_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_CLIENT_KEY";
pub const OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY";
pub const OTEL_EXPORTER_OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
pub const OTEL_EXPORTER_OTLP_TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
pub const OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_METRICS_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION";
pub const OTEL_EXPORTER_OTLP_METRICS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT";
pub const OTEL_EXPORTER_OTLP_METRICS_INSECURE: &str = "OTEL_EXPORTER_OTLP_METRICS_INSECURE";
pub const OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE";
pub const OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE";
pub const OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY: &str = "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY";
pub const OTEL_METRICS_EXPORTER: &str = "OTEL_METRICS_EXPORTER";
pub const OTEL_METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";
pub const OTEL_METRIC_EXPORT_TIMEOUT: &str = "OTEL_METRIC_EXPORT_TIMEOUT";
pub const OTEL_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";

/// Instrumentation scope name of every exported span.
pub const SCOPE_NAME: &str = "waybill";
/// Span attribute telling how the parent was found ([`ParentSource::as_str`]).
pub const PARENT_SOURCE_ATTR: &str = "waybill.parent.source";

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`grpc`), default port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), default port 4318. The spec default.
    HttpProtobuf,
}

impl Protocol {
    /// The value used in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            other => Err(format!("unsupported protocol '{other}' (allowed: grpc, http/protobuf)")),
        }
    }
}

/// Request body compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A configuration value is invalid; `var` names the environment variable or setting.
    #[error("{var}: {message}")]
    Config { var: &'static str, message: String },
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
    #[error("the OTLP export task must be spawned from within a Tokio runtime")]
    NoRuntime,
}

/// Where and how spans are exported, plus the export task's batching and retry settings.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpConfig {
    /// The URL spans are sent to, used as is. HTTP: the full traces URL (`…/v1/traces`). gRPC: the
    /// collector address, e.g. `http://127.0.0.1:4317`; without a scheme, `https://` is assumed
    /// unless `OTEL_EXPORTER_OTLP_[TRACES_]INSECURE=true`.
    pub endpoint: String,
    pub protocol: Protocol,
    pub compression: Option<Compression>,
    /// Per-request timeout. `None`: `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` or 10 s.
    pub timeout: Option<Duration>,
    /// Most spans per export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub max_batch_size: usize,
    /// Longest wait after a batch's first span before it is exported (`OTEL_BSP_SCHEDULE_DELAY`).
    pub schedule_delay: Duration,
    /// Most spans held while exports are slow or failing; beyond, the oldest are dropped.
    pub max_backlog: usize,
    /// Requests in flight at once (`--export-concurrency`).
    pub max_concurrent: usize,
    /// Retries of one request after retryable failures (`u32::MAX`, the default: until it
    /// succeeds, the backlog bound limiting what is held meanwhile). Permanent failures are never
    /// retried.
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long the final flush may take once the channel is closed.
    pub shutdown_timeout: Duration,
    /// CA and client certificate files for `https://` endpoints.
    pub tls: TlsFiles,
}

const DEFAULT_MAX_BATCH: usize = 512;
const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_millis(1000);
/// Spans held, encoded (~0.4 KiB each, ~7 MiB in all), while the collector is slow or
/// unreachable: 16 s of outage at 1000 spans/s. Bounds the agent's peak memory when a collector
/// cannot keep up (at 65536 a Redis pipeline benchmark took the agent to 108 MiB).
pub const DEFAULT_MAX_BACKLOG: usize = 16384;
/// Export requests in flight at once: one at a time tops out at ~512 spans per collector round
/// trip, which a collector competing for CPU with the traced application makes slow (measured:
/// 15–20 % of the spans dropped from the backlog at nginx saturation with 1).
pub const DEFAULT_MAX_CONCURRENT: usize = 4;

impl OtlpConfig {
    /// A configuration with default settings. `base_endpoint` is the collector's base URL
    /// (`http://host:4318` or `http://host:4317`); for HTTP `/v1/traces` is appended, as the spec
    /// does for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn new(protocol: Protocol, base_endpoint: &str) -> OtlpConfig {
        let endpoint = match protocol {
            Protocol::Grpc => base_endpoint.to_string(),
            Protocol::HttpProtobuf => append_traces_path(base_endpoint),
        };
        OtlpConfig {
            endpoint,
            protocol,
            compression: None,
            timeout: None,
            max_batch_size: DEFAULT_MAX_BATCH,
            schedule_delay: DEFAULT_SCHEDULE_DELAY,
            max_backlog: DEFAULT_MAX_BACKLOG,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_retries: u32::MAX,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
            tls: TlsFiles::default(),
        }
    }

    /// Reads the standard OpenTelemetry variables. `Ok(None)` when neither
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` nor `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP export
    /// off).
    ///
    /// - endpoint: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used as is; `OTEL_EXPORTER_OTLP_ENDPOINT`
    ///   gets `/v1/traces` appended for HTTP.
    /// - `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: `grpc` or `http/protobuf`; default
    ///   `http/protobuf`, the spec's default.
    /// - `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`: `gzip` or `none`.
    /// - `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`: milliseconds.
    /// - `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_SCHEDULE_DELAY` (ms).
    /// - `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` (`k=v,k2=v2`, URL-encoded values) and
    ///   `OTEL_EXPORTER_OTLP_[TRACES_]INSECURE` are read by `opentelemetry-otlp` itself when the
    ///   exporter is built.
    pub fn from_env() -> Result<Option<OtlpConfig>, ExportError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any variable source (for tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<OtlpConfig>, ExportError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let millis = |var: &'static str, v: String| {
            v.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| ExportError::Config {
                var,
                message: format!("'{v}' is not a whole number of milliseconds"),
            })
        };
        let Some(t) = signal_transport(
            &get,
            &SignalVars {
                endpoint: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                protocol: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
                compression: OTEL_EXPORTER_OTLP_TRACES_COMPRESSION,
                timeout: OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
                insecure: OTEL_EXPORTER_OTLP_TRACES_INSECURE,
                certificate: OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE,
                client_certificate: OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE,
                client_key: OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY,
                path: "/v1/traces",
            },
        )?
        else {
            return Ok(None);
        };
        let Transport { endpoint, protocol, compression, timeout, tls } = t;
        let mut cfg = OtlpConfig::new(protocol, "");
        cfg.endpoint = endpoint;
        cfg.compression = compression;
        cfg.timeout = timeout;
        cfg.tls = tls;
        if let Some(v) = get(OTEL_BSP_SCHEDULE_DELAY) {
            cfg.schedule_delay = millis(OTEL_BSP_SCHEDULE_DELAY, v)?;
        }
        if let Some(v) = get(OTEL_BSP_MAX_EXPORT_BATCH_SIZE) {
            cfg.max_batch_size = match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(ExportError::Config {
                        var: OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
                        message: format!("'{v}' is not a positive whole number"),
                    });
                }
            };
        }
        Ok(Some(cfg))
    }
}

fn has_scheme(endpoint: &str) -> bool {
    endpoint.split_once("://").is_some_and(|(scheme, _)| !scheme.contains(['/', '?', '#']))
}

fn append_traces_path(base: &str) -> String {
    format!("{}/v1/traces", base.strip_suffix('/').unwrap_or(base))
}

/// Export counters (spans), shared with the self-metrics.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans given up on after all retries (or not sent in time at shutdown).
    pub failed: AtomicU64,
    /// Spans dropped from a full backlog (oldest first).
    pub dropped: AtomicU64,
    /// Spans sent again after a failed request (counted once per retry).
    pub retried: AtomicU64,
    /// Spans held by the export task right now (backlog plus the request in flight).
    pub pending: AtomicU64,
}

impl ExportStats {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Builds the sender for `cfg` (headers from `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`) and spawns
/// the export task on the current Tokio runtime.
///
/// The task ends once `rx` is closed (every sender dropped) and what it holds is flushed, at most
/// `cfg.shutdown_timeout` later.
pub fn spawn_otlp(cfg: OtlpConfig, rx: SpanReceiver, stats: Arc<ExportStats>) -> Result<JoinHandle<()>, ExportError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
    let headers = super::transport::headers_from(&|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))?;
    let _guard = handle.enter();
    let sender = super::transport::build(&cfg.transport(), headers)?;
    Ok(handle.spawn(run(sender, rx, stats, cfg)))
}

/// The transport settings shared by the span and the metric exporter.
#[derive(Clone, Debug, PartialEq)]
pub struct Transport {
    pub endpoint: String,
    pub protocol: Protocol,
    pub compression: Option<Compression>,
    pub timeout: Option<Duration>,
    pub tls: TlsFiles,
}

impl Transport {
    /// A gRPC endpoint must say `http://` or `https://`.
    pub(crate) fn require_scheme(&self) -> Result<(), ExportError> {
        if has_scheme(&self.endpoint) {
            return Ok(());
        }
        Err(ExportError::Config {
            var: "endpoint",
            message: format!("gRPC endpoint '{}' needs a scheme (http:// or https://)", self.endpoint),
        })
    }
}

/// PEM files for TLS (`OTEL_EXPORTER_OTLP_[SIGNAL_]CERTIFICATE`, `…_CLIENT_CERTIFICATE`,
/// `…_CLIENT_KEY`). Without a CA file the system roots are trusted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TlsFiles {
    /// (variable, path) of the CA bundle trusted for the collector's certificate.
    pub ca: Option<(&'static str, String)>,
    /// (variable, path) of the client certificate and key (mutual TLS); both or neither.
    pub client_cert: Option<(&'static str, String)>,
    pub client_key: Option<(&'static str, String)>,
}

/// PEM bytes: the CA bundle, and the client (certificate, key) pair.
pub(crate) type TlsPem = (Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>);

impl TlsFiles {
    pub(crate) fn read(&self) -> Result<TlsPem, ExportError> {
        let load = |f: &Option<(&'static str, String)>| -> Result<Option<Vec<u8>>, ExportError> {
            match f {
                None => Ok(None),
                Some((var, path)) => std::fs::read(path)
                    .map(Some)
                    .map_err(|e| ExportError::Config { var, message: format!("cannot read '{path}': {e}") }),
            }
        };
        let ca = load(&self.ca)?;
        let identity = match (load(&self.client_cert)?, load(&self.client_key)?) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                let var = self.client_cert.as_ref().or(self.client_key.as_ref()).map_or("", |(v, _)| *v);
                return Err(ExportError::Config {
                    var,
                    message: "a client certificate needs its key and a key its certificate (set both)".into(),
                });
            }
        };
        Ok((ca, identity))
    }

    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }
}

impl OtlpConfig {
    fn transport(&self) -> Transport {
        Transport {
            endpoint: self.endpoint.clone(),
            protocol: self.protocol,
            compression: self.compression,
            timeout: self.timeout,
            tls: self.tls.clone(),
        }
    }
}

/// Builds a span or metric exporter (`$builder`: `SpanExporter::builder()` or
/// `MetricExporter::builder()`) for a [`Transport`]; retries are Waybill's, not the crate's.
macro_rules! build_otlp {
    ($builder:expr, $t:expr) => {{
        let t: &Transport = $t;
        // One crypto provider for reqwest and tonic (`https://` endpoints). Fails harmlessly when
        // someone installed one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let build_err = |e: opentelemetry_otlp::ExporterBuildError| ExportError::Build(e.to_string());
        let retry = opentelemetry_otlp::RetryPolicy::disabled();
        let compression = t.compression.map(|Compression::Gzip| opentelemetry_otlp::Compression::Gzip);
        let (ca, identity) = t.tls.read()?;
        match t.protocol {
            Protocol::Grpc => {
                t.require_scheme()?;
                let mut b = $builder.with_tonic().with_endpoint(t.endpoint.clone()).with_retry_policy(retry);
                if let Some(d) = t.timeout {
                    b = b.with_timeout(d);
                }
                if let Some(c) = compression {
                    b = b.with_compression(c);
                }
                if t.endpoint.starts_with("https://") {
                    b = b.with_tls_config(super::transport::grpc_tls(ca, identity));
                }
                b.build().map_err(build_err)
            }
            Protocol::HttpProtobuf => {
                let mut b = $builder
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(t.endpoint.clone())
                    .with_retry_policy(retry);
                if let Some(d) = t.timeout {
                    b = b.with_timeout(d);
                }
                if let Some(c) = compression {
                    b = b.with_compression(c);
                }
                if !t.tls.is_empty() {
                    let timeout = t.timeout.unwrap_or(Duration::from_secs(10));
                    b = b.with_http_client(super::transport::http_client(ca, identity, timeout)?);
                }
                b.build().map_err(build_err)
            }
        }
    }};
}

/// The OTLP metric exporter for the RED metrics (cumulative temporality).
pub fn build_metric_exporter(cfg: &MetricsConfig) -> Result<opentelemetry_otlp::MetricExporter, ExportError> {
    build_otlp!(opentelemetry_otlp::MetricExporter::builder(), &cfg.transport)
}

/// Where and how often RED metrics are exported (OTLP metrics).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsConfig {
    /// HTTP: the full metrics URL (`…/v1/metrics`); gRPC: the collector address.
    pub transport: Transport,
    /// `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60000).
    pub interval: Duration,
    /// `OTEL_METRIC_EXPORT_TIMEOUT` (ms, default 30000): bound of the final export at shutdown.
    pub export_timeout: Duration,
}

impl MetricsConfig {
    pub fn from_env() -> Result<Option<MetricsConfig>, ExportError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// `Ok(None)` when `OTEL_METRICS_EXPORTER=none` or no endpoint is set
    /// (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` as is, else `OTEL_EXPORTER_OTLP_ENDPOINT`, with
    /// `/v1/metrics` appended for HTTP). The other variables follow the traces ones, with
    /// `METRICS_` in place of `TRACES_`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<MetricsConfig>, ExportError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        match get(OTEL_METRICS_EXPORTER).map(|v| v.trim().to_ascii_lowercase()) {
            None => {}
            Some(v) if v == "otlp" => {}
            Some(v) if v == "none" => return Ok(None),
            Some(other) => {
                return Err(ExportError::Config {
                    var: OTEL_METRICS_EXPORTER,
                    message: format!("unsupported exporter '{other}' (allowed: otlp, none)"),
                });
            }
        }
        let t = signal_transport(
            &get,
            &SignalVars {
                endpoint: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
                protocol: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
                compression: OTEL_EXPORTER_OTLP_METRICS_COMPRESSION,
                timeout: OTEL_EXPORTER_OTLP_METRICS_TIMEOUT,
                insecure: OTEL_EXPORTER_OTLP_METRICS_INSECURE,
                certificate: OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE,
                client_certificate: OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE,
                client_key: OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY,
                path: "/v1/metrics",
            },
        )?;
        let Some(transport) = t else {
            return Ok(None);
        };
        let mut cfg =
            MetricsConfig { transport, interval: Duration::from_secs(60), export_timeout: Duration::from_secs(30) };
        if let Some(v) = get(OTEL_METRIC_EXPORT_INTERVAL) {
            cfg.interval = positive_millis(OTEL_METRIC_EXPORT_INTERVAL, &v)?;
        }
        if let Some(v) = get(OTEL_METRIC_EXPORT_TIMEOUT) {
            cfg.export_timeout = positive_millis(OTEL_METRIC_EXPORT_TIMEOUT, &v)?;
        }
        Ok(Some(cfg))
    }
}

fn positive_millis(var: &'static str, v: &str) -> Result<Duration, ExportError> {
    match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_millis(n)),
        _ => Err(ExportError::Config { var, message: format!("'{v}' is not a positive whole number of milliseconds") }),
    }
}

/// The per-signal variable names.
struct SignalVars {
    endpoint: &'static str,
    protocol: &'static str,
    compression: &'static str,
    timeout: &'static str,
    insecure: &'static str,
    certificate: &'static str,
    client_certificate: &'static str,
    client_key: &'static str,
    /// Appended to `OTEL_EXPORTER_OTLP_ENDPOINT` for HTTP.
    path: &'static str,
}

/// Endpoint, protocol, compression, timeout and TLS files of one signal: the signal's own
/// variable first, then the generic one. `Ok(None)` without an endpoint.
fn signal_transport(get: &dyn Fn(&str) -> Option<String>, s: &SignalVars) -> Result<Option<Transport>, ExportError> {
    let first = |a: &'static str, b: &'static str| get(a).map(|v| (a, v)).or_else(|| get(b).map(|v| (b, v)));
    let protocol = match first(s.protocol, OTEL_EXPORTER_OTLP_PROTOCOL) {
        Some((var, v)) => v.parse::<Protocol>().map_err(|message| ExportError::Config { var, message })?,
        None => Protocol::HttpProtobuf,
    };
    let (endpoint_var, endpoint) = if let Some(v) = get(s.endpoint) {
        (s.endpoint, v.trim().to_string())
    } else if let Some(v) = get(OTEL_EXPORTER_OTLP_ENDPOINT) {
        let v = v.trim();
        let v = match protocol {
            Protocol::Grpc => v.to_string(),
            Protocol::HttpProtobuf => format!("{}{}", v.strip_suffix('/').unwrap_or(v), s.path),
        };
        (OTEL_EXPORTER_OTLP_ENDPOINT, v)
    } else {
        return Ok(None);
    };
    if protocol == Protocol::HttpProtobuf && !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ExportError::Config {
            var: endpoint_var,
            message: format!("endpoint '{endpoint}' must start with http:// or https:// for http/protobuf"),
        });
    }
    let endpoint = match protocol {
        Protocol::Grpc if !has_scheme(&endpoint) => {
            let insecure = first(s.insecure, OTEL_EXPORTER_OTLP_INSECURE)
                .is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case("true"));
            let scheme = if insecure { "http" } else { "https" };
            format!("{scheme}://{endpoint}")
        }
        _ => endpoint,
    };
    let compression = match first(s.compression, OTEL_EXPORTER_OTLP_COMPRESSION) {
        None => None,
        Some((var, v)) => match v.trim().to_ascii_lowercase().as_str() {
            "gzip" => Some(Compression::Gzip),
            "none" => None,
            other => {
                return Err(ExportError::Config {
                    var,
                    message: format!("unsupported compression '{other}' (allowed: gzip, none)"),
                });
            }
        },
    };
    let timeout = match first(s.timeout, OTEL_EXPORTER_OTLP_TIMEOUT) {
        Some((var, v)) => Some(v.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| {
            ExportError::Config { var, message: format!("'{v}' is not a whole number of milliseconds") }
        })?),
        None => None,
    };
    let tls = TlsFiles {
        ca: first(s.certificate, OTEL_EXPORTER_OTLP_CERTIFICATE),
        client_cert: first(s.client_certificate, OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE),
        client_key: first(s.client_key, OTEL_EXPORTER_OTLP_CLIENT_KEY),
    };
    Ok(Some(Transport { endpoint, protocol, compression, timeout, tls }))
}

// ---------------------------------------------------------------------------------------------
// Resource and scope

/// The instrumentation scope of every exported span and metric.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(SCOPE_NAME).with_version(env!("CARGO_PKG_VERSION")).build()
}

fn otel_value(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => Value::String(s.to_string().into()),
        AttrValue::Shared(s) => Value::String(s.to_string().into()),
        AttrValue::Int(i) => Value::I64(*i),
        AttrValue::Bool(b) => Value::Bool(*b),
    }
}

/// The OpenTelemetry resource of one traced process: `telemetry.sdk.*` (the SDK that encodes the
/// spans), `telemetry.distro.*` (Waybill), `host.name` (the agent's host, unless the process
/// resource has one), then the process's own attributes, which win; `service.name` falls back to
/// [`ProcessResource::service_name`].
pub fn to_resource(p: &ProcessResource, host_name: Option<&str>) -> Resource {
    let has = |key: &str| p.attributes.iter().any(|(k, _)| k == key);
    let mut kvs = vec![
        KeyValue::new("telemetry.distro.name", "waybill"),
        KeyValue::new("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
    ];
    if let Some(h) = host_name.filter(|_| !has("host.name")) {
        kvs.push(KeyValue::new("host.name", h.to_string()));
    }
    if !has("service.name") {
        kvs.push(KeyValue::new("service.name", p.service_name.clone()));
    }
    kvs.extend(p.attributes.iter().map(|(k, v)| KeyValue::new(k.to_string(), otel_value(v))));
    Resource::builder_empty().with_detector(Box::new(TelemetryResourceDetector)).with_attributes(kvs).build()
}

pub(crate) fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------------
// The export task

/// One encoded request waiting to be sent (or sent again).
struct Batch {
    body: Bytes,
    spans: usize,
    tries: u32,
    backoff: Duration,
}

/// Log state: warn when exports start failing, info when they recover, not once per batch.
#[derive(Default)]
struct Health {
    failing: bool,
    gave_up: bool,
}

/// The task's state: spans being collected into the next batch, encoded batches waiting
/// (`ready`, the only ones the backlog bound drops), batches due to be sent next (`due`: retries
/// and the oldest waiting ones, at most `max_concurrent` together with those in flight), and the
/// number of requests in flight.
struct Exporter<'a> {
    cfg: &'a OtlpConfig,
    stats: &'a ExportStats,
    encoder: Encoder,
    filling: Vec<SpanRecord>,
    /// When `filling` must be encoded (the schedule delay after its first span).
    fill_deadline: Option<Instant>,
    ready: VecDeque<Batch>,
    /// Spans in `ready` (the backlog bound counts these and `filling`).
    ready_spans: usize,
    due: VecDeque<Batch>,
    inflight: usize,
    inflight_spans: usize,
    /// After a retryable failure, nothing is sent before this.
    retry_at: Option<Instant>,
    health: Health,
}

impl Exporter<'_> {
    fn max_concurrent(&self) -> usize {
        self.cfg.max_concurrent.max(1)
    }

    fn add_pending(&self, n: usize) {
        ExportStats::add(&self.stats.pending, n);
    }

    fn sub_pending(&self, n: usize) {
        self.stats.pending.fetch_sub(n as u64, Ordering::Relaxed);
    }

    fn take(&mut self, mut spans: Vec<SpanRecord>) {
        let max_batch = self.cfg.max_batch_size.max(1);
        self.add_pending(spans.len());
        for r in spans.drain(..) {
            if self.filling.is_empty() {
                self.fill_deadline = Some(Instant::now() + self.cfg.schedule_delay);
            }
            self.filling.push(r);
            if self.filling.len() >= max_batch {
                self.seal();
            }
        }
        crate::stitch::span::recycle_batch(spans);
        self.bound();
    }

    /// Encodes `filling` into a batch.
    fn seal(&mut self) {
        self.fill_deadline = None;
        if self.filling.is_empty() {
            return;
        }
        let body = self.encoder.encode(&self.filling);
        let spans = self.filling.len();
        crate::stitch::span::recycle(&mut self.filling);
        self.ready_spans += spans;
        self.ready.push_back(Batch { body, spans, tries: 0, backoff: self.cfg.initial_backoff });
        self.promote();
    }

    /// While fewer than `max_concurrent` requests are in flight or due, the oldest waiting batch
    /// becomes due: it is out of the backlog bound's reach from then on, even if a burst arrives
    /// before it goes out.
    fn promote(&mut self) {
        while self.due.len() + self.inflight < self.max_concurrent() {
            let Some(b) = self.ready.pop_front() else { break };
            self.ready_spans -= b.spans;
            self.due.push_back(b);
        }
    }

    /// Drops the oldest waiting batches while more than `max_backlog` spans wait.
    fn bound(&mut self) {
        let max = self.cfg.max_backlog.max(1);
        while self.ready_spans + self.filling.len() > max {
            let Some(b) = self.ready.pop_front() else {
                // Only a batch still being filled (max_backlog < max_batch_size): drop its oldest.
                let n = self.filling.len() - max;
                self.filling.drain(..n);
                ExportStats::add(&self.stats.dropped, n);
                self.sub_pending(n);
                break;
            };
            self.ready_spans -= b.spans;
            ExportStats::add(&self.stats.dropped, b.spans);
            self.sub_pending(b.spans);
        }
    }

    /// The next batch to send, if one may be sent now.
    fn next_to_send(&mut self, now: Instant) -> Option<Batch> {
        if self.inflight >= self.max_concurrent() || self.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.retry_at = None;
        self.promote();
        let mut b = self.due.pop_front()?;
        b.tries += 1;
        if b.tries > 1 {
            ExportStats::add(&self.stats.retried, b.spans);
        }
        self.inflight += 1;
        self.inflight_spans += b.spans;
        Some(b)
    }

    /// Handles the outcome of sending `b`. `out_of_time`: no retry is possible (shutdown).
    fn done(&mut self, b: Batch, result: Result<Accepted, SendError>, out_of_time: bool) {
        self.inflight -= 1;
        self.inflight_spans -= b.spans;
        let n = b.spans;
        let error = match result {
            Ok(a) => {
                let rejected = (a.rejected as usize).min(n);
                ExportStats::add(&self.stats.exported, n - rejected);
                ExportStats::add(&self.stats.failed, rejected);
                self.sub_pending(n);
                if rejected > 0 {
                    tracing::warn!(rejected, message = %a.message, "the collector rejected some spans (partial success)");
                }
                if std::mem::take(&mut self.health.failing) {
                    self.health.gave_up = false;
                    tracing::info!("OTLP export recovered");
                }
                self.promote();
                return;
            }
            Err(e) => e,
        };
        let tries = b.tries;
        if !error.retryable || tries > self.cfg.max_retries || out_of_time {
            ExportStats::add(&self.stats.failed, n);
            self.sub_pending(n);
            self.health.failing = true;
            if !std::mem::replace(&mut self.health.gave_up, true) {
                tracing::warn!(
                    endpoint = %self.cfg.endpoint,
                    error = %error.message,
                    spans = n,
                    tries,
                    "OTLP export failed; spans dropped (further failures logged at debug)"
                );
            } else {
                tracing::debug!(error = %error.message, spans = n, tries, "OTLP export failed");
            }
            self.promote();
            return;
        }
        if !std::mem::replace(&mut self.health.failing, true) {
            tracing::warn!(
                endpoint = %self.cfg.endpoint,
                error = %error.message,
                spans = n,
                "OTLP export failing; retrying with backoff, spans held in the backlog (bounded)"
            );
        } else {
            tracing::debug!(error = %error.message, spans = n, tries, "OTLP export failed; retrying");
        }
        let at = Instant::now() + b.backoff;
        self.retry_at = Some(self.retry_at.map_or(at, |t| t.max(at)));
        let backoff = (b.backoff * 2).min(self.cfg.max_backoff);
        self.due.push_front(Batch { backoff, ..b });
    }

    fn idle(&self) -> bool {
        self.filling.is_empty() && self.ready.is_empty() && self.due.is_empty() && self.inflight == 0
    }

    /// Spans not yet accepted or given up on.
    fn held(&self) -> usize {
        self.ready_spans + self.filling.len() + self.due.iter().map(|b| b.spans).sum::<usize>() + self.inflight_spans
    }
}

type InFlight = Pin<Box<dyn Future<Output = (Batch, Result<Accepted, SendError>)> + Send>>;

/// The first request of `set` to finish (pending while the set is empty).
fn next_done(set: &mut Vec<InFlight>) -> impl Future<Output = (Batch, Result<Accepted, SendError>)> + '_ {
    std::future::poll_fn(move |cx| {
        for i in 0..set.len() {
            if let std::task::Poll::Ready(out) = set[i].as_mut().poll(cx) {
                drop(set.swap_remove(i));
                return std::task::Poll::Ready(out);
            }
        }
        std::task::Poll::Pending
    })
}

/// The export loop: collects spans from `rx` into batches (size or schedule delay), keeps up to
/// `max_concurrent` requests in flight while it goes on receiving and encoding, retries with
/// exponential backoff (sending nothing new meanwhile), bounds what waits. Once `rx` closes it
/// flushes within `cfg.shutdown_timeout`; what cannot be sent by then counts as failed.
async fn run(sender: Box<dyn Sender>, mut rx: SpanReceiver, stats: Arc<ExportStats>, cfg: OtlpConfig) {
    let mut ex = Exporter {
        cfg: &cfg,
        stats: &stats,
        encoder: Encoder::new(host_name()),
        filling: Vec::with_capacity(cfg.max_batch_size.clamp(1, 4096)),
        fill_deadline: None,
        ready: VecDeque::new(),
        ready_spans: 0,
        due: VecDeque::new(),
        inflight: 0,
        inflight_spans: 0,
        retry_at: None,
        health: Health::default(),
    };
    let mut closed = false;
    let mut shutdown_deadline: Option<Instant> = None;
    let mut inflight: Vec<InFlight> = Vec::new();
    loop {
        if closed && ex.idle() {
            break;
        }
        while let Some(b) = ex.next_to_send(Instant::now()) {
            let fut = sender.send(b.body.clone());
            inflight.push(Box::pin(async move { (b, fut.await) }));
        }
        let far = Instant::now() + Duration::from_secs(3600);
        let fill_at = ex.fill_deadline.unwrap_or(far);
        let retry_at = ex.retry_at.unwrap_or(far);
        let stop_at = shutdown_deadline.unwrap_or(far);
        tokio::select! {
            biased;
            (b, out) = next_done(&mut inflight), if !inflight.is_empty() => {
                let out_of_time = shutdown_deadline.is_some_and(|d| Instant::now() + b.backoff >= d);
                ex.done(b, out, out_of_time);
            }
            r = rx.recv(), if !closed => match r {
                Some(spans) => ex.take(spans),
                None => {
                    closed = true;
                    ex.seal();
                    shutdown_deadline = Some(Instant::now() + cfg.shutdown_timeout);
                }
            },
            _ = tokio::time::sleep_until(fill_at), if ex.fill_deadline.is_some() => ex.seal(),
            _ = tokio::time::sleep_until(retry_at), if ex.retry_at.is_some() => {
                if shutdown_deadline.is_some_and(|d| retry_at >= d) {
                    // The retry would come after the shutdown deadline: give up on what is due.
                    ex.retry_at = None;
                    while let Some(b) = ex.due.pop_front() {
                        ex.inflight += 1;
                        ex.inflight_spans += b.spans;
                        ex.done(b, Err(SendError { retryable: false, message: "shutdown".into() }), true);
                    }
                }
            }
            _ = tokio::time::sleep_until(stop_at), if shutdown_deadline.is_some() => {
                // Out of time: what is left (the requests in flight too) counts as failed.
                let left = ex.held();
                ExportStats::add(&stats.failed, left);
                ex.sub_pending(left);
                if left > 0 {
                    tracing::warn!(spans = left, "OTLP export: shutdown timeout reached; spans not sent");
                }
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::span_queue;
    use crate::export::transport::SendFuture;
    use std::collections::HashMap;
    use std::sync::Mutex;

    fn process(pid: u32, service: &str) -> Arc<ProcessResource> {
        ProcessResource::for_test(pid, service)
    }

    fn record(n: u8, p: &Arc<ProcessResource>) -> SpanRecord {
        SpanRecord::for_test(n, p)
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn from_env_none_without_endpoint() {
        let cfg = OtlpConfig::from_lookup(env(&[(OTEL_EXPORTER_OTLP_PROTOCOL, "grpc")])).unwrap();
        assert!(cfg.is_none());
    }

    #[test]
    fn from_env_http_default_appends_path() {
        let cfg = OtlpConfig::from_lookup(env(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318/")])).unwrap().unwrap();
        assert_eq!(cfg.protocol, Protocol::HttpProtobuf);
        assert_eq!(cfg.endpoint, "http://c:4318/v1/traces");
        assert_eq!(cfg.max_batch_size, 512);
        assert_eq!(cfg.schedule_delay, Duration::from_millis(1000));
        assert_eq!(cfg.compression, None);
    }

    #[test]
    fn from_env_traces_endpoint_as_is_and_overrides() {
        let cfg = OtlpConfig::from_lookup(env(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://base:4318"),
            (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://c:4318/custom"),
            (OTEL_EXPORTER_OTLP_COMPRESSION, "gzip"),
            (OTEL_EXPORTER_OTLP_TIMEOUT, "2500"),
            (OTEL_BSP_MAX_EXPORT_BATCH_SIZE, "64"),
            (OTEL_BSP_SCHEDULE_DELAY, "200"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.endpoint, "http://c:4318/custom");
        assert_eq!(cfg.compression, Some(Compression::Gzip));
        assert_eq!(cfg.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(cfg.max_batch_size, 64);
        assert_eq!(cfg.schedule_delay, Duration::from_millis(200));
    }

    #[test]
    fn from_env_grpc() {
        let cfg = OtlpConfig::from_lookup(env(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4317"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((cfg.protocol, cfg.endpoint.as_str()), (Protocol::Grpc, "http://c:4317"));
        let cfg = OtlpConfig::from_lookup(env(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "c:4317"),
            (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "grpc"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "http/protobuf"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.endpoint, "https://c:4317");
        let cfg = OtlpConfig::from_lookup(env(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "c:4317"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
            (OTEL_EXPORTER_OTLP_INSECURE, "true"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cfg.endpoint, "http://c:4317");
    }

    #[test]
    fn from_env_errors_name_the_variable() {
        let err = OtlpConfig::from_lookup(env(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
            (OTEL_EXPORTER_OTLP_PROTOCOL, "http/json"),
        ]))
        .unwrap_err()
        .to_string();
        assert_eq!(err, "OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol 'http/json' (allowed: grpc, http/protobuf)");
        let err = OtlpConfig::from_lookup(env(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
            (OTEL_EXPORTER_OTLP_TRACES_COMPRESSION, "zstd"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: "), "{err}");
        let err = OtlpConfig::from_lookup(env(&[(OTEL_EXPORTER_OTLP_ENDPOINT, "c:4318")])).unwrap_err().to_string();
        assert!(err.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT: "), "{err}");
        let err = OtlpConfig::from_lookup(env(&[
            (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318"),
            (OTEL_EXPORTER_OTLP_TIMEOUT, "10s"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("OTEL_EXPORTER_OTLP_TIMEOUT: "), "{err}");
    }

    #[test]
    fn resource_attributes() {
        let p = process(42, "api");
        let res = to_resource(&p, Some("box"));
        let get = |k: &str| res.get(&opentelemetry::Key::from(k.to_string())).map(|v| v.to_string());
        assert_eq!(get("service.name").as_deref(), Some("api"));
        assert_eq!(get("process.pid").as_deref(), Some("42"));
        assert_eq!(get("host.name").as_deref(), Some("box"));
        assert_eq!(get("telemetry.sdk.name").as_deref(), Some("opentelemetry"));
        assert_eq!(get("telemetry.sdk.language").as_deref(), Some("rust"));
        assert!(get("telemetry.sdk.version").is_some());
        assert_eq!(get("telemetry.distro.name").as_deref(), Some("waybill"));

        let mut p = (*p).clone();
        p.attributes = vec![("host.name".into(), "container".into())];
        let res = to_resource(&p, Some("box"));
        let get = |k: &str| res.get(&opentelemetry::Key::from(k.to_string())).map(|v| v.to_string());
        assert_eq!(get("host.name").as_deref(), Some("container"));
        assert_eq!(get("service.name").as_deref(), Some("api"));
    }

    /// (service.name of the resource, span names) per resource of each successful export.
    type Calls = Arc<Mutex<Vec<(String, Vec<String>)>>>;

    /// A collector: decodes every request with the official OTLP types and records it; fails the
    /// first `fail_first` calls; each call takes `delay`.
    #[derive(Debug, Default)]
    struct Mock {
        calls: Calls,
        fail_first: Arc<Mutex<usize>>,
        delay: Duration,
        /// Fails every call before this instant (a collector outage).
        fail_until: Option<Instant>,
        /// Failures are permanent rejections (default: retryable, "unavailable").
        permanent: bool,
    }

    impl Sender for Mock {
        fn send(&self, body: Bytes) -> SendFuture {
            use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
            use opentelemetry_proto::tonic::common::v1::any_value::Value as PV;
            use prost::Message;
            let (calls, fail_first, delay, fail_until, permanent) =
                (Arc::clone(&self.calls), Arc::clone(&self.fail_first), self.delay, self.fail_until, self.permanent);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let error = SendError { retryable: !permanent, message: "unavailable".into() };
                if fail_until.is_some_and(|t| Instant::now() < t) {
                    return Err(error);
                }
                {
                    let mut f = fail_first.lock().unwrap();
                    if *f > 0 {
                        *f -= 1;
                        return Err(error);
                    }
                }
                let req = ExportTraceServiceRequest::decode(body.as_ref()).expect("valid request");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .unwrap()
                        .attributes
                        .into_iter()
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value?.value)
                        .map(|v| match v {
                            PV::StringValue(s) => s,
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    let names = rs.scope_spans.into_iter().flat_map(|ss| ss.spans).map(|s| s.name).collect();
                    calls.lock().unwrap().push((service, names));
                }
                Ok(Accepted::default())
            })
        }
    }

    fn spawn(mock: Mock, rx: SpanReceiver, stats: &Arc<ExportStats>, cfg: OtlpConfig) -> JoinHandle<()> {
        tokio::spawn(run(Box::new(mock), rx, Arc::clone(stats), cfg))
    }

    /// One request at a time: the order of requests is then exact.
    fn test_cfg() -> OtlpConfig {
        let mut cfg = OtlpConfig::new(Protocol::Grpc, "http://unused:4317");
        cfg.schedule_delay = Duration::from_millis(100);
        cfg.max_batch_size = 3;
        cfg.max_concurrent = 1;
        cfg
    }

    /// Several requests in flight: a slow collector (100 ms per request) takes 8 batches in the
    /// time of 2 with 4 at once, and nothing is lost or counted twice.
    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_keep_up_with_a_slow_collector() {
        let (tx, rx) = span_queue(100);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock { delay: Duration::from_millis(100), ..Default::default() };
        let calls = Arc::clone(&mock.calls);
        let mut cfg = test_cfg();
        cfg.max_batch_size = 1;
        cfg.max_concurrent = 4;
        let task = spawn(mock, rx, &stats, cfg);
        let a = process(1, "a");
        assert_eq!(tx.try_send((0..8u8).map(|n| record(n, &a)).collect()), 0);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(calls.lock().unwrap().len(), 4, "the first 4 ran together");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.lock().unwrap().len(), 8);
        drop(tx);
        task.await.unwrap();
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!((s(&stats.exported), s(&stats.failed), s(&stats.dropped), s(&stats.pending)), (8, 0, 0, 0));
        let mut names: Vec<String> = calls.lock().unwrap().iter().flat_map(|(_, n)| n.clone()).collect();
        names.sort();
        assert_eq!(names, (0..8u8).map(|n| format!("span {n}")).collect::<Vec<_>>());
    }

    /// With requests in flight when the collector goes away, every failed batch is retried and
    /// arrives once; nothing new is sent while backing off.
    #[tokio::test(start_paused = true)]
    async fn concurrent_failures_retry_each_batch_once_it_is_back() {
        let (tx, rx) = span_queue(100);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock {
            fail_until: Some(Instant::now() + Duration::from_secs(3)),
            delay: Duration::from_millis(10),
            ..Default::default()
        };
        let calls = Arc::clone(&mock.calls);
        let mut cfg = test_cfg();
        cfg.max_batch_size = 2;
        cfg.max_concurrent = 3;
        let task = spawn(mock, rx, &stats, cfg);
        let a = process(1, "a");
        assert_eq!(tx.try_send((0..20u8).map(|n| record(n, &a)).collect()), 0);
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(tx);
        task.await.unwrap();
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!((s(&stats.exported), s(&stats.failed), s(&stats.dropped), s(&stats.pending)), (20, 0, 0, 0));
        assert!(s(&stats.retried) > 0);
        let mut names: Vec<String> = calls.lock().unwrap().iter().flat_map(|(_, n)| n.clone()).collect();
        names.sort();
        let mut expected: Vec<String> = (0..20u8).map(|n| format!("span {n}")).collect();
        expected.sort();
        assert_eq!(names, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_grouped_by_resource() {
        let (tx, rx) = span_queue(100);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock::default();
        let calls = Arc::clone(&mock.calls);
        let task = spawn(mock, rx, &stats, test_cfg());
        let (a, b) = (process(1, "a"), process(2, "b"));
        for (n, p) in [(1, &a), (2, &b), (3, &a), (4, &a)] {
            assert_eq!(tx.try_send(vec![record(n, p)]), 0);
        }
        // First batch is full at 3 spans; the 4th waits for the schedule delay.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            *calls.lock().unwrap(),
            vec![
                ("a".to_string(), vec!["span 1".to_string(), "span 3".to_string()]),
                ("b".to_string(), vec!["span 2".to_string()]),
            ]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.lock().unwrap().len(), 3);
        drop(tx);
        task.await.unwrap();
        assert_eq!(stats.exported.load(Ordering::Relaxed), 4);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_then_succeeds_and_flushes_on_close() {
        let (tx, rx) = span_queue(100);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock { fail_first: Arc::new(Mutex::new(2)), ..Default::default() };
        let calls = Arc::clone(&mock.calls);
        let task = spawn(mock, rx, &stats, test_cfg());
        let a = process(1, "a");
        assert_eq!(tx.try_send(vec![record(1, &a)]), 0);
        drop(tx);
        task.await.unwrap();
        assert_eq!(calls.lock().unwrap().len(), 1);
        assert_eq!(stats.exported.load(Ordering::Relaxed), 1);
        assert_eq!(stats.retried.load(Ordering::Relaxed), 2);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_retries_and_bounds_backlog() {
        let (tx, rx) = span_queue(4);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock {
            fail_first: Arc::new(Mutex::new(usize::MAX)),
            delay: Duration::from_millis(10),
            ..Default::default()
        };
        let mut cfg = test_cfg();
        cfg.max_backlog = 5;
        cfg.max_batch_size = 1;
        cfg.max_retries = 3;
        let task = spawn(mock, rx, &stats, cfg);
        let a = process(1, "a");
        // The channel (capacity 4) never fills although exports are failing: the task keeps
        // draining it into the bounded backlog while it retries.
        for n in 0..20u8 {
            assert_eq!(tx.try_send(vec![record(n, &a)]), 0, "channel drained during retries");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(tx);
        task.await.unwrap();
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(s(&stats.exported), 0);
        assert!(s(&stats.dropped) > 0, "{stats:?}");
        assert_eq!(s(&stats.failed) + s(&stats.dropped), 20, "{stats:?}");
        // Every span that was tried got its retries (3 per span while running).
        assert!(s(&stats.retried) >= 3, "{stats:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_flush_is_bounded() {
        let (tx, rx) = span_queue(100);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock { delay: Duration::from_secs(60), ..Default::default() };
        let mut cfg = test_cfg();
        cfg.shutdown_timeout = Duration::from_secs(2);
        let task = spawn(mock, rx, &stats, cfg);
        let a = process(1, "a");
        assert_eq!(tx.try_send(vec![record(1, &a)]), 0);
        drop(tx);
        let started = Instant::now();
        task.await.unwrap();
        assert!(started.elapsed() <= Duration::from_secs(3));
        assert_eq!(stats.failed.load(Ordering::Relaxed), 1);
    }

    /// A 60 s collector outage under steady load: every span arrives once it is back, none is
    /// dropped or failed, and the channel never fills.
    #[tokio::test(start_paused = true)]
    async fn outage_of_a_minute_loses_nothing() {
        let (tx, rx) = span_queue(16);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock {
            fail_until: Some(Instant::now() + Duration::from_secs(60)),
            delay: Duration::from_millis(5),
            ..Default::default()
        };
        let calls = Arc::clone(&mock.calls);
        let mut cfg = test_cfg();
        cfg.max_batch_size = 50;
        let task = spawn(mock, rx, &stats, cfg);
        let a = process(1, "a");
        // 50 spans/s for 90 s.
        for n in 0..4500u32 {
            assert_eq!(tx.try_send(vec![record((n % 251) as u8, &a)]), 0, "never blocks");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(tx);
        task.await.unwrap();
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(s(&stats.exported), 4500, "{stats:?}");
        assert_eq!((s(&stats.failed), s(&stats.dropped), s(&stats.pending)), (0, 0, 0));
        assert!(s(&stats.retried) > 0);
        let exported: usize = calls.lock().unwrap().iter().map(|(_, names)| names.len()).sum();
        assert_eq!(exported, 4500);
    }

    /// Past the backlog bound the oldest spans are dropped, and counted exactly.
    #[tokio::test(start_paused = true)]
    async fn backlog_overflow_drops_oldest_exactly() {
        let (tx, rx) = span_queue(16);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock { fail_until: Some(Instant::now() + Duration::from_secs(30)), ..Default::default() };
        let calls = Arc::clone(&mock.calls);
        let mut cfg = test_cfg();
        cfg.max_batch_size = 10;
        cfg.schedule_delay = Duration::from_secs(1);
        cfg.max_backlog = 100;
        let task = spawn(mock, rx, &stats, cfg);
        let a = process(1, "a");
        // 300 spans during the outage: the first batch (10 spans, full before the 1 s schedule
        // delay) is the request being retried, 100 are kept, 190 dropped.
        for n in 0..300u32 {
            assert_eq!(tx.try_send(vec![record((n % 251) as u8, &a)]), 0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(tx);
        task.await.unwrap();
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(s(&stats.dropped), 190, "{stats:?}");
        assert_eq!(s(&stats.exported), 110, "{stats:?}");
        assert_eq!((s(&stats.failed), s(&stats.pending)), (0, 0));
        let names: Vec<String> = calls.lock().unwrap().iter().flat_map(|(_, n)| n.clone()).collect();
        // The first batch (spans 0..10) and the newest 100 (200..300) made it.
        let expected: Vec<String> = (0..10u32).chain(200..300).map(|n| format!("span {}", n % 251)).collect();
        assert_eq!(names, expected);
    }

    /// A burst that arrives in one piece during an outage: its first batch is the one being
    /// retried, the newest `max_backlog` wait, the rest are dropped, counted exactly.
    #[tokio::test(start_paused = true)]
    async fn burst_keeps_first_and_newest() {
        let (tx, rx) = span_queue(100);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock { fail_until: Some(Instant::now() + Duration::from_secs(5)), ..Default::default() };
        let calls = Arc::clone(&mock.calls);
        let mut cfg = test_cfg();
        cfg.max_batch_size = 1;
        cfg.max_backlog = 10;
        let task = spawn(mock, rx, &stats, cfg);
        let a = process(1, "a");
        assert_eq!(tx.try_send((0..30u8).map(|n| record(n, &a)).collect()), 0);
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(tx);
        task.await.unwrap();
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!((s(&stats.exported), s(&stats.dropped), s(&stats.failed)), (11, 19, 0), "{stats:?}");
        let names: Vec<String> = calls.lock().unwrap().iter().flat_map(|(_, n)| n.clone()).collect();
        let expected: Vec<String> = [0u8].into_iter().chain(20..30).map(|n| format!("span {n}")).collect();
        assert_eq!(names, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let (tx, rx) = span_queue(16);
        let stats = Arc::new(ExportStats::default());
        let mock = Mock { fail_first: Arc::new(Mutex::new(1)), permanent: true, ..Default::default() };
        let task = spawn(mock, rx, &stats, test_cfg());
        let a = process(1, "a");
        assert_eq!(tx.try_send(vec![record(1, &a)]), 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(tx.try_send(vec![record(2, &a)]), 0);
        drop(tx);
        task.await.unwrap();
        let s = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!((s(&stats.failed), s(&stats.retried), s(&stats.exported)), (1, 0, 1));
    }

    #[tokio::test]
    async fn spawn_otlp_builds_both_protocols() {
        for cfg in [
            OtlpConfig::new(Protocol::Grpc, "http://127.0.0.1:1"),
            OtlpConfig::new(Protocol::Grpc, "https://127.0.0.1:1"),
            OtlpConfig::new(Protocol::HttpProtobuf, "http://127.0.0.1:1"),
            OtlpConfig::new(Protocol::HttpProtobuf, "https://127.0.0.1:1"),
        ] {
            let (tx, rx) = span_queue(1);
            let task = spawn_otlp(cfg.clone(), rx, Arc::default()).expect("builds");
            drop(tx);
            task.await.unwrap();
        }
        let (_tx, rx) = span_queue(1);
        let err = spawn_otlp(OtlpConfig::new(Protocol::Grpc, "127.0.0.1:1"), rx, Arc::default()).unwrap_err();
        assert!(matches!(err, ExportError::Config { .. }), "{err}");
    }
}
