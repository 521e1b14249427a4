//! RED metrics (rate, errors, duration) computed from finished spans, per traced process.
//!
//! A [`Tee`] sits in the pipeline between span building and the exporter's queue: it records every
//! span into [`Red`], applies the per-service sampling ratio of the configuration (so the metrics
//! count every request, sampled or not), and passes on the spans it keeps.
//!
//! Three histograms, in seconds, with the semantic-convention bucket boundaries and
//! low-cardinality attributes only:
//!
//! | metric | from | attributes |
//! | --- | --- | --- |
//! | `http.server.request.duration` | HTTP SERVER spans | `http.request.method`, `http.route` (template: `/users/123` → `/users/{id}`), `http.response.status_code`, `error.type` |
//! | `http.client.request.duration` | HTTP CLIENT spans | `http.request.method`, `server.address`, `server.port`, `http.response.status_code`, `error.type` |
//! | `db.client.operation.duration` | spans with `db.system.name` | `db.system.name`, `db.operation.name`, `server.address`, `error.type` |
//!
//! Each traced process is its own OpenTelemetry resource, exactly as for its spans: one
//! [`SdkMeterProvider`] per process with a [`ManualReader`], collected on the export interval and
//! handed to one OTLP metric exporter (cumulative temporality, so a failed export loses no counts:
//! the next one carries them), and collected again for Prometheus `/metrics`.
//!
//! **Cardinality budget.** Per process and metric at most `series_limit` distinct attribute
//! sets; a measurement that would open one more is recorded under the single attribute
//! `otel.metric.overflow=true` (as the SDK does) and counted in
//! `waybill_red_overflow_total`.

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use opentelemetry::{
    KeyValue, Value,
    metrics::{BoundHistogram, Histogram, MeterProvider as _},
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
        data::{AggregatedMetrics, MetricData, ResourceMetrics},
        exporter::PushMetricExporter,
        reader::MetricReader,
    },
};
use rustc_hash::FxHashMap;
use tokio::task::JoinHandle;

use crate::stitch::span::{AttrValue, ProcessResource, SpanKind, SpanRecord};

/// `http.server.request.duration` and `http.client.request.duration` buckets (seconds).
pub const HTTP_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// `db.client.operation.duration` buckets (seconds).
pub const DB_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// The attribute a measurement is recorded under once its process's budget is spent.
pub const OVERFLOW_ATTR: &str = "otel.metric.overflow";

/// Which histogram a span feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedMetric {
    HttpServer,
    HttpClient,
    DbClient,
}

impl RedMetric {
    pub const ALL: [RedMetric; 3] = [RedMetric::HttpServer, RedMetric::HttpClient, RedMetric::DbClient];

    pub fn name(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "http.server.request.duration",
            RedMetric::HttpClient => "http.client.request.duration",
            RedMetric::DbClient => "db.client.operation.duration",
        }
    }

    fn description(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "Duration of HTTP server requests.",
            RedMetric::HttpClient => "Duration of HTTP client requests.",
            RedMetric::DbClient => "Duration of database client operations.",
        }
    }

    fn buckets(self) -> &'static [f64] {
        match self {
            RedMetric::HttpServer | RedMetric::HttpClient => &HTTP_BUCKETS,
            RedMetric::DbClient => &DB_BUCKETS,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// An attribute value borrowed from the span (or the route buffer).
#[derive(Clone, Copy, Debug, PartialEq)]
enum ValRef<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

impl<'a> ValRef<'a> {
    fn of(v: &'a AttrValue) -> Self {
        match v {
            AttrValue::Str(s) => ValRef::Str(s),
            AttrValue::Shared(s) => ValRef::Str(s),
            AttrValue::Int(i) => ValRef::Int(*i),
            AttrValue::Bool(b) => ValRef::Bool(*b),
        }
    }

    #[cfg(test)]
    fn owned(self) -> AttrValue {
        match self {
            ValRef::Str(s) => AttrValue::from(s.to_string()),
            ValRef::Int(i) => AttrValue::Int(i),
            ValRef::Bool(b) => AttrValue::Bool(b),
        }
    }

    /// The value the metrics SDK records (built once per new series).
    fn otel(self) -> Value {
        match self {
            ValRef::Str(s) => Value::String(s.to_string().into()),
            ValRef::Int(i) => Value::I64(i),
            ValRef::Bool(b) => Value::Bool(b),
        }
    }
}

/// At most this many attributes describe a series (method, route or peer, status, error).
const MAX_SERIES_ATTRS: usize = 6;

/// A measurement's attributes, borrowed, sorted by key; no allocation per span.
struct Borrowed<'a> {
    attrs: [(&'static str, ValRef<'a>); MAX_SERIES_ATTRS],
    len: usize,
}

