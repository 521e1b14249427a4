//! A real OTLP receiver for tests: [rotel](https://pypi.org/project/rotel/) (`pip install
//! rotel==0.0.1a15`), an OpenTelemetry collector written in Rust, run on free loopback ports with
//! the blackhole exporter and its detailed debug log of received traces on stdout, which
//! [`parse_debug_output`] turns into [`ReceivedSpan`]s.
//!
//! ```no_run
//! use waybill_tests::otlp_receiver::{Proto, Receiver};
//! let rx = Receiver::start(Proto::Grpc);
//! // point the exporter at rx.endpoint() (OTEL_EXPORTER_OTLP_ENDPOINT) with
//! // OTEL_EXPORTER_OTLP_PROTOCOL=rx.protocol(), then:
//! let spans = rx.wait_for_spans(3, std::time::Duration::from_secs(10));
//! ```
//!
//! The binary is `$ROTEL_AGENT` if set, else `rotel-agent` inside the installed `rotel` Python
//! package (found with `python3`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The OTLP transport a test exports with; the receiver listens on both anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Grpc,
    HttpProtobuf,
}

/// One span as the receiver got it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// Lower-case hex.
    pub trace_id: String,
    pub span_id: String,
    /// `None` when the span has no parent.
    pub parent_span_id: Option<String>,
    pub name: String,
    /// `Server`, `Client`, `Internal`, `Producer`, `Consumer` or `Unspecified`.
    pub kind: String,
    pub trace_state: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// Values without their type: `Str(GET)` → `GET`, `Int(200)` → `200`, `Bool(true)` → `true`.
    pub attributes: BTreeMap<String, String>,
    /// The type of each attribute: `Str`, `Int`, `Bool`, `Double`, `Slice`, `Map`, `Bytes`.
    pub attribute_types: BTreeMap<String, String>,
    /// The resource's attributes, values as in `attributes`.
    pub resource: BTreeMap<String, String>,
    pub resource_types: BTreeMap<String, String>,
    pub scope_name: String,
    pub scope_version: String,
    /// `Unset`, `Ok` or `Error`.
    pub status_code: String,
    pub status_message: String,
}

/// A running rotel, killed on drop.
pub struct Receiver {
    child: Child,
    proto: Proto,
    grpc_port: u16,
    http_port: u16,
    output: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    dir: PathBuf,
    /// Also print received metrics (`--debug-log metrics`).
    with_metrics: bool,
}

/// Where the `rotel-agent` binary is.
pub fn rotel_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("ROTEL_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args(["-c", "import rotel, os; print(os.path.dirname(rotel.__file__))"])
        .output()
        .context("running python3 to find the rotel package")?;
    if !out.status.success() {
        bail!(
            "the rotel Python package is not installed (pip install rotel==0.0.1a15): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let bin = PathBuf::from(String::from_utf8(out.stdout)?.trim()).join("rotel-agent");
    if !bin.exists() {
        bail!("{} does not exist", bin.display());
    }
    Ok(bin)
}

fn free_ports() -> anyhow::Result<(u16, u16)> {
    // Both held at once so they differ; released just before rotel binds them.
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn pump(stream: impl Read + Send + 'static, sink: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => sink.lock().unwrap().push_str(&String::from_utf8_lossy(&line)),
            }
        }
    });
}

impl Receiver {
    /// Starts rotel and waits until both its ports accept connections. Panics on failure.
    pub fn start(proto: Proto) -> Receiver {
        match Receiver::try_start(proto) {
            Ok(r) => r,
            Err(e) => panic!("cannot start the OTLP receiver (rotel): {e:#}"),
        }
    }

    pub fn try_start(proto: Proto) -> anyhow::Result<Receiver> {
        Receiver::try_start_with(proto, false)
    }

    /// Like [`start`](Self::start), also printing received metrics (see [`metrics`](Self::metrics)).
    pub fn start_with_metrics(proto: Proto) -> Receiver {
        match Receiver::try_start_with(proto, true) {
            Ok(r) => r,
            Err(e) => panic!("cannot start the OTLP receiver (rotel): {e:#}"),
        }
    }

