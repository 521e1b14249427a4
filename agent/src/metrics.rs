//! Waybill's own counters (`waybill_*`), in one place, and the Prometheus `/metrics` endpoint.
//!
//! Every loss has a counter. Kernel-side losses are read from the `LOST` per-CPU map and
//! published here as `waybill_ringbuf_records_lost_total{reason=…}`.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use crate::export::otlp::ExportStats;
use crate::export::red::{Red, RedStats};
use std::sync::OnceLock;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// A counter or gauge.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// All self-metrics. Shared as `Arc<Metrics>`.
#[derive(Default, Debug)]
pub struct Metrics {
    pub records_received: Counter,
    pub records_malformed: Counter,
    /// Kernel-side losses by reason (sums over CPUs, refreshed periodically).
    pub lost_ringbuf_full: Counter,
    pub lost_payload_truncated: Counter,
    pub lost_stash_full: Counter,
    pub lost_read_user: Counter,
    pub bytes_captured: Counter,
    pub connections_tracked: Counter,
    pub connections_opened: Counter,
    pub connections_evicted: Counter,
    pub connections_unknown_protocol: Counter,
    pub parse_errors: Counter,
    pub requests_unpaired: Counter,
    pub spans_created: Counter,
    pub spans_unsampled: Counter,
    pub spans_dropped_queue_full: Counter,
    pub traceparent_malformed: Counter,
    pub processes_attached: Counter,
    pub process_attach_failures: Counter,
    pub probe_attach_failures: Counter,
    pub parent_source_none: Counter,
    pub parent_source_header: Counter,
    pub parent_source_thread: Counter,
    pub parent_source_connection: Counter,
    pub parent_uncertain: Counter,
    pub contexts_evicted: Counter,
    /// Header injection: 1 when sock_ops + sk_msg are attached / when they could not be.
    pub inject_active: Counter,
    pub inject_unavailable: Counter,
    /// sk_msg / sock_ops outcomes by `INJ_*` index (kernel counters, refreshed periodically).
    pub inject: [Counter; waybill_common::INJ_COUNTERS as usize],
    /// Client requests whose injection record never met a request head, or server requests whose
    /// kernel-decided context disagreed with what user space parsed.
    pub inject_unmatched: Counter,
    pub kernel_context_mismatch: Counter,
    /// 1 while the agent yields the CPU to the applications (SCHED_IDLE), 0 while it competes.
    pub cpu_yielding: Counter,
    pub cpu_policy_switches: Counter,
    /// Ring-buffer drains by what started them: the kernel's wake-up, the drain timer, the
    /// housekeeping tick while the event loop sleeps.
    pub drains_wakeup: Counter,
    pub drains_timer: Counter,
    pub drains_tick: Counter,
    /// 1 while the event loop sleeps with no drain timer (the next record wakes it).
    pub event_loop_asleep: Counter,
    /// Filled by the exporter.
    pub export: Arc<ExportStats>,
    /// Filled by the RED tee and the metric exporter.
    pub red_stats: Arc<RedStats>,
    /// The RED histograms, rendered after the self-metrics when set.
    pub red: OnceLock<Arc<Red>>,
    pub ready: AtomicBool,
}