impl<'a> Borrowed<'a> {
    fn push(&mut self, key: &'static str, v: ValRef<'a>) {
        if self.len < MAX_SERIES_ATTRS {
            self.attrs[self.len] = (key, v);
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[(&'static str, ValRef<'a>)] {
        &self.attrs[..self.len]
    }
}

/// The attributes of a span that series are made of, found in one pass over its list (the
/// first of each key, as [`SpanRecord::attr`] finds it): one scan per span instead of one per
/// key, most of them for keys an HTTP span does not have.
#[derive(Default)]
struct SeriesFields<'a> {
    db_system: Option<&'a AttrValue>,
    db_operation: Option<&'a AttrValue>,
    method: Option<&'a AttrValue>,
    route: Option<&'a AttrValue>,
    path: Option<&'a AttrValue>,
    server_address: Option<&'a AttrValue>,
    server_port: Option<&'a AttrValue>,
    status: Option<&'a AttrValue>,
    error: Option<&'a AttrValue>,
}

impl<'a> SeriesFields<'a> {
    fn of(r: &'a SpanRecord) -> Self {
        let mut f = SeriesFields::default();
        for (k, v) in &r.attributes {
            let slot = match k.as_ref() {
                "http.request.method" => &mut f.method,
                "url.path" => &mut f.path,
                "server.address" => &mut f.server_address,
                "server.port" => &mut f.server_port,
                "http.response.status_code" => &mut f.status,
                "error.type" => &mut f.error,
                "http.route" => &mut f.route,
                "db.system.name" => &mut f.db_system,
                "db.operation.name" => &mut f.db_operation,
                _ => continue,
            };
            slot.get_or_insert(v);
        }
        f
    }
}

/// The route part of an HTTP server span's name, "METHOD route", when the name starts with the
/// span's method (the stitcher names server spans so; a renamed span has its route rebuilt).
fn route_in_name<'a>(r: &'a SpanRecord, method: Option<&AttrValue>) -> Option<&'a str> {
    let Some(AttrValue::Str(m)) = method else { return None };
    let rest = r.name.strip_prefix(m.as_ref())?.strip_prefix(' ')?;
    rest.starts_with('/').then_some(rest)
}