    fn spawn(
        bin: &std::path::Path,
        grpc_port: u16,
        http_port: u16,
        dir: &std::path::Path,
        with_metrics: bool,
        output: &Arc<Mutex<String>>,
        stderr: &Arc<Mutex<String>>,
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new(bin);
        cmd.arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "traces"]);
        if with_metrics {
            cmd.args(["--debug-log", "metrics"]);
        }
        let mut child = cmd
            .args(["--debug-log-verbosity", "detailed"])
            .args(["--log-format", "json"])
            .arg("--pid-file")
            .arg(dir.join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.join("rotel.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        pump(child.stdout.take().unwrap(), Arc::clone(output));
        pump(child.stderr.take().unwrap(), Arc::clone(stderr));
        Ok(child)
    }

    pub fn try_start_with(proto: Proto, with_metrics: bool) -> anyhow::Result<Receiver> {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = rotel_binary()?;
        let dir = std::env::temp_dir().join(format!(
            "waybill-rotel-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut last_err = None;
        // A port taken between free_ports() and rotel's bind: try again with new ones.
        for _ in 0..3 {
            let (grpc_port, http_port) = free_ports()?;
            let output = Arc::new(Mutex::new(String::new()));
            let stderr = Arc::new(Mutex::new(String::new()));
            let child = Receiver::spawn(&bin, grpc_port, http_port, &dir, with_metrics, &output, &stderr)?;
            let mut r = Receiver { child, proto, grpc_port, http_port, output, stderr, dir: dir.clone(), with_metrics };
            match r.wait_ready(Duration::from_secs(15)) {
                Ok(()) => return Ok(r),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap())
    }

    /// Kills rotel (a collector outage): its ports refuse connections until [`restart`](Self::restart).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts rotel again on the same ports; what it receives is appended to what was received
    /// before. Panics if it cannot listen again within 15 s.
    pub fn restart(&mut self) {
        let bin = rotel_binary().expect("rotel");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let child = Receiver::spawn(
                &bin,
                self.grpc_port,
                self.http_port,
                &self.dir,
                self.with_metrics,
                &self.output,
                &self.stderr,
            )
            .expect("spawn rotel");
            self.child = child;
            match self.wait_ready(Duration::from_secs(5)) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("rotel did not restart: {e:#}"),
                Err(_) => {
                    self.stop();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("rotel exited with {status}: {}{}", self.stderr.lock().unwrap(), self.output.lock().unwrap());
            }
            let up = |port| TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up(self.grpc_port) && up(self.http_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("rotel did not listen within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Base URL of the gRPC receiver, `http://127.0.0.1:PORT`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Base URL of the HTTP receiver, `http://127.0.0.1:PORT` (traces at `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The base URL for the transport chosen at start (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        match self.proto {
            Proto::Grpc => self.grpc_endpoint(),
            Proto::HttpProtobuf => self.http_endpoint(),
        }
    }

    /// `OTEL_EXPORTER_OTLP_PROTOCOL` for the transport chosen at start.
    pub fn protocol(&self) -> &'static str {
        match self.proto {
            Proto::Grpc => "grpc",
            Proto::HttpProtobuf => "http/protobuf",
        }
    }

    /// Everything rotel printed to stdout so far.
    pub fn raw_output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Spans received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        parse_debug_output(&self.output.lock().unwrap())
    }

    /// Waits until at least `n` spans arrived or `timeout` passed; returns what arrived.
    pub fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Section {
    None,
    Resource,
    Scope,
    Span,
    SpanAttributes,
    /// Events and links: their lines are skipped.
    Skip,
}

#[derive(Clone)]
enum Target {
    Resource(String),
    Attribute(String),
    Name,
    StatusMessage,
    TraceState,
}

fn unwrap_value(raw: &str) -> (String, String) {
    if let Some(open) = raw.find('(') {
        let ty = &raw[..open];
        if !ty.is_empty() && ty.chars().all(|c| c.is_ascii_alphabetic()) && raw.ends_with(')') {
            return (ty.to_string(), raw[open + 1..raw.len() - 1].to_string());
        }
    }
    (String::new(), raw.to_string())
}

fn kind_name(raw: &str) -> String {
    match raw.trim() {
        "SPAN_KIND_SERVER" => "Server",
        "SPAN_KIND_CLIENT" => "Client",
        "SPAN_KIND_INTERNAL" => "Internal",
        "SPAN_KIND_PRODUCER" => "Producer",
        "SPAN_KIND_CONSUMER" => "Consumer",
        "SPAN_KIND_UNSPECIFIED" => "Unspecified",
        other => other,
    }
    .to_string()
}

fn status_name(raw: &str) -> String {
    match raw.trim() {
        "STATUS_CODE_UNSET" => "Unset",
        "STATUS_CODE_OK" => "Ok",
        "STATUS_CODE_ERROR" => "Error",
        other => other,
    }
    .to_string()
}

/// A span field line, `    {key:<15}: {value}`.
fn field_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("    ")?;
    if rest.starts_with(' ') || rest.len() < 17 || !rest.is_char_boundary(15) {
        return None;
    }
    let (key, value) = rest.split_at(15);
    let key = key.trim_end();
    let value = value.strip_prefix(": ").or(value.strip_prefix(":"))?;
    key.chars().all(|c| c.is_ascii_alphabetic() || c == ' ').then_some((key, value))
}

fn is_log_line(line: &str) -> bool {
    line.starts_with('{')
        && line.ends_with('}')
        && serde_json::from_str::<serde_json::Value>(line).map(|v| v.get("msg").is_some()).unwrap_or(false)
}

/// Parses rotel's `--debug-log traces --debug-log-verbosity detailed` output (log lines in between
/// are skipped). Attribute values or names spanning several lines are joined with `\n`.
pub fn parse_debug_output(text: &str) -> Vec<ReceivedSpan> {
    let mut spans: Vec<ReceivedSpan> = Vec::new();
    let mut resource: BTreeMap<String, String> = BTreeMap::new();
    let mut resource_types: BTreeMap<String, String> = BTreeMap::new();
    let mut scope = (String::new(), String::new());
    let mut section = Section::None;
    let mut current: Option<ReceivedSpan> = None;
    // The value being read (for continuation lines): target and raw text.
    let mut open: Option<(Target, String)> = None;

    fn close(
        open: &mut Option<(Target, String)>,
        current: &mut Option<ReceivedSpan>,
        resource: &mut BTreeMap<String, String>,
        resource_types: &mut BTreeMap<String, String>,
    ) {
        let Some((target, raw)) = open.take() else {
            return;
        };
        match target {
            Target::Resource(k) => {
                let (ty, v) = unwrap_value(&raw);
                resource.insert(k.clone(), v);
                resource_types.insert(k, ty);
            }
            Target::Attribute(k) => {
                if let Some(s) = current.as_mut() {
                    let (ty, v) = unwrap_value(&raw);
                    s.attributes.insert(k.clone(), v);
                    s.attribute_types.insert(k, ty);
                }
            }
            Target::Name => {
                if let Some(s) = current.as_mut() {
                    s.name = raw;
                }
            }
            Target::StatusMessage => {
                if let Some(s) = current.as_mut() {
                    s.status_message = raw;
                }
            }
            Target::TraceState => {
                if let Some(s) = current.as_mut() {
                    s.trace_state = raw;
                }
            }
        }
    }

    // Inside a `--debug-log metrics` block: everything up to the next `ResourceSpans #` is skipped.
    let mut in_metrics = false;
    for line in text.lines() {
        if line.starts_with("ResourceMetrics #") {
            close(&mut open, &mut current, &mut resource, &mut resource_types);
            spans.extend(current.take());
            in_metrics = true;
            continue;
        }
        if in_metrics {
            if !line.starts_with("ResourceSpans #") {
                continue;
            }
            in_metrics = false;
        }
        let structural = line.starts_with("ResourceSpans #")
            || line.starts_with("Resource SchemaURL:")
            || line == "Resource attributes:"
            || line.starts_with("ScopeSpans #")
            || line.starts_with("ScopeSpans SchemaURL:")
            || line.starts_with("InstrumentationScope ")
            || line.starts_with("Span #")
            || line.starts_with("Start time: ")
            || line.starts_with("End time: ")
            || line == "Attributes:"
            || line == "Events:"
            || line == "Links:"
            || line.starts_with("     -> ")
            || field_line(line).is_some()
            || is_log_line(line);
        if !structural {
            if let Some((_, raw)) = open.as_mut() {
                raw.push('\n');
                raw.push_str(line);
            }
            continue;
        }
        close(&mut open, &mut current, &mut resource, &mut resource_types);

        if line.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            resource.clear();
            resource_types.clear();
            section = Section::None;
        } else if line == "Resource attributes:" {
            section = Section::Resource;
        } else if line.starts_with("ScopeSpans #") {
            spans.extend(current.take());
            section = Section::None;
        } else if line == "InstrumentationScope attributes:" {
            section = Section::Scope;
        } else if let Some(rest) = line.strip_prefix("InstrumentationScope ") {
            let mut parts = rest.splitn(2, ' ');
            scope = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string());
            section = Section::None;
        } else if line.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(ReceivedSpan {
                resource: resource.clone(),
                resource_types: resource_types.clone(),
                scope_name: scope.0.clone(),
                scope_version: scope.1.clone(),
                ..Default::default()
            });
            section = Section::Span;
        } else if let Some(v) = line.strip_prefix("Start time: ") {
            if let Some(s) = current.as_mut() {
                s.start_unix_ns = v.trim().parse().unwrap_or_default();
            }
        } else if let Some(v) = line.strip_prefix("End time: ") {
            if let Some(s) = current.as_mut() {
                s.end_unix_ns = v.trim().parse().unwrap_or_default();
            }
        } else if line == "Attributes:" {
            section = Section::SpanAttributes;
        } else if line == "Events:" || line == "Links:" {
            section = Section::Skip;
        } else if let Some(kv) = line.strip_prefix("     -> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            match section {
                Section::Resource => open = Some((Target::Resource(k.to_string()), v.to_string())),
                Section::SpanAttributes => open = Some((Target::Attribute(k.to_string()), v.to_string())),
                _ => {}
            }
        } else if let Some((key, value)) = field_line(line) {
            if section != Section::Span && section != Section::SpanAttributes {
                continue;
            }
            let Some(s) = current.as_mut() else { continue };
            match key {
                "Trace ID" => s.trace_id = value.trim().to_string(),
                "Parent ID" => s.parent_span_id = Some(value.trim().to_string()).filter(|v| !v.is_empty()),
                "ID" => s.span_id = value.trim().to_string(),
                "Name" => open = Some((Target::Name, value.to_string())),
                "Kind" => s.kind = kind_name(value),
                "TraceState" => open = Some((Target::TraceState, value.to_string())),
                "Status code" => s.status_code = status_name(value),
                "Status message" => open = Some((Target::StatusMessage, value.to_string())),
                _ => {}
            }
        }
    }
    close(&mut open, &mut current, &mut resource, &mut resource_types);
    spans.extend(current.take());
    for s in &mut spans {
        if s.status_code.is_empty() {
            s.status_code = "Unset".to_string();
        }
    }
    spans
}

