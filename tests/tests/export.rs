//! Root integration tests of export: a real Python service traced by the real agent, a real OTLP
//! collector (rotel) that is stopped and restarted on the same ports, RED metrics over OTLP and
//! Prometheus, per-process resources. Every count is exact.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use waybill_tests::{
    harness::{
        Agent, Nginx, Proc, PythonHttp, TempDir, free_port, http_get, metric_value as metric, repo_root, require_root,
        sh,
    },
    otlp_receiver::{Proto, ReceivedPoint, ReceivedSpan, Receiver},
};

fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

fn otlp_env(r: &Receiver, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut v =
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", r.protocol().to_string())];
    v.extend(extra.iter().map(|(k, s)| (*k, s.to_string())));
    v
}

/// One GET on a fresh connection; panics unless the service answers `code`.
fn get(app: &PythonHttp, path: &str, code: u16) {
    let (c, _) = http_get(&format!("127.0.0.1:{}", app.port), path);
    assert_eq!(c, code, "GET {path}");
}

fn server_spans(r: &Receiver) -> Vec<ReceivedSpan> {
    r.spans().into_iter().filter(|s| s.kind == "Server").collect()
}

/// Waits until exactly `n` SERVER spans arrived and no more come within 1.5 s.
fn exactly_n_server_spans(r: &Receiver, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
    let end = Instant::now() + timeout;
    while server_spans(r).len() < n && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    server_spans(r)
}

/// `n` keep-alive GETs of the test nginx's `/api/items.json`, a new connection every 500 (it
/// closes one after 1000), each answered 200; false if the script failed.
fn keepalive_gets(port: u16, n: usize) -> bool {
    let script = format!(
        "import http.client\n\
         for i in range({n}):\n\
         \x20   if i % 500 == 0:\n\
         \x20       c = http.client.HTTPConnection('127.0.0.1', {port})\n\
         \x20   c.request('GET', '/api/items.json')\n\
         \x20   r = c.getresponse(); r.read()\n\
         \x20   assert r.status == 200, r.status\n"
    );
    std::process::Command::new("python3").args(["-c", &script]).status().expect("python3").success()
}

/// Waits (up to 30 s) until `n` SERVER spans arrived, then half a second more for stragglers.
fn wait_for_server_spans(r: &Receiver, n: usize) {
    let end = Instant::now() + Duration::from_secs(30);
    while server_spans(r).len() < n && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
}

fn path_of(s: &ReceivedSpan) -> String {
    s.attributes.get("url.path").cloned().unwrap_or_default()
}