/// The metric a span feeds and its attributes, borrowed from the span; the server route
/// (template of `url.path` when the span has no `http.route`) is built in `route`.
fn measure_borrowed<'a>(r: &'a SpanRecord, route: &'a mut String) -> Option<(RedMetric, Borrowed<'a>)> {
    let mut b = Borrowed { attrs: [("", ValRef::Bool(false)); MAX_SERIES_ATTRS], len: 0 };
    let f = SeriesFields::of(r);
    let metric = if f.db_system.is_some() {
        if r.kind != SpanKind::Client {
            // A traced PostgreSQL/Redis server's own spans: no client operation to measure.
            return None;
        }
        RedMetric::DbClient
    } else if f.method.is_some() {
        match r.kind {
            SpanKind::Server => RedMetric::HttpServer,
            SpanKind::Client => RedMetric::HttpClient,
        }
    } else {
        return None;
    };
    // The route first (it may need `route` mutably), then only shared borrows. An HTTP server
    // span built by the stitcher is named "METHOD template-of-url.path": its route is already
    // there, templated once per span; other spans have `url.path` templated here.
    route.clear();
    let has_route = metric == RedMetric::HttpServer && (f.route.is_some() || f.path.is_some());
    let named = if has_route && f.route.is_none() { route_in_name(r, f.method) } else { None };
    if has_route && named.is_none() {
        match (f.route, f.path) {
            (Some(v), _) => {
                use std::fmt::Write;
                let _ = write!(route, "{v}");
            }
            (None, Some(AttrValue::Str(p))) => waybill_protocols::http1::push_path_template(route, p),
            (None, Some(other)) => waybill_protocols::http1::push_path_template(route, &other.to_string()),
            (None, None) => {}
        }
    }
    let route: &'a String = route;
    let route: &'a str = named.unwrap_or(route.as_str());
    let copy = |b: &mut Borrowed<'a>, key: &'static str, v: Option<&'a AttrValue>| {
        if let Some(v) = v {
            b.push(key, ValRef::of(v));
        }
    };
    // Pushed in the order of their keys (the series key and the bound attribute set need one
    // order; sorting per span was a string comparison per pair).
    match metric {
        RedMetric::DbClient => {
            copy(&mut b, "db.operation.name", f.db_operation);
            copy(&mut b, "db.system.name", f.db_system);
            copy(&mut b, "error.type", f.error);
            copy(&mut b, "server.address", f.server_address);
        }
        RedMetric::HttpServer => {
            copy(&mut b, "error.type", f.error);
            copy(&mut b, "http.request.method", f.method);
            copy(&mut b, "http.response.status_code", f.status);
            if has_route {
                b.push("http.route", ValRef::Str(route));
            }
        }
        RedMetric::HttpClient => {
            copy(&mut b, "error.type", f.error);
            copy(&mut b, "http.request.method", f.method);
            copy(&mut b, "http.response.status_code", f.status);
            copy(&mut b, "server.address", f.server_address);
            copy(&mut b, "server.port", f.server_port);
        }
    }
    debug_assert!(b.as_slice().is_sorted_by(|x, y| x.0 < y.0), "RED attributes out of key order");
    Some((metric, b))
}

/// The metric a span feeds and its low-cardinality attributes (sorted by key), or `None` for a
/// span that feeds none (owned: for tests; the pipeline keys series from borrowed values).
#[cfg(test)]
pub fn measurement(r: &SpanRecord) -> Option<(RedMetric, Vec<(&'static str, AttrValue)>)> {
    let mut route = String::new();
    let (metric, b) = measure_borrowed(r, &mut route)?;
    Some((metric, b.as_slice().iter().map(|(k, v)| (*k, v.owned())).collect()))
}

/// A keyed hash of a measurement's attribute set: the series it belongs to. Keyed (SipHash with a
/// random key), so traffic cannot pick values that collide.
fn series_key(hasher: &std::hash::RandomState, attrs: &[(&'static str, ValRef<'_>)]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = hasher.build_hasher();
    for (k, v) in attrs {
        k.hash(&mut h);
        match v {
            ValRef::Str(s) => {
                0u8.hash(&mut h);
                s.hash(&mut h);
            }
            ValRef::Int(i) => {
                1u8.hash(&mut h);
                i.hash(&mut h);
            }
            ValRef::Bool(b) => {
                2u8.hash(&mut h);
                b.hash(&mut h);
            }
        }
    }
    h.finish()
}

/// Counters of the RED machinery, published as self-metrics.
#[derive(Debug, Default)]
pub struct RedStats {
    /// Spans measured into a histogram.
    pub measured: AtomicU64,
    /// Measurements recorded under the overflow attribute (budget spent).
    pub overflow: AtomicU64,
    /// Metric export requests the collector accepted / that failed.
    pub exports: AtomicU64,
    pub export_failures: AtomicU64,
    /// Spans not forwarded to the exporter because of a sampling ratio below 1.
    pub sampled_out: AtomicU64,
}

/// A [`MetricReader`] shared between the provider (which owns one) and [`Red`] (which collects).
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

struct ProcessMetrics {
    resource: Arc<ProcessResource>,
    _provider: SdkMeterProvider,
    reader: SharedReader,
    histograms: [Histogram<f64>; 3],
    /// Per metric, the series admitted under the cardinality budget (by [`series_key`]), each a
    /// histogram bound to its attributes once: a measurement goes straight to the series'
    /// buckets, where an unbound `record` hashes and looks up the attribute set every time
    /// (table 7: RED 248 → ~110 ns per request warm).
    /// The keys are SipHash values already, so the maps use the cheap Fx hash on them.
    series: [FxHashMap<u64, BoundHistogram<f64>>; 3],
    /// Measurements since the last collection for OTLP (a dead process is dropped once clean).
    dirty: bool,
}

/// The RED histograms of every traced process.
pub struct Red {
    procs: Mutex<FxHashMap<u32, ProcessMetrics>>,
    series_limit: usize,
    host: Option<String>,
    /// Keys [`series_key`].
    hasher: std::hash::RandomState,
    pub stats: Arc<RedStats>,
}

impl std::fmt::Debug for Red {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Red").field("series_limit", &self.series_limit).field("stats", &self.stats).finish()
    }
}

