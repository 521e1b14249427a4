//! `traceparent` injection across hosts (sock_ops + sk_msg): two network namespaces joined by a
//! veth pair stand for two hosts. The agent traces only the upstream service in namespace A; the
//! downstream in namespace B is an unmodified, untraced Python http.server that records the
//! headers it received. What B received must be exactly what the exported spans say.

use std::{collections::HashMap, time::Duration};

use serde_json::Value;
use waybill_tests::{
    harness::{Agent, NetnsPair, TempDir, free_port, repo_root, require_root},
    otlp_receiver::{Proto, ReceivedSpan, Receiver},
};

const OWN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn sha256_hex(path_body: &[u8]) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(path_body)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The body inject_upstream.py posts (kept in sync with it).
fn upstream_body() -> Vec<u8> {
    let mut b = b"GET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    for _ in 0..4 {
        b.extend(0u8..=255);
    }
    b
}

fn traceparents(rec: &Value) -> Vec<String> {
    rec["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case("traceparent"))
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

fn attr<'a>(s: &'a ReceivedSpan, k: &str) -> Option<&'a str> {
    s.attributes.get(k).map(String::as_str)
}

#[test]
fn injected_traceparent_reaches_an_untraced_downstream_with_the_exported_ids() {
    if !require_root() {
        return;
    }
    let net = NetnsPair::new();
    let dir = TempDir::new("inject");
    let log = dir.path().join("down.jsonl");
    let rx = Receiver::start(Proto::Grpc);
    let (pa, pb) = (free_port(), free_port());
    let app = |f: &str| repo_root().join("tests/apps").join(f).display().to_string();
    let down = net.spawn(
        &net.b,
        "python3",
        &[&app("header_echo.py"), &net.addr_b, &pb.to_string(), log.to_str().unwrap()],
        "downstream",
    );
    net.wait_port(&net.b, &net.addr_b, pb, Duration::from_secs(10));
    let up = net.spawn(
        &net.a,
        "python3",
        &[&app("inject_upstream.py"), &net.addr_a, &pa.to_string(), &net.addr_b, &pb.to_string()],
        "upstream",
    );
    net.wait_port(&net.a, &net.addr_a, pa, Duration::from_secs(10));
    let agent = Agent::start(
        &["--pid", &up.pid().to_string(), "--metrics-addr", &format!("127.0.0.1:{}", free_port())],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol())],
    );
    assert!(agent.stderr().contains("traceparent injection on"), "injection not active:\n{}", agent.stderr());

    // Half the requests come with a caller's traceparent (the server span joins it), half
    // without (the kernel starts the trace).
    const N: usize = 6;
    let mut callers: Vec<Option<(String, String)>> = Vec::new();
    for i in 0..N {
        let url = format!("http://{}:{pa}/call?i={i}", net.addr_a);
        if i % 2 == 0 {
            let (t, p) = (format!("5bf92f3577b34da6a3ce929d0e0e{:04x}", i), format!("10f067aa0ba9{:04x}", i + 1));
            let h = format!("traceparent: 00-{t}-{p}-01");
            let out = net.run(&net.a, "curl", &["-sS", "--fail", "-H", &h, &url]);
            assert_eq!(out, "ok\n");
            callers.push(Some((t, p)));
        } else {
            let out = net.run(&net.a, "curl", &["-sS", "--fail", &url]);
            assert_eq!(out, "ok\n");
            callers.push(None);
        }
    }
    let want = N * 4;
    let spans = rx.wait_for_spans(want, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let spans = if spans.len() >= want { rx.spans() } else { spans };
    let out = agent.stop();
    drop(down);
    let metrics_note = out.stderr.lines().filter(|l| l.contains("inject")).collect::<Vec<_>>().join("\n");
    assert_eq!(spans.len(), want, "{metrics_note}\n{spans:#?}");

    // What the downstream received, in order: per /call: get, post, own.
    let recs: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 3 * N);

    let by_id: HashMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let servers: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == "Server").collect();
    assert_eq!(servers.len(), N);
    let body_sha = sha256_hex(&upstream_body());
    let mut traces = std::collections::HashSet::new();
    for (i, chunk) in recs.chunks(3).enumerate() {
        let (get, post, own) = (&chunk[0], &chunk[1], &chunk[2]);
        assert!(get["requestline"].as_str().unwrap().starts_with("GET /down/get "));
        assert!(post["requestline"].as_str().unwrap().starts_with("POST /down/post "));
        assert!(own["requestline"].as_str().unwrap().starts_with("GET /down/own "));
        // Body byte-identical.
        assert_eq!(post["body_len"].as_u64().unwrap() as usize, upstream_body().len());
        assert_eq!(post["body_sha256"].as_str().unwrap(), body_sha);
        // Never a second header where the app sent its own.
        assert_eq!(traceparents(own), vec![OWN.to_string()], "double injection: {own}");
        let mut trace_of_call = None;
        for rec in [get, post] {
            let tps = traceparents(rec);
            assert_eq!(tps.len(), 1, "exactly one injected traceparent: {rec}");
            let parts: Vec<&str> = tps[0].split('-').collect();
            assert_eq!((parts[0], parts[3]), ("00", "01"), "{}", tps[0]);
            let (trace, parent) = (parts[1], parts[2]);
            // The injected parent id is the exported CLIENT span's id …
            let client =
                by_id.get(parent).unwrap_or_else(|| panic!("no exported span {parent} (call {i}): {spans:#?}"));
            assert_eq!(client.kind, "Client");
            assert_eq!(client.trace_id, trace);
            assert_eq!(attr(client, "waybill.traceparent.injected"), Some("true"));
            let path = rec["requestline"].as_str().unwrap().split(' ').nth(1).unwrap();
            assert!(attr(client, "url.full").unwrap().ends_with(path), "{client:?}");
            // … whose parent is the upstream's SERVER span, in the upstream request's trace.
            let server = by_id.get(client.parent_span_id.as_deref().unwrap()).expect("client's parent exported");
            assert_eq!(server.kind, "Server");
            assert_eq!(server.trace_id, trace);
            assert_eq!(attr(client, "waybill.parent.source"), Some("thread"));
            match &callers[i] {
                Some((t, p)) => {
                    assert_eq!(trace, t, "the caller's trace");
                    assert_eq!(server.parent_span_id.as_deref(), Some(p.as_str()));
                    assert_eq!(attr(server, "waybill.parent.source"), Some("header"));
                }
                None => {
                    assert_eq!(server.parent_span_id, None, "kernel-started trace has a root server span");
                    assert_eq!(attr(server, "waybill.parent.source"), Some("none"));
                }
            }
            assert!(trace_of_call.is_none_or(|t| t == trace), "one trace per request");
            trace_of_call = Some(trace.to_string());
        }
        let trace = trace_of_call.unwrap();
        // The call that carried its own traceparent: a CLIENT span in the same trace, not injected.
        let own_client = spans
            .iter()
            .find(|s| {
                s.kind == "Client"
                    && s.trace_id == trace
                    && attr(s, "url.full").is_some_and(|u| u.ends_with("/down/own"))
            })
            .unwrap_or_else(|| panic!("own-header client span of call {i}"));
        assert_eq!(attr(own_client, "waybill.traceparent.injected"), None);
        assert!(traces.insert(trace.clone()), "each request its own trace");
    }
    // Zero spans outside the requests' traces.
    for s in &spans {
        assert!(traces.contains(&s.trace_id), "stray span {s:?}");
    }
}