/// One metric data point as the receiver got it (`--debug-log metrics`, see
/// [`Receiver::start_with_metrics`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReceivedPoint {
    pub metric: String,
    pub unit: String,
    /// `Histogram`, `Sum`, `Gauge`, …
    pub data_type: String,
    /// `AGGREGATION_TEMPORALITY_CUMULATIVE` or `…_DELTA`.
    pub temporality: String,
    /// Values without their type, as in [`ReceivedSpan::attributes`].
    pub resource: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    pub count: u64,
    pub sum: f64,
    pub bounds: Vec<f64>,
    pub bucket_counts: Vec<u64>,
    pub start_unix_ns: u64,
    pub time_unix_ns: u64,
}

impl Receiver {
    /// Metric data points received so far, in arrival order (each export repeats cumulative
    /// points: the last one of a series is its latest value).
    pub fn metric_points(&self) -> Vec<ReceivedPoint> {
        parse_metrics_output(&self.output.lock().unwrap())
    }
}

/// Parses rotel's `--debug-log metrics --debug-log-verbosity detailed` output (trace blocks and
/// log lines are skipped).
pub fn parse_metrics_output(text: &str) -> Vec<ReceivedPoint> {
    #[derive(PartialEq)]
    enum Sec {
        Out,
        Resource,
        Descriptor,
        PointAttributes,
        Point,
    }
    let mut points = Vec::new();
    let mut sec = Sec::Out;
    let mut in_metrics = false;
    let mut resource = BTreeMap::new();
    let mut desc = ReceivedPoint::default();
    let mut current: Option<ReceivedPoint> = None;
    for line in text.lines() {
        if line.starts_with("ResourceMetrics #") {
            points.extend(current.take());
            in_metrics = true;
            resource.clear();
            sec = Sec::Out;
            continue;
        }
        if line.starts_with("ResourceSpans #") || is_log_line(line) {
            points.extend(current.take());
            if line.starts_with("ResourceSpans #") {
                in_metrics = false;
            }
            continue;
        }
        if !in_metrics {
            continue;
        }
        if line == "Resource attributes:" {
            sec = Sec::Resource;
        } else if line.starts_with("Metric #") {
            points.extend(current.take());
            desc = ReceivedPoint::default();
            sec = Sec::Out;
        } else if line == "Descriptor:" {
            sec = Sec::Descriptor;
        } else if line.ends_with("DataPoints #") || line.contains("DataPoints #") {
            points.extend(current.take());
            let mut p = desc.clone();
            p.resource = resource.clone();
            current = Some(p);
            sec = Sec::Point;
        } else if line == "Data point attributes:" {
            sec = Sec::PointAttributes;
        } else if let Some(kv) = line.strip_prefix("     -> ") {
            let Some((k, v)) = kv.split_once(": ") else { continue };
            match sec {
                Sec::Resource => {
                    resource.insert(k.to_string(), unwrap_value(v).1);
                }
                Sec::Descriptor => match k {
                    "Name" => desc.metric = v.to_string(),
                    "Unit" => desc.unit = v.to_string(),
                    "DataType" => desc.data_type = v.to_string(),
                    "AggregationTemporality" => desc.temporality = v.to_string(),
                    _ => {}
                },
                Sec::PointAttributes => {
                    if let Some(p) = current.as_mut() {
                        p.attributes.insert(k.to_string(), unwrap_value(v).1);
                    }
                }
                _ => {}
            }
        } else if let Some(p) = current.as_mut() {
            sec = Sec::Point;
            let num = |v: &str| v.trim().parse::<f64>().unwrap_or_default();
            if let Some(v) = line.strip_prefix("Count: ") {
                p.count = v.trim().parse().unwrap_or_default();
            } else if let Some(v) = line.strip_prefix("Sum: ") {
                p.sum = num(v);
            } else if let Some(v) = line.strip_prefix("Value: ") {
                p.sum = num(v);
            } else if let Some(v) = line.strip_prefix("StartTimestamp: ") {
                p.start_unix_ns = v.trim().parse().unwrap_or_default();
            } else if let Some(v) = line.strip_prefix("Timestamp: ") {
                p.time_unix_ns = v.trim().parse().unwrap_or_default();
            } else if let Some(rest) = line.strip_prefix("ExplicitBounds #") {
                if let Some((_, v)) = rest.split_once(": ") {
                    p.bounds.push(num(v));
                }
            } else if let Some((_, v)) = line.strip_prefix("Buckets #").and_then(|r| r.split_once("Count: ")) {
                p.bucket_counts.push(v.trim().parse().unwrap_or_default());
            }
        }
    }
    points.extend(current.take());
    points
}