/// Default distinct attribute sets per process and metric.
pub const DEFAULT_SERIES_LIMIT: usize = 500;

impl Red {
    pub fn new(series_limit: usize, stats: Arc<RedStats>) -> Red {
        Red {
            procs: Mutex::new(FxHashMap::default()),
            series_limit: series_limit.max(1),
            host: super::otlp::host_name(),
            hasher: std::hash::RandomState::new(),
            stats,
        }
    }

    fn process_metrics(&self, p: &Arc<ProcessResource>) -> ProcessMetrics {
        let reader = SharedReader(Arc::new(ManualReader::builder().with_temporality(Temporality::Cumulative).build()));
        let provider = SdkMeterProvider::builder()
            .with_resource(super::otlp::to_resource(p, self.host.as_deref()))
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter_with_scope(super::otlp::scope());
        let histograms = RedMetric::ALL.map(|m| {
            meter
                .f64_histogram(m.name())
                .with_unit("s")
                .with_description(m.description())
                .with_boundaries(m.buckets().to_vec())
                .build()
        });
        ProcessMetrics {
            resource: Arc::clone(p),
            _provider: provider,
            reader,
            histograms,
            series: Default::default(),
            dirty: false,
        }
    }

    /// Records one span (no-op for spans that feed no metric).
    pub fn record(&self, r: &SpanRecord) {
        self.record_all(std::slice::from_ref(r));
    }

    /// Records a batch of spans, taking the lock once.
    pub fn record_all(&self, spans: &[SpanRecord]) {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let mut route = String::new();
        for r in spans {
            self.record_locked(&mut procs, r, &mut route);
            crate::sched::courtesy();
        }
    }

    fn record_locked(&self, procs: &mut FxHashMap<u32, ProcessMetrics>, r: &SpanRecord, route: &mut String) {
        let Some((metric, attrs)) = measure_borrowed(r, route) else {
            return;
        };
        let seconds = r.end_unix_ns.saturating_sub(r.start_unix_ns) as f64 / 1e9;
        let key = series_key(&self.hasher, attrs.as_slice());
        let pm = match procs.get_mut(&r.resource.pid) {
            Some(pm) if Arc::ptr_eq(&pm.resource, &r.resource) || *pm.resource == *r.resource => pm,
            _ => {
                // New process, or the PID now names another program (exec, reuse).
                let pm = self.process_metrics(&r.resource);
                procs.insert(r.resource.pid, pm);
                procs.get_mut(&r.resource.pid).expect("just inserted")
            }
        };
        let series = &mut pm.series[metric.index()];
        let histogram = &pm.histograms[metric.index()];
        if let Some(bound) = series.get(&key) {
            bound.record(seconds);
        } else if series.len() < self.series_limit {
            let kvs: Vec<KeyValue> = attrs.as_slice().iter().map(|(k, v)| KeyValue::new(*k, v.otel())).collect();
            let bound = histogram.bind(&kvs);
            bound.record(seconds);
            series.insert(key, bound);
        } else {
            self.stats.overflow.fetch_add(1, Relaxed);
            histogram.record(seconds, &[KeyValue::new(OVERFLOW_ATTR, true)]);
        }
        pm.dirty = true;
        self.stats.measured.fetch_add(1, Relaxed);
    }

