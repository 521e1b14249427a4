//! `--config waybill.yaml` end to end (targets, settings, per-service sampling, precedence of flags
//! over the file, errors that name the key and line), and exact ring-buffer loss accounting with
//! a deliberately tiny buffer.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use waybill_tests::{
    harness::{
        Agent, Proc, PythonHttp, TempDir, free_port, http_get, metric_value, repo_root, require_root, wait_port,
        waybill,
    },
    otlp_receiver::{Proto, Receiver},
};

#[test]
fn bad_config_files_are_refused_with_the_key_and_line() {
    let dir = TempDir::new("cfg");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "targets:\n  pids: [1]\nmetrcs_addr: 127.0.0.1:1\n").unwrap();
    let out = waybill(&["run", "--config", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains(bad.to_str().unwrap())
            && out.stderr.contains("unknown field `metrcs_addr`")
            && out.stderr.contains("line 3"),
        "{}",
        out.stderr
    );
    std::fs::write(&bad, "targets: { pids: [1] }\nservices:\n  - match: { exe: x }\n    sampling_ratio: 2\n").unwrap();
    let out = waybill(&["run", "--config", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("`sampling_ratio`") && out.stderr.contains("line 4"), "{}", out.stderr);
    let out = waybill(&["run", "--config", "/nonexistent/waybill.yaml"], &[]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("cannot read the config file /nonexistent/waybill.yaml"), "{}", out.stderr);
}

/// Two services selected by the file; the file samples one of them out entirely (its requests
/// still count in the RED metrics); a flag overrides the file's metrics address.
#[test]
fn config_file_selects_samples_and_yields_to_flags() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let shop = PythonHttp::start(&[("OTEL_SERVICE_NAME", "shop")]);
    let cart = PythonHttp::start(&[("OTEL_SERVICE_NAME", "cart")]);
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("waybill.yaml");
    let file_metrics = format!("127.0.0.1:{}", free_port());
    let flag_metrics = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &cfg,
        format!(
            "targets:\n  pids: [{}, {}]\nmetrics_addr: {file_metrics}\nservices:\n  - match: {{ service_name: shop }}\n    sampling_ratio: 0.0\n",
            shop.proc.pid(),
            cart.proc.pid()
        ),
    )
    .unwrap();
    let agent = Agent::start(
        &["--config", cfg.to_str().unwrap(), "--metrics-addr", &flag_metrics],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol())],
    );
    for app in [&shop, &cart] {
        for n in 0..3 {
            let (code, _) = http_get(&format!("127.0.0.1:{}", app.port), &format!("/users/{n}"));
            assert_eq!(code, 200);
        }
    }
    let spans = rx.wait_for_spans(3, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let spans = if spans.len() == 3 { rx.spans() } else { spans };
    let (_, prom) = http_get(&flag_metrics, "/metrics");
    assert!(std::net::TcpStream::connect(&file_metrics).is_err(), "the flag must win over the file's metrics_addr");
    let out = agent.stop();
    assert_eq!(spans.len(), 3, "{spans:#?}\n{}", out.stderr);
    assert!(spans.iter().all(|s| s.resource["service.name"] == "cart"), "{spans:#?}");
    assert_eq!(metric_value(&prom, "waybill_red_measurements_total"), 6, "{prom}");
    assert_eq!(metric_value(&prom, "waybill_spans_sampled_out_total"), 3, "{prom}");
    assert_eq!(metric_value(&prom, "waybill_processes_attached"), 2, "{prom}");
}