/// The collector is down for `outage` while requests keep coming (10/s); it comes back on the
/// same port and every span arrives exactly once. /metrics agrees: nothing dropped, nothing
/// failed, retries happened, nothing pending.
fn outage_loses_nothing(proto: Proto, extra_env: &[(&'static str, &str)], outage: Duration) {
    let mut rx = Receiver::start(proto);
    let app = PythonHttp::start(&[("OTEL_SERVICE_NAME", "shop")]);
    let maddr = format!("127.0.0.1:{}", free_port());
    let mut extra = vec![("OTEL_BSP_SCHEDULE_DELAY", "200")];
    extra.extend_from_slice(extra_env);
    let env = otlp_env(&rx, &extra);
    let agent = Agent::start(&["--pid", &app.proc.pid().to_string(), "--metrics-addr", &maddr], &env_refs(&env));
    let mut sent = Vec::new();
    let mut n = 0;
    let mut send = |sent: &mut Vec<String>| {
        n += 1;
        let p = format!("/users/{n}");
        get(&app, &p, 200);
        sent.push(p);
    };
    for _ in 0..10 {
        send(&mut sent);
    }
    // Everything so far has arrived (and was printed) before the collector goes away.
    assert_eq!(exactly_n_server_spans(&rx, 10, Duration::from_secs(20)).len(), 10);
    rx.stop();
    let down = Instant::now();
    while down.elapsed() < outage {
        send(&mut sent);
        std::thread::sleep(Duration::from_millis(100));
    }
    let during = sent.len() - 10;
    // The agent noticed and holds the spans.
    let (_, body) = http_get(&maddr, "/metrics");
    assert!(metric(&body, "waybill_export_pending_spans") > 0, "{body}");
    rx.restart();
    for _ in 0..10 {
        send(&mut sent);
    }
    let total = sent.len();
    let spans = exactly_n_server_spans(&rx, total, Duration::from_secs(60));
    let (_, body) = http_get(&maddr, "/metrics");
    let out = agent.stop();
    let got: Vec<String> = spans.iter().map(path_of).collect();
    let unique: BTreeSet<&String> = got.iter().collect();
    assert_eq!(got.len(), total, "{during} requests during the outage; stderr:\n{}", out.stderr);
    assert_eq!(unique.len(), total, "duplicates");
    assert_eq!(unique, sent.iter().collect::<BTreeSet<_>>());
    assert!(spans.iter().all(|s| s.resource["service.name"] == "shop"));
    assert_eq!(metric(&body, "waybill_spans_created_total"), total as u64);
    assert_eq!(metric(&body, "waybill_spans_exported_total"), total as u64);
    assert_eq!(metric(&body, "waybill_spans_dropped_total{reason=\"export_backlog\"}"), 0);
    assert_eq!(metric(&body, "waybill_spans_dropped_total{reason=\"queue_full\"}"), 0);
    assert_eq!(metric(&body, "waybill_export_errors_total"), 0);
    assert_eq!(metric(&body, "waybill_export_pending_spans"), 0);
    assert!(metric(&body, "waybill_export_retries_total") > 0, "{body}");
    assert!(out.stderr.contains("OTLP export failing; retrying"), "{}", out.stderr);
    assert!(out.stderr.contains("OTLP export recovered"), "{}", out.stderr);
}

#[test]
fn collector_outage_of_15s_loses_no_span_over_grpc() {
    if !require_root() {
        return;
    }
    outage_loses_nothing(Proto::Grpc, &[], Duration::from_secs(15));
}

#[test]
fn collector_outage_of_15s_loses_no_span_over_http_protobuf_gzip() {
    if !require_root() {
        return;
    }
    outage_loses_nothing(Proto::HttpProtobuf, &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")], Duration::from_secs(15));
}

/// Past the export backlog bound the oldest spans are dropped, and counted exactly: one span in
/// the request being retried (batch size 1, one request at a time), the newest 10 in the backlog,
/// the rest dropped.
#[test]
fn backlog_overflow_drops_oldest_and_counts_exactly() {
    if !require_root() {
        return;
    }
    let mut rx = Receiver::start(Proto::Grpc);
    let app = PythonHttp::start(&[("OTEL_SERVICE_NAME", "shop")]);
    let maddr = format!("127.0.0.1:{}", free_port());
    let env = otlp_env(&rx, &[("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")]);
    let agent = Agent::start(
        &[
            "--pid",
            &app.proc.pid().to_string(),
            "--metrics-addr",
            &maddr,
            "--export-backlog",
            "10",
            "--export-concurrency",
            "1",
        ],
        &env_refs(&env),
    );
    rx.stop();
    for n in 1..=50 {
        get(&app, &format!("/users/{n}"), 200);
    }
    // All 50 spans reached the exporter.
    let end = Instant::now() + Duration::from_secs(10);
    let dropped = "waybill_spans_dropped_total{reason=\"export_backlog\"}";
    while metric(&http_get(&maddr, "/metrics").1, dropped) < 39 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, body) = http_get(&maddr, "/metrics");
    assert_eq!(metric(&body, dropped), 39, "{body}");
    assert_eq!(metric(&body, "waybill_export_pending_spans"), 11);
    rx.restart();
    let spans = exactly_n_server_spans(&rx, 11, Duration::from_secs(30));
    let (_, body) = http_get(&maddr, "/metrics");
    let _ = agent.stop();
    let mut got: Vec<u32> = spans.iter().map(|s| path_of(s)["/users/".len()..].parse().unwrap()).collect();
    got.sort();
    assert_eq!(got, [1].into_iter().chain(41..=50).collect::<Vec<u32>>());
    assert_eq!(metric(&body, "waybill_spans_exported_total"), 11);
    assert_eq!(metric(&body, dropped), 39);
    assert_eq!(metric(&body, "waybill_export_errors_total"), 0);
    assert_eq!(metric(&body, "waybill_export_pending_spans"), 0);
}

/// A backlog three times the span queue, built while the agent is stopped (SIGSTOP) and worked
/// through in one go when it resumes: the event loop drains it in slices and the exporter, on the
/// same thread, takes each slice's spans before the next, so none is dropped at the queue and
/// every one reaches the collector.
#[test]
fn backlog_larger_than_the_span_queue_is_exported_whole() {
    if !require_root() {
        return;
    }
    const REQUESTS: usize = 3000;
    let rx = Receiver::start(Proto::Grpc);
    let nginx = Nginx::start();
    let maddr = format!("127.0.0.1:{}", free_port());
    let env = otlp_env(&rx, &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);
    let agent = Agent::start(
        &["--pid", &nginx.proc.pid().to_string(), "--metrics-addr", &maddr, "--span-queue", "1000"],
        &env_refs(&env),
    );
    agent.pause();
    let ok = keepalive_gets(nginx.port, REQUESTS);
    agent.resume();
    assert!(ok, "the load script failed");
    wait_for_server_spans(&rx, REQUESTS);
    let (_, body) = http_get(&maddr, "/metrics");
    let out = agent.stop();
    assert_eq!(metric(&body, "waybill_ringbuf_records_lost_total{reason=\"buffer_full\"}"), 0, "{body}");
    assert_eq!(metric(&body, "waybill_spans_dropped_total{reason=\"queue_full\"}"), 0, "{body}\n{}", out.stderr);
    assert_eq!(metric(&body, "waybill_spans_exported_total"), REQUESTS as u64, "{body}");
    assert_eq!(server_spans(&rx).len(), REQUESTS);
}

/// A CA and a server certificate it signed for localhost / 127.0.0.1: (dir guard, CA, cert, key).
fn ca_and_server_cert() -> (TempDir, String, String, String) {
    let dir = TempDir::new("otlp-tls");
    let p = |f: &str| dir.path().join(f).display().to_string();
    let (ca_key, ca, key, csr, cert, ext) =
        (p("ca.key"), p("ca.pem"), p("key.pem"), p("srv.csr"), p("cert.pem"), p("ext"));
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let req = ["req", "-newkey", "rsa:2048", "-nodes", "-days", "2"];
    sh("openssl", &[&req[..], &["-x509", "-subj", "/CN=waybill test CA", "-keyout", &ca_key, "-out", &ca]].concat());
    sh("openssl", &[&req[..], &["-subj", "/CN=localhost", "-keyout", &key, "-out", &csr]].concat());
    sh(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    );
    (dir, ca, cert, key)
}

/// OTLP/gRPC over TLS (`https://` endpoint, `OTEL_EXPORTER_OTLP_CERTIFICATE`): a TLS terminator
/// (Python `ssl`, ALPN h2) in front of the collector. 2000 spans in batches of 512 (~300 KiB,
/// many HTTP/2 frames and flow-control windows per request through the agent's coalescing
/// connection) all arrive, nothing fails.
#[test]
fn spans_reach_a_collector_over_grpc_with_tls() {
    if !require_root() {
        return;
    }
    const REQUESTS: usize = 2000;
    let (_certs, ca, cert, key) = ca_and_server_cert();
    let rx = Receiver::start(Proto::Grpc);
    let tls_port = free_port();
    let upstream = rx.grpc_endpoint().rsplit(':').next().unwrap().to_string();
    let script = repo_root().join("tests/apps/tls_terminator.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .args([&tls_port.to_string(), &cert, &key, &upstream])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut ready).unwrap();
    let _terminator = Proc { child, name: "TLS terminator".into() };
    assert_eq!(ready.trim(), "ready");
    let nginx = Nginx::start();
    let maddr = format!("127.0.0.1:{}", free_port());
    let endpoint = format!("https://localhost:{tls_port}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let agent = Agent::start(&["--pid", &nginx.proc.pid().to_string(), "--metrics-addr", &maddr], &env);
    assert!(keepalive_gets(nginx.port, REQUESTS), "the load script failed");
    wait_for_server_spans(&rx, REQUESTS);
    let (_, body) = http_get(&maddr, "/metrics");
    let out = agent.stop();
    assert_eq!(metric(&body, "waybill_spans_exported_total"), REQUESTS as u64, "{body}\n{}", out.stderr);
    assert_eq!(server_spans(&rx).len(), REQUESTS, "{}", out.stderr);
    assert!(!out.stderr.contains("export failing"), "{}", out.stderr);
}

fn latest_points(points: &[ReceivedPoint], metric: &str) -> BTreeMap<String, ReceivedPoint> {
    // Cumulative: the last point of each series is its total.
    let mut out = BTreeMap::new();
    for p in points.iter().filter(|p| p.metric == metric) {
        out.insert(format!("{:?}", p.attributes), p.clone());
    }
    out
}

/// RED metrics over OTLP (http/protobuf + gzip and gRPC) with the process's resource, exact counts
/// per route template and status, semantic-convention buckets; the same histograms on /metrics;
/// /healthz; the spans carry the rich per-process resource.
fn red_metrics_and_resources(proto: Proto, extra_env: &[(&'static str, &str)]) {
    let rx = Receiver::start_with_metrics(proto);
    let app =
        PythonHttp::start(&[("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test,service.version=1.2")]);
    let maddr = format!("127.0.0.1:{}", free_port());
    // The agent's own OTEL_RESOURCE_ATTRIBUTES are defaults for every process; the process's win.
    let mut extra = vec![
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_RESOURCE_ATTRIBUTES", "k8s.cluster.name=c1,deployment.environment.name=agent-default"),
    ];
    extra.extend_from_slice(extra_env);
    let env = otlp_env(&rx, &extra);
    let agent = Agent::start(&["--pid", &app.proc.pid().to_string(), "--metrics-addr", &maddr], &env_refs(&env));
    assert_eq!(http_get(&maddr, "/healthz"), (200, "ok\n".to_string()));
    for p in ["/users/1", "/users/22", "/users/333"] {
        get(&app, p, 200);
    }
    get(&app, "/missing", 404);
    get(&app, "/fail", 500);
    get(&app, "/fail", 500);
    let spans = exactly_n_server_spans(&rx, 6, Duration::from_secs(20));
    assert_eq!(spans.len(), 6);
    // Wait for an export interval that carries all 6.
    let end = Instant::now() + Duration::from_secs(15);
    let total = |rx: &Receiver| -> u64 {
        latest_points(&rx.metric_points(), "http.server.request.duration").values().map(|p| p.count).sum()
    };
    while total(&rx) < 6 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, prom) = http_get(&maddr, "/metrics");
    let out = agent.stop();
    assert_eq!(code, 200);

    let pid = app.proc.pid().to_string();
    let script = repo_root().join("tests/apps/http_server.py");
    // argv[0] as the process has it (python3, or the interpreter a pyenv shim exec'd).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap()).into_owned();
    // The resource of the spans: service.name from the script name, the process's own attributes.
    let r = &spans[0].resource;
    let expect = [
        ("service.name", "http_server".to_string()),
        ("service.version", "1.2".to_string()),
        ("deployment.environment.name", "test".to_string()),
        ("k8s.cluster.name", "c1".to_string()),
        ("process.pid", pid.clone()),
        ("process.command_line", format!("{argv0} {} {}", script.display(), app.port)),
        ("process.runtime.name", "cpython".to_string()),
        ("host.arch", "amd64".to_string()),
        ("os.type", "linux".to_string()),
        ("telemetry.distro.name", "waybill".to_string()),
    ];
    for (k, v) in &expect {
        assert_eq!(r.get(*k), Some(v), "{k} in {r:#?}");
    }
    assert!(r["process.executable.name"].starts_with("python3"), "{r:#?}");
    assert!(r["service.instance.id"].starts_with(&format!("{}/{pid}/", r["host.name"])), "{r:#?}");
    assert!(!r.contains_key("container.id"), "not in a container: {r:#?}");
    assert!(spans.iter().all(|s| s.resource == *r));

    // OTLP metrics: same resource, exact counts per series, semconv buckets, seconds.
    let points = rx.metric_points();
    let series = latest_points(&points, "http.server.request.duration");
    let key = |route: &str, code: &str, err: Option<&str>| {
        let mut m = BTreeMap::new();
        m.insert("http.request.method".to_string(), "GET".to_string());
        m.insert("http.route".to_string(), route.to_string());
        m.insert("http.response.status_code".to_string(), code.to_string());
        if let Some(e) = err {
            m.insert("error.type".to_string(), e.to_string());
        }
        format!("{m:?}")
    };
    let counts: BTreeMap<String, u64> = series.iter().map(|(k, p)| (k.clone(), p.count)).collect();
    let expected: BTreeMap<String, u64> = [
        (key("/users/{id}", "200", None), 3),
        (key("/missing", "404", None), 1),
        (key("/fail", "500", Some("500")), 2),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, expected, "{points:#?}\nagent stderr:\n{}", out.stderr);
    for p in series.values() {
        assert_eq!(p.unit, "s");
        assert_eq!(p.data_type, "Histogram");
        assert_eq!(p.temporality, "AGGREGATION_TEMPORALITY_CUMULATIVE");
        assert_eq!(p.bounds, vec![0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]);
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count);
        assert!(p.sum > 0.0 && p.sum < p.count as f64 * 2.0, "{p:#?}");
        for (k, v) in &expect {
            assert_eq!(p.resource.get(*k), Some(v), "{k}");
        }
    }
    // Prometheus: the same counts, labelled with the service and the process.
    let base = format!("service_name=\"http_server\",process_pid=\"{pid}\"");
    for (labels, n) in [
        (
            format!(
                "{base},http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/users/{{id}}\""
            ),
            3,
        ),
        (format!("{base},http_request_method=\"GET\",http_response_status_code=\"404\",http_route=\"/missing\""), 1),
        (
            format!(
                "{base},error_type=\"500\",http_request_method=\"GET\",http_response_status_code=\"500\",http_route=\"/fail\""
            ),
            2,
        ),
    ] {
        assert_eq!(metric(&prom, &format!("http_server_request_duration_seconds_count{{{labels}}}")), n);
        assert_eq!(metric(&prom, &format!("http_server_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}}")), n);
    }
    assert_eq!(metric(&prom, "waybill_red_measurements_total"), 6);
    assert_eq!(metric(&prom, "waybill_red_overflow_total"), 0);
    assert!(metric(&prom, "waybill_metric_exports_total{result=\"ok\"}") >= 1);
    assert_eq!(metric(&prom, "waybill_metric_exports_total{result=\"failed\"}"), 0);
}

#[test]
fn red_metrics_and_resources_over_http_protobuf_gzip() {
    if !require_root() {
        return;
    }
    red_metrics_and_resources(Proto::HttpProtobuf, &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]);
}

#[test]
fn red_metrics_and_resources_over_grpc_gzip() {
    if !require_root() {
        return;
    }
    red_metrics_and_resources(Proto::Grpc, &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]);
}

/// A tiny series budget: routes beyond it are folded into one overflow series, counted exactly.
#[test]
fn red_cardinality_budget_overflows_exactly() {
    if !require_root() {
        return;
    }
    let app = PythonHttp::start(&[("OTEL_SERVICE_NAME", "shop")]);
    let maddr = format!("127.0.0.1:{}", free_port());
    let agent =
        Agent::start(&["--pid", &app.proc.pid().to_string(), "--metrics-addr", &maddr, "--red-series-limit", "2"], &[]);
    // Series: /users/{id} 200, /missing 404; then /a, /b, /c (404) overflow.
    get(&app, "/users/1", 200);
    get(&app, "/missing", 404);
    for p in ["/a", "/b", "/c", "/users/2"] {
        get(&app, p, if p.starts_with("/users") { 200 } else { 404 });
    }
    let end = Instant::now() + Duration::from_secs(10);
    while metric(&http_get(&maddr, "/metrics").1, "waybill_red_measurements_total") < 6 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, prom) = http_get(&maddr, "/metrics");
    let _ = agent.stop();
    let pid = app.proc.pid();
    assert_eq!(metric(&prom, "waybill_red_measurements_total"), 6, "{prom}");
    assert_eq!(metric(&prom, "waybill_red_overflow_total"), 3);
    assert_eq!(
        metric(
            &prom,
            &format!(
                "http_server_request_duration_seconds_count{{service_name=\"shop\",process_pid=\"{pid}\",otel_metric_overflow=\"true\"}}"
            )
        ),
        3
    );
    assert_eq!(
        metric(
            &prom,
            &format!(
                "http_server_request_duration_seconds_count{{service_name=\"shop\",process_pid=\"{pid}\",http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/users/{{id}}\"}}"
            )
        ),
        2
    );
}