    /// The current (cumulative) metrics of every process. With `for_export`, processes that have
    /// exited and have had nothing new since their last collection are dropped afterwards.
    pub fn collect(&self, for_export: bool) -> Vec<ResourceMetrics> {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(procs.len());
        let mut gone = Vec::new();
        for (pid, pm) in procs.iter_mut() {
            if for_export {
                if !pm.dirty && !crate::process::exists(*pid) {
                    gone.push(*pid);
                    continue;
                }
                pm.dirty = false;
            }
            let mut rm = ResourceMetrics::default();
            if pm.reader.collect(&mut rm).is_ok() {
                out.push(rm);
            }
        }
        for pid in gone {
            procs.remove(&pid);
        }
        out
    }

    /// Exports every process's metrics, one request per process.
    pub async fn export<E: PushMetricExporter>(&self, exporter: &E) {
        for rm in self.collect(true) {
            if rm.scope_metrics().all(|s| s.metrics().next().is_none()) {
                continue;
            }
            match exporter.export(&rm).await {
                Ok(()) => {
                    self.stats.exports.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    if self.stats.export_failures.fetch_add(1, Relaxed) == 0 {
                        tracing::warn!(error = %e, "OTLP metric export failed (cumulative: the next export carries the counts; further failures logged at debug)");
                    } else {
                        tracing::debug!(error = %e, "OTLP metric export failed");
                    }
                }
            }
        }
    }

    /// The histograms in Prometheus text format: `http_server_request_duration_seconds` etc.,
    /// labelled with `service_name` and `process_pid` of their process.
    pub fn render_prometheus(&self, out: &mut String) {
        let collected = self.collect(false);
        for metric in RedMetric::ALL {
            let prom = format!("{}_seconds", metric.name().replace('.', "_"));
            let mut header = false;
            for rm in &collected {
                let res = rm.resource();
                let get = |k: &'static str| res.get(&opentelemetry::Key::from_static_str(k)).map(|v| v.to_string());
                let mut base = vec![("service_name".to_string(), get("service.name").unwrap_or_default())];
                if let Some(pid) = get("process.pid") {
                    base.push(("process_pid".to_string(), pid));
                }
                for sm in rm.scope_metrics() {
                    for m in sm.metrics().filter(|m| m.name() == metric.name()) {
                        let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() else {
                            continue;
                        };
                        if !header {
                            let _ = writeln!(out, "# HELP {prom} {}", metric.description());
                            let _ = writeln!(out, "# TYPE {prom} histogram");
                            header = true;
                        }
                        for dp in h.data_points() {
                            let mut labels = base.clone();
                            labels.extend(
                                dp.attributes().map(|kv| (kv.key.as_str().replace('.', "_"), kv.value.to_string())),
                            );
                            let mut cumulative = 0u64;
                            let counts: Vec<u64> = dp.bucket_counts().collect();
                            for (i, bound) in dp.bounds().enumerate() {
                                cumulative += counts.get(i).copied().unwrap_or(0);
                                let le = format_bound(bound);
                                let _ = writeln!(out, "{prom}_bucket{} {cumulative}", label_set(&labels, Some(&le)));
                            }
                            let _ = writeln!(out, "{prom}_bucket{} {}", label_set(&labels, Some("+Inf")), dp.count());
                            let _ = writeln!(out, "{prom}_sum{} {}", label_set(&labels, None), dp.sum());
                            let _ = writeln!(out, "{prom}_count{} {}", label_set(&labels, None), dp.count());
                        }
                    }
                }
            }
        }
    }
}

fn format_bound(b: f64) -> String {
    // Prometheus clients print bounds as floats: 0.005, 1.0, 10.0.
    if b.fract() == 0.0 { format!("{b:.1}") } else { format!("{b}") }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_set(labels: &[(String, String)], le: Option<&str>) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape_label(v));
    }
    if let Some(le) = le {
        if !labels.is_empty() {
            s.push(',');
        }
        let _ = write!(s, "le=\"{le}\"");
    }
    s.push('}');
    s
}