/// A 4 KiB ring buffer and a burst of writes: records are lost, and every one is counted, so
/// received + lost equals exactly what the kernel side produced (one record per write, one for
/// the connection's tuple, one for its close).
#[test]
fn ring_buffer_overflow_is_counted_exactly() {
    if !require_root() {
        return;
    }
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    // Drain whatever the writer sends.
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = sink.accept() {
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
    });
    const WRITES: u64 = 3000;
    let script = format!(
        "import socket, sys\n\
         s = socket.create_connection(('127.0.0.1', {sink_port}))\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         payload = b'x' * 600\n\
         for _ in range({WRITES}):\n    s.send(payload)\n\
         s.close()\n\
         print('done', flush=True)\n\
         sys.stdin.readline()\n"
    );
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let writer = Proc { child, name: "burst writer".into() };
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let maddr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start(
        &["--pid", &writer.pid().to_string(), "--metrics-addr", &maddr, "--ring-buffer-bytes", "4096"],
        &[],
    );
    // Stopped, the agent drains nothing: the 4 KiB buffer must overflow however fast the agent
    // would have kept up (the kernel side still submits and counts).
    agent.pause();
    writeln!(stdin, "go").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "done");
    agent.resume();
    let count = |prom: &str| {
        (
            metric_value(prom, "waybill_ringbuf_records_received_total"),
            metric_value(prom, "waybill_ringbuf_records_lost_total{reason=\"buffer_full\"}"),
        )
    };
    // Lost counters are read from the kernel every two seconds: wait until the sum settles.
    let end = Instant::now() + Duration::from_secs(15);
    let (mut received, mut lost) = count(&http_get(&maddr, "/metrics").1);
    while received + lost < WRITES + 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        (received, lost) = count(&http_get(&maddr, "/metrics").1);
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (_, prom) = http_get(&maddr, "/metrics");
    let out = agent.stop();
    drop(stdin);
    let (received, lost) = count(&prom);
    assert!(lost > 0, "a 4 KiB buffer must overflow under {WRITES} back-to-back writes: {prom}");
    assert!(received > 0);
    assert_eq!(received + lost, WRITES + 2, "received {received} + lost {lost}\n{prom}\n{}", out.stderr);
    for reason in ["too_large", "stash_full"] {
        let name = format!("waybill_ringbuf_records_lost_total{{reason=\"{reason}\"}}");
        if prom.contains(&name) {
            assert_eq!(metric_value(&prom, &name), 0, "{name}");
        }
    }
}

/// `inject: false` for one service: the same unmodified upstream gets its downstream requests
/// injected without the rule, and none with it (counted as `disabled_by_rule`).
#[test]
fn per_service_rule_switches_injection_off() {
    if !require_root() {
        return;
    }
    let app = |f: &str| repo_root().join("tests/apps").join(f).display().to_string();
    for rule in [false, true] {
        let dir = TempDir::new("noinject");
        let log = dir.path().join("down.jsonl");
        let (pu, pd) = (free_port(), free_port());
        let down = Command::new("python3")
            .args([&app("header_echo.py"), "127.0.0.1", &pd.to_string(), log.to_str().unwrap()])
            .spawn()
            .expect("python3");
        let _down = Proc { child: down, name: "header echo".into() };
        wait_port(pd, Duration::from_secs(10));
        let up = Command::new("python3")
            .args([&app("inject_upstream.py"), "127.0.0.1", &pu.to_string(), "127.0.0.1", &pd.to_string()])
            .env("OTEL_SERVICE_NAME", "edge")
            .spawn()
            .expect("python3");
        let up = Proc { child: up, name: "upstream".into() };
        wait_port(pu, Duration::from_secs(10));
        let cfg = dir.path().join("waybill.yaml");
        let rules = if rule { "services:\n  - match: { service_name: edge }\n    inject: false\n" } else { "" };
        std::fs::write(&cfg, format!("targets: {{ pids: [{}] }}\n{rules}", up.pid())).unwrap();
        let maddr = format!("127.0.0.1:{}", free_port());
        let agent = Agent::start(&["--config", cfg.to_str().unwrap(), "--metrics-addr", &maddr], &[]);
        let (code, body) = http_get(&format!("127.0.0.1:{pu}"), "/call");
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        // The kernel's injection counters are read every two seconds: wait until they show.
        let counted = |prom: &str| {
            let v = |r: &str| metric_value(prom, &format!("waybill_traceparent_injections_total{{result=\"{r}\"}}"));
            v("injected") + v("disabled_by_rule") > 0
        };
        let end = Instant::now() + Duration::from_secs(10);
        let (_, mut prom) = http_get(&maddr, "/metrics");
        while !counted(&prom) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
            prom = http_get(&maddr, "/metrics").1;
        }
        let out = agent.stop();
        let recs = std::fs::read_to_string(&log).unwrap();
        let get = recs.lines().next().expect("the downstream got /down/get");
        assert!(get.contains("/down/get"), "{get}");
        let injected = metric_value(&prom, "waybill_traceparent_injections_total{result=\"injected\"}");
        let disabled = metric_value(&prom, "waybill_traceparent_injections_total{result=\"disabled_by_rule\"}");
        if rule {
            assert!(!get.to_ascii_lowercase().contains("traceparent"), "injected despite the rule: {get}");
            assert_eq!(injected, 0, "{prom}");
            assert!(disabled >= 3, "every message of the edge service is refused: {prom}\n{}", out.stderr);
            assert!(out.stderr.contains("traceparent injection off for this process"), "{}", out.stderr);
        } else {
            assert!(get.to_ascii_lowercase().contains("traceparent"), "no header without the rule: {get}");
            assert!(injected >= 1, "{prom}");
            assert_eq!(disabled, 0, "{prom}");
        }
    }
}