impl Metrics {
    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let mut c = |name: &str, help: &str, kind: &str, series: &[(&str, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in series {
                if labels.is_empty() {
                    let _ = writeln!(s, "{name} {v}");
                } else {
                    let _ = writeln!(s, "{name}{{{labels}}} {v}");
                }
            }
        };
        c(
            "waybill_ringbuf_records_received_total",
            "Records read from the kernel ring buffer.",
            "counter",
            &[("", self.records_received.get())],
        );
        c(
            "waybill_ringbuf_records_lost_total",
            "Records or payload the kernel side could not deliver, by reason.",
            "counter",
            &[
                ("reason=\"buffer_full\"", self.lost_ringbuf_full.get()),
                ("reason=\"stash_full\"", self.lost_stash_full.get()),
                ("reason=\"read_user_failed\"", self.lost_read_user.get()),
                ("reason=\"malformed\"", self.records_malformed.get()),
            ],
        );
        c(
            "waybill_payload_truncated_total",
            "Syscalls whose payload was longer than the capture window (only a prefix was copied).",
            "counter",
            &[("", self.lost_payload_truncated.get())],
        );
        c(
            "waybill_captured_bytes_total",
            "Payload bytes copied from traced processes.",
            "counter",
            &[("", self.bytes_captured.get())],
        );
        c(
            "waybill_connections_tracked",
            "Connections in the connection table.",
            "gauge",
            &[("", self.connections_tracked.get())],
        );
        c("waybill_connections_opened_total", "Connections seen.", "counter", &[("", self.connections_opened.get())]);
        c(
            "waybill_connections_evicted_total",
            "Connections removed from the table because it was full or they were idle.",
            "counter",
            &[("", self.connections_evicted.get())],
        );
        c(
            "waybill_connections_unknown_protocol_total",
            "Connections whose protocol was not recognised (not parsed).",
            "counter",
            &[("", self.connections_unknown_protocol.get())],
        );
        c(
            "waybill_parse_errors_total",
            "Protocol parse errors and resynchronisations.",
            "counter",
            &[("", self.parse_errors.get())],
        );
        c(
            "waybill_requests_unpaired_total",
            "Requests that ended without a response (connection closed or evicted).",
            "counter",
            &[("", self.requests_unpaired.get())],
        );
        c("waybill_spans_created_total", "Spans built.", "counter", &[("", self.spans_created.get())]);
        c(
            "waybill_spans_unsampled_total",
            "Spans not exported because the incoming traceparent was not sampled.",
            "counter",
            &[("", self.spans_unsampled.get())],
        );
        c(
            "waybill_spans_dropped_total",
            "Spans dropped before export, by reason.",
            "counter",
            &[
                ("reason=\"queue_full\"", self.spans_dropped_queue_full.get()),
                ("reason=\"export_backlog\"", self.export.dropped.load(Relaxed)),
            ],
        );
        c(
            "waybill_spans_exported_total",
            "Spans accepted by the OTLP endpoint.",
            "counter",
            &[("", self.export.exported.load(Relaxed))],
        );
        c(
            "waybill_export_errors_total",
            "Spans given up on: the collector rejected them (permanent failure) or they could not be sent before shutdown.",
            "counter",
            &[("", self.export.failed.load(Relaxed))],
        );
        c(
            "waybill_export_retries_total",
            "Spans sent again after a retryable export failure.",
            "counter",
            &[("", self.export.retried.load(Relaxed))],
        );
        c(
            "waybill_export_pending_spans",
            "Spans held by the OTLP exporter (backlog and request in flight), e.g. during a collector outage.",
            "gauge",
            &[("", self.export.pending.load(Relaxed))],
        );
        c(
            "waybill_spans_sampled_out_total",
            "Spans not exported because of a service rule's sampling ratio (still counted in the RED metrics).",
            "counter",
            &[("", self.red_stats.sampled_out.load(Relaxed))],
        );
        c(
            "waybill_red_measurements_total",
            "Spans measured into the RED histograms.",
            "counter",
            &[("", self.red_stats.measured.load(Relaxed))],
        );
        c(
            "waybill_red_overflow_total",
            "RED measurements recorded under otel.metric.overflow=true because the process's series budget was spent.",
            "counter",
            &[("", self.red_stats.overflow.load(Relaxed))],
        );
        c(
            "waybill_metric_exports_total",
            "OTLP metric export requests (one per traced process and interval), by result.",
            "counter",
            &[
                ("result=\"ok\"", self.red_stats.exports.load(Relaxed)),
                ("result=\"failed\"", self.red_stats.export_failures.load(Relaxed)),
            ],
        );
        c(
            "waybill_traceparent_malformed_total",
            "Incoming traceparent headers ignored because they were malformed.",
            "counter",
            &[("", self.traceparent_malformed.get())],
        );
        c("waybill_processes_attached", "Processes currently traced.", "gauge", &[("", self.processes_attached.get())]);
        c(
            "waybill_cpu_yielding",
            "1 while the agent runs at idle priority (SCHED_IDLE, --cpu-policy), 0 while it competes for CPU.",
            "gauge",
            &[("", self.cpu_yielding.get())],
        );
        c(
            "waybill_cpu_policy_switches_total",
            "Switches between yielding and competing for CPU (--cpu-policy adaptive).",
            "counter",
            &[("", self.cpu_policy_switches.get())],
        );
        c(
            "waybill_cpu_courtesy_yields_total",
            "Times the agent, at idle priority, gave the CPU back in the middle of a long stretch of work (every 100 µs), so an application thread waiting on that CPU runs.",
            "counter",
            &[("", crate::sched::courtesy_yields())],
        );
        c(
            "waybill_ring_drains_total",
            "Ring-buffer drains, by what started them: the kernel's wake-up (another eighth of the buffer filled, or the first record after the agent went to sleep), the 500 ms drain timer, or the 1 s housekeeping tick while asleep.",
            "counter",
            &[
                ("trigger=\"wakeup\"", self.drains_wakeup.get()),
                ("trigger=\"timer\"", self.drains_timer.get()),
                ("trigger=\"tick\"", self.drains_tick.get()),
            ],
        );
        c(
            "waybill_event_loop_asleep",
            "1 while the agent sleeps with an empty ring buffer and no drain timer (idle traffic: the next record wakes it), 0 otherwise.",
            "gauge",
            &[("", self.event_loop_asleep.get())],
        );
        c(
            "waybill_process_attach_failures_total",
            "Processes that could not be traced.",
            "counter",
            &[("", self.process_attach_failures.get())],
        );
        c(
            "waybill_probe_attach_failures_total",
            "eBPF programs that failed to attach.",
            "counter",
            &[("", self.probe_attach_failures.get())],
        );
        c(
            "waybill_parent_links_total",
            "Spans by how their parent was found.",
            "counter",
            &[
                ("source=\"none\"", self.parent_source_none.get()),
                ("source=\"header\"", self.parent_source_header.get()),
                ("source=\"thread\"", self.parent_source_thread.get()),
                ("source=\"connection\"", self.parent_source_connection.get()),
            ],
        );
        c(
            "waybill_parent_links_uncertain_total",
            "Spans whose thread parent was ambiguous (several requests open on one thread: event loops).",
            "counter",
            &[("", self.parent_uncertain.get())],
        );
        c(
            "waybill_traceparent_injection",
            "1 when traceparent injection (sock_ops + sk_msg) is in use, by state.",
            "gauge",
            &[("state=\"active\"", self.inject_active.get()), ("state=\"unavailable\"", self.inject_unavailable.get())],
        );
        let i = |k: u32| self.inject[k as usize].get();
        use waybill_common::*;
        c(
            "waybill_traceparent_injections_total",
            "Outgoing messages on selected connections by what the sk_msg program did.",
            "counter",
            &[
                ("result=\"injected\"", i(INJ_INJECTED)),
                ("result=\"not_traced_process\"", i(INJ_NOT_TARGET)),
                ("result=\"not_http_request\"", i(INJ_NOT_HTTP)),
                ("result=\"has_traceparent\"", i(INJ_HAS_TRACEPARENT)),
                ("result=\"not_at_request_boundary\"", i(INJ_NOT_AT_BOUNDARY)),
                ("result=\"head_beyond_scan_window\"", i(INJ_HEAD_TOO_LONG)),
                ("result=\"helper_failed\"", i(INJ_HELPER_FAILED)),
                ("result=\"ringbuf_full\"", i(INJ_RINGBUF_FULL)),
                ("result=\"disabled_by_rule\"", i(INJ_DISABLED)),
            ],
        );
        c(
            "waybill_traceparent_sockets_total",
            "Outgoing connections of traced processes offered to the sk_msg program, by result.",
            "counter",
            &[("result=\"added\"", i(INJ_SOCK_ADDED)), ("result=\"failed\"", i(INJ_SOCK_ADD_FAILED))],
        );
        c(
            "waybill_traceparent_injections_unmatched_total",
            "Injection records that no client request head claimed (their CLIENT span keeps user-space ids).",
            "counter",
            &[("", self.inject_unmatched.get())],
        );
        c(
            "waybill_kernel_context_mismatch_total",
            "Server requests whose incoming traceparent the kernel's bounded scan did not find.",
            "counter",
            &[("", self.kernel_context_mismatch.get())],
        );
        c(
            "waybill_trace_contexts_evicted_total",
            "In-flight request contexts dropped because the context table was full.",
            "counter",
            &[("", self.contexts_evicted.get())],
        );
        if let Some(red) = self.red.get() {
            red.render_prometheus(&mut s);
        }
        s
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `addr` until the task is dropped.
pub async fn serve(addr: String, metrics: Arc<Metrics>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(&addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                // Read the whole request head (clients may write it in several pieces): answering
                // early and closing with unread bytes would reset the connection.
                let mut buf = [0u8; 2048];
                let mut n = 0;
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                    match tokio::time::timeout_at(deadline, sock.read(&mut buf[n..])).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                        Ok(Ok(k)) => n += k,
                    }
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                    "/healthz" if metrics.ready.load(Relaxed) => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/healthz" => ("503 Service Unavailable", "text/plain", "starting\n".to_string()),
                    _ => ("404 Not Found", "text/plain", "try /metrics or /healthz\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_every_family_once() {
        let m = Metrics::default();
        m.records_received.add(3);
        m.lost_ringbuf_full.add(2);
        let text = m.render();
        assert!(text.contains("waybill_ringbuf_records_received_total 3\n"));
        assert!(text.contains("waybill_ringbuf_records_lost_total{reason=\"buffer_full\"} 2\n"));
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let names: std::collections::HashSet<_> =
            text.lines().filter(|l| l.starts_with("# TYPE ")).map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(types, names.len());
        assert!(names.iter().all(|n| n.starts_with("waybill_")));
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let m = Arc::new(Metrics::default());
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap().to_string();
        drop(probe);
        let _h = serve(addr.clone(), m.clone()).await.unwrap();
        let get = |path: &'static str| {
            let addr = addr.clone();
            async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            }
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 503"));
        m.ready.store(true, Relaxed);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        let body = get("/metrics").await;
        assert!(body.contains("waybill_spans_created_total 0"));
        // A request head written in pieces is read whole before the answer.
        let mut s = tokio::net::TcpStream::connect(addr.clone()).await.unwrap();
        for piece in ["GET ", "/metrics", " HTTP/1.1\r\nHost: x\r\n", "\r\n"] {
            s.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200") && out.contains("waybill_spans_created_total 0"), "{out}");
    }
}