/// The attribute `k` of a received span; panics naming the span when it has none.
pub fn attr<'a>(s: &'a ReceivedSpan, k: &str) -> &'a str {
    s.attributes.get(k).map(String::as_str).unwrap_or_else(|| panic!("{} has no {k}: {:?}", s.name, s.attributes))
}

/// The `OTEL_EXPORTER_OTLP_*` variables that point an agent at `r`.
pub fn otlp_env(r: &Receiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", r.protocol().to_string())]
}

/// `(key, value)` pairs borrowed, as [`crate::harness::Agent::start`] takes them.
pub fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from rotel 0.0.1a15 (two resources; a value with a newline; a log line).
    const SAMPLE: &str = r#"{"v":0,"name":"rotel-0.0.1-alpha10-e6a2d53","msg":"Starting Rotel.","level":30,"hostname":"vm","pid":9374,"time":"2026-11-25T12:54:45.698878102Z","target":"rotel::init::agent","line":95,"file":"src/init/agent.rs","grpc_endpoint":"127.0.0.1:14317","http_endpoint":"127.0.0.1:14318"}
ResourceSpans #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(shop)
     -> process.pid: Int(4121)
ScopeSpans #0
ScopeSpans SchemaURL: 
InstrumentationScope waybill 0.1.0
Span #0
    Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
    Parent ID      : 
    ID             : 00f067aa0ba902b7
    Name           : POST /orders
    Kind           : SPAN_KIND_SERVER
    TraceState     : rojo=00f067aa0ba902b7