/// Decides whether a span is forwarded to the exporter: the sampling ratio of its process's
/// service rule (`1.0`: every span).
pub type SamplingRatio = Arc<dyn Fn(&ProcessResource) -> f64 + Send + Sync>;

/// Consistent ratio sampling on the trace id: the same trace is kept or dropped in every
/// service with the same ratio. A span that joined a caller's sampled trace (`traceparent`) is
/// always kept: the caller decided.
pub fn keep(r: &SpanRecord, ratio: f64) -> bool {
    if ratio >= 1.0 || r.parent_source == crate::stitch::span::ParentSource::Header {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&r.trace_id[8..]);
    // The 56 random low bits of a W3C trace id, compared with the ratio's threshold.
    let v = u64::from_be_bytes(low) & ((1 << 56) - 1);
    (v as f64) < ratio * (1u64 << 56) as f64
}

/// Records every span into `red` and keeps the ones `ratio` samples (all without a ratio).
pub struct Tee {
    pub red: Arc<Red>,
    pub ratio: Option<SamplingRatio>,
}

impl Tee {
    /// Measures `spans` and removes the ones sampled out (counted).
    pub fn pass(&self, spans: &mut Vec<SpanRecord>) {
        self.red.record_all(spans);
        if let Some(ratio) = &self.ratio {
            let before = spans.len();
            spans.retain(|r| keep(r, ratio(&r.resource)));
            self.red.stats.sampled_out.fetch_add((before - spans.len()) as u64, Relaxed);
        }
    }
}