Start time: 1700000000000000000
End time: 1700000000847000000
    Status code    : STATUS_CODE_ERROR
    Status message : boom
Attributes:
     -> http.request.method: Str(POST)
     -> http.response.status_code: Int(500)
     -> b: Bool(true)
     -> weird: Str(a "quoted", x=y
newline)
Span #1
    Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
    Parent ID      : 00f067aa0ba902b7
    ID             : 1111111111111111
    Name           : SELECT cards
    Kind           : SPAN_KIND_CLIENT
    TraceState     : 
Start time: 1700000000005000000
End time: 1700000000025000000
    Status code    : STATUS_CODE_UNSET
    Status message : 
Attributes:
     -> db.system.name: Str(postgresql)
ResourceSpans #1
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(api)
     -> process.pid: Int(77)
ScopeSpans #0
ScopeSpans SchemaURL: 
InstrumentationScope waybill 0.1.0
Span #0
    Trace ID       : 4bf92f3577b34da6a3ce929d0e0e4736
    Parent ID      : 1111111111111111
    ID             : 2222222222222222
    Name           : GET /x
    Kind           : SPAN_KIND_SERVER
    TraceState     : 
Start time: 1700000000006000000
End time: 1700000000024000000
    Status code    : STATUS_CODE_UNSET
    Status message : 
"#;

    #[test]
    fn parses_sample() {
        let spans = parse_debug_output(SAMPLE);
        assert_eq!(spans.len(), 3, "{spans:#?}");
        let s = &spans[0];
        assert_eq!(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.span_id, "00f067aa0ba902b7");
        assert_eq!(s.parent_span_id, None);
        assert_eq!(s.name, "POST /orders");
        assert_eq!(s.kind, "Server");
        assert_eq!(s.trace_state, "rojo=00f067aa0ba902b7");
        assert_eq!(s.start_unix_ns, 1_700_000_000_000_000_000);
        assert_eq!(s.end_unix_ns, 1_700_000_000_847_000_000);
        assert_eq!((s.status_code.as_str(), s.status_message.as_str()), ("Error", "boom"));
        assert_eq!(s.attributes["http.request.method"], "POST");
        assert_eq!(s.attributes["http.response.status_code"], "500");
        assert_eq!(s.attribute_types["http.response.status_code"], "Int");
        assert_eq!(s.attributes["b"], "true");
        assert_eq!(s.attributes["weird"], "a \"quoted\", x=y\nnewline");
        assert_eq!(s.resource["service.name"], "shop");
        assert_eq!(s.resource["process.pid"], "4121");
        assert_eq!(s.resource_types["process.pid"], "Int");
        assert_eq!((s.scope_name.as_str(), s.scope_version.as_str()), ("waybill", "0.1.0"));

        let s = &spans[1];
        assert_eq!(s.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(s.kind, "Client");
        assert_eq!(s.status_code, "Unset");
        assert_eq!(s.status_message, "");
        assert_eq!(s.trace_state, "");
        assert_eq!(s.resource["service.name"], "shop");
        assert_eq!(s.attributes.len(), 1);

        let s = &spans[2];
        assert_eq!(s.resource["service.name"], "api");
        assert_eq!(s.resource["process.pid"], "77");
        assert!(s.attributes.is_empty());
    }

    const METRICS_SAMPLE: &str = "ResourceMetrics #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(shop)
     -> process.pid: Int(17218)
ScopeMetrics #0
ScopeMetrics SchemaURL: 
InstrumentationScope waybill 0.1.0
Metric #0
Descriptor:
     -> Name: http.server.request.duration
     -> Description: Duration of HTTP server requests.
     -> Unit: s
     -> DataType: Histogram
     -> AggregationTemporality: AGGREGATION_TEMPORALITY_CUMULATIVE
HistogramDataPoints #0
Data point attributes:
     -> http.request.method: Str(GET)
     -> http.response.status_code: Int(200)
     -> http.route: Str(/users/{id})
StartTimestamp: 1795614004200511303
Timestamp: 1795614004512334155
Count: 2
Sum: 0.001237375
Min: 0.000475235
Max: 0.00076214
ExplicitBounds #0: 0.005
ExplicitBounds #1: 0.01
Buckets #0, Count: 2
Buckets #1, Count: 0
Buckets #2, Count: 0
HistogramDataPoints #1
Data point attributes:
     -> http.route: Str(/fail)
Count: 1
Sum: 0.5
";

    #[test]
    fn parses_metrics_and_skips_them_in_traces() {
        let text = format!("{METRICS_SAMPLE}{SAMPLE}{METRICS_SAMPLE}");
        let points = parse_metrics_output(&text);
        assert_eq!(points.len(), 4, "{points:#?}");
        let p = &points[0];
        assert_eq!(p.metric, "http.server.request.duration");
        assert_eq!((p.unit.as_str(), p.data_type.as_str()), ("s", "Histogram"));
        assert_eq!(p.temporality, "AGGREGATION_TEMPORALITY_CUMULATIVE");
        assert_eq!(p.resource["service.name"], "shop");
        assert_eq!(p.attributes["http.route"], "/users/{id}");
        assert_eq!(p.attributes["http.response.status_code"], "200");
        assert_eq!((p.count, p.sum), (2, 0.001237375));
        assert_eq!(p.bounds, vec![0.005, 0.01]);
        assert_eq!(p.bucket_counts, vec![2, 0, 0]);
        assert_eq!(p.start_unix_ns, 1795614004200511303);
        assert_eq!((points[1].count, points[1].attributes.len()), (1, 1));
        // The traces parser is not confused by metric blocks.
        assert_eq!(parse_debug_output(&text), parse_debug_output(SAMPLE));
    }

    #[test]
    fn parses_nothing_from_logs_only() {
        assert!(parse_debug_output("").is_empty());
        assert!(parse_debug_output(SAMPLE.lines().next().unwrap()).is_empty());
    }
}