/// Exports `red` every `interval` until `stop` fires, then once more (bounded by `final_timeout`).
pub fn spawn_metric_export<E: PushMetricExporter>(
    exporter: E,
    red: Arc<Red>,
    interval: Duration,
    final_timeout: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => red.export(&exporter).await,
                _ = &mut stop => break,
            }
        }
        let _ = tokio::time::timeout(final_timeout, red.export(&exporter)).await;
        let _ = exporter.shutdown();
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stitch::span::{ParentSource, SpanStatus};

    fn process(pid: u32, service: &str) -> Arc<ProcessResource> {
        ProcessResource::for_test(pid, service)
    }

    fn span(p: &Arc<ProcessResource>, kind: SpanKind, ms: u64, attrs: &[(&str, AttrValue)]) -> SpanRecord {
        SpanRecord {
            trace_id: [7; 16],
            span_id: [1; 8],
            parent_span_id: None,
            trace_state: None,
            sampled: true,
            name: "x".into(),
            kind,
            start_unix_ns: 1_000_000_000,
            end_unix_ns: 1_000_000_000 + ms * 1_000_000,
            attributes: attrs.iter().map(|(k, v)| (k.to_string().into(), v.clone())).collect(),
            status: SpanStatus::Unset,
            parent_source: ParentSource::None,
            resource: Arc::clone(p),
        }
    }

    fn get(r: &SpanRecord) -> (RedMetric, Vec<(String, String)>) {
        let (m, a) = measurement(r).unwrap();
        (m, a.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn measurements_keep_low_cardinality_attributes_only() {
        let p = process(1, "shop");
        let s = span(
            &p,
            SpanKind::Server,
            3,
            &[
                ("http.request.method", "GET".into()),
                ("url.path", "/users/123".into()),
                ("url.query", "page=2".into()),
                ("client.port", AttrValue::Int(40000)),
                ("http.response.status_code", AttrValue::Int(200)),
            ],
        );
        assert_eq!(
            get(&s),
            (
                RedMetric::HttpServer,
                kv(&[
                    ("http.request.method", "GET"),
                    ("http.response.status_code", "200"),
                    ("http.route", "/users/{id}")
                ])
            )
        );
        let c = span(
            &p,
            SpanKind::Client,
            3,
            &[
                ("http.request.method", "POST".into()),
                ("url.full", "http://api:8080/orders/9".into()),
                ("server.address", "api".into()),
                ("server.port", AttrValue::Int(8080)),
                ("http.response.status_code", AttrValue::Int(503)),
                ("error.type", "503".into()),
            ],
        );
        assert_eq!(
            get(&c),
            (
                RedMetric::HttpClient,
                kv(&[
                    ("error.type", "503"),
                    ("http.request.method", "POST"),
                    ("http.response.status_code", "503"),
                    ("server.address", "api"),
                    ("server.port", "8080")
                ])
            )
        );
        let d = span(
            &p,
            SpanKind::Client,
            3,
            &[
                ("db.system.name", "postgresql".into()),
                ("db.operation.name", "SELECT".into()),
                ("db.query.text", "SELECT * FROM t WHERE id = ?".into()),
                ("server.address", "db".into()),
            ],
        );
        assert_eq!(
            get(&d),
            (
                RedMetric::DbClient,
                kv(&[("db.operation.name", "SELECT"), ("db.system.name", "postgresql"), ("server.address", "db")])
            )
        );
        assert!(measurement(&span(&p, SpanKind::Server, 1, &[])).is_none());
        // Every attribute a series can have, in key order (the order is built, not sorted).
        let e = span(
            &p,
            SpanKind::Server,
            3,
            &[
                ("http.request.method", "GET".into()),
                ("url.path", "/a".into()),
                ("http.response.status_code", AttrValue::Int(500)),
                ("error.type", "500".into()),
            ],
        );
        let keys = |s: &SpanRecord| measurement(s).unwrap().1.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(&e), ["error.type", "http.request.method", "http.response.status_code", "http.route"]);
        let d = span(
            &p,
            SpanKind::Client,
            3,
            &[
                ("db.system.name", "redis".into()),
                ("db.operation.name", "GET".into()),
                ("server.address", "cache".into()),
                ("error.type", "ERR".into()),
            ],
        );
        assert_eq!(keys(&d), ["db.operation.name", "db.system.name", "error.type", "server.address"]);
    }

    #[test]
    fn server_route_comes_from_the_span_name_the_stitcher_gave() {
        let p = process(1, "shop");
        let attrs = [("http.request.method", "GET".into()), ("url.path", "/users/123".into())];
        let route = |name: &str| {
            let mut s = span(&p, SpanKind::Server, 1, &attrs);
            s.name = name.to_string().into();
            get(&s).1.into_iter().find(|(k, _)| k == "http.route").map(|(_, v)| v)
        };
        // "METHOD route" (as `Stitcher` names server spans): the name's route, not re-templated.
        assert_eq!(route("GET /users/{id}").as_deref(), Some("/users/{id}"));
        assert_eq!(route("GET /named").as_deref(), Some("/named"));
        // Any other name: the template of `url.path`.
        for other in ["POST /users/{id}", "GET", "GETX /a", "GET users", "custom"] {
            assert_eq!(route(other).as_deref(), Some("/users/{id}"), "{other}");
        }
    }

    #[test]
    fn histograms_per_process_with_semconv_buckets_and_prometheus_text() {
        let red = Red::new(DEFAULT_SERIES_LIMIT, Arc::default());
        let (a, b) = (process(11, "shop"), process(12, "api"));
        let get = |p: &Arc<ProcessResource>, path: &str, ms: u64| {
            span(
                p,
                SpanKind::Server,
                ms,
                &[
                    ("http.request.method", "GET".into()),
                    ("url.path", path.to_string().into()),
                    ("http.response.status_code", AttrValue::Int(200)),
                ],
            )
        };
        red.record(&get(&a, "/users/123", 3));
        red.record(&get(&a, "/users/456", 30));
        red.record(&get(&b, "/health", 700));
        let rms = red.collect(false);
        assert_eq!(rms.len(), 2);
        let mut text = String::new();
        red.render_prometheus(&mut text);
        let shop = "service_name=\"shop\",process_pid=\"11\",http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/users/{id}\"";
        for line in [
            "# TYPE http_server_request_duration_seconds histogram".to_string(),
            format!("http_server_request_duration_seconds_bucket{{{shop},le=\"0.005\"}} 1"),
            format!("http_server_request_duration_seconds_bucket{{{shop},le=\"0.025\"}} 1"),
            format!("http_server_request_duration_seconds_bucket{{{shop},le=\"0.05\"}} 2"),
            format!("http_server_request_duration_seconds_bucket{{{shop},le=\"10.0\"}} 2"),
            format!("http_server_request_duration_seconds_bucket{{{shop},le=\"+Inf\"}} 2"),
            format!("http_server_request_duration_seconds_sum{{{shop}}} 0.033"),
            format!("http_server_request_duration_seconds_count{{{shop}}} 2"),
            "http_server_request_duration_seconds_bucket{service_name=\"api\",process_pid=\"12\",http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/health\",le=\"0.75\"} 1".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // One bucket line per boundary plus +Inf, per series.
        let shop_buckets = text
            .lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_bucket{service_name=\"shop\""))
            .count();
        assert_eq!(shop_buckets, HTTP_BUCKETS.len() + 1);
        assert!(!text.contains("db_client_operation_duration_seconds"));
        assert_eq!(red.stats.measured.load(Relaxed), 3);
    }

    #[test]
    fn cardinality_budget_overflows_into_one_series_and_counts() {
        let red = Red::new(2, Arc::default());
        let p = process(21, "shop");
        for path in ["/a", "/b", "/c", "/d", "/a"] {
            red.record(&span(
                &p,
                SpanKind::Server,
                1,
                &[("http.request.method", "GET".into()), ("url.path", path.into())],
            ));
        }
        assert_eq!(red.stats.overflow.load(Relaxed), 2);
        let mut text = String::new();
        red.render_prometheus(&mut text);
        let counts: Vec<&str> =
            text.lines().filter(|l| l.starts_with("http_server_request_duration_seconds_count")).collect();
        assert_eq!(counts.len(), 3, "{text}");
        assert!(
            counts.contains(&"http_server_request_duration_seconds_count{service_name=\"shop\",process_pid=\"21\",otel_metric_overflow=\"true\"} 2"),
            "{text}"
        );
        assert!(counts.contains(
            &"http_server_request_duration_seconds_count{service_name=\"shop\",process_pid=\"21\",http_request_method=\"GET\",http_route=\"/a\"} 2"
        ));
    }

    #[test]
    fn ratio_sampling_is_consistent_and_respects_callers() {
        let p = process(1, "a");
        let mut s = span(&p, SpanKind::Server, 1, &[]);
        s.trace_id = [0; 16];
        assert!(keep(&s, 0.01));
        s.trace_id = [0xff; 16];
        assert!(!keep(&s, 0.99));
        assert!(keep(&s, 1.0));
        s.parent_source = ParentSource::Header;
        assert!(keep(&s, 0.0));
        // Roughly the ratio over many ids.
        let mut kept = 0;
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut s = span(&p, SpanKind::Server, 1, &[]);
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.trace_id[8..].copy_from_slice(&x.to_be_bytes());
            kept += usize::from(keep(&s, 0.25));
        }
        assert!((2200..2800).contains(&kept), "{kept}");
    }

    #[test]
    fn tee_measures_all_and_keeps_sampled() {
        let red = Arc::new(Red::new(10, Arc::default()));
        let ratio: SamplingRatio = Arc::new(|p: &ProcessResource| if p.service_name == "drop" { 0.0 } else { 1.0 });
        let tee = Tee { red: Arc::clone(&red), ratio: Some(ratio) };
        let keep_p = process(1, "keep");
        let drop_p = process(2, "drop");
        let attrs = [("http.request.method", AttrValue::from("GET"))];
        let mut spans = vec![span(&keep_p, SpanKind::Server, 1, &attrs), span(&drop_p, SpanKind::Server, 1, &attrs)];
        tee.pass(&mut spans);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].resource.service_name, "keep");
        assert_eq!(red.stats.measured.load(Relaxed), 2);
        assert_eq!(red.stats.sampled_out.load(Relaxed), 1);
    }
}
