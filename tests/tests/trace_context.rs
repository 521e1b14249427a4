//! Trace context across unmodified services on one host: an incoming `traceparent` is joined,
//! the call a thread makes while serving a request is its child, and the callee's server span
//! is the child of that call (matched by the connection's 4-tuple; no header travels).

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use waybill_tests::{
    harness::{Agent, Proc, free_port, repo_root, require_root, sh, wait_port},
    otlp_receiver::{Proto, ReceivedSpan, Receiver, attr},
};

fn spawn(cmd: &str, args: &[String], name: &str) -> Proc {
    let child = Command::new(cmd).args(args).stdout(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    Proc { child, name: name.into() }
}

#[test]
fn header_thread_and_connection_links_form_one_trace_per_request() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let (pa, pb) = (free_port(), free_port());
    let b =
        spawn("node", &[repo_root().join("tests/apps/stock_service.js").display().to_string(), pb.to_string()], "node");
    wait_port(pb, Duration::from_secs(10));
    let a = spawn(
        "python3",
        &[repo_root().join("tests/apps/chain_service.py").display().to_string(), pa.to_string(), pb.to_string()],
        "python",
    );
    wait_port(pa, Duration::from_secs(10));
    let agent = Agent::start(
        &["--pid", &a.pid().to_string(), "--pid", &b.pid().to_string()],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol())],
    );
    const N: usize = 5;
    let mut sent = Vec::new();
    for i in 0..N {
        let trace = format!("4bf92f3577b34da6a3ce929d0e0e{:04x}", 0x4736 + i);
        let parent = format!("00f067aa0ba9{:04x}", i + 1);
        let tp = format!("traceparent: 00-{trace}-{parent}-01");
        sh("curl", &["-sS", "-o", "/dev/null", "-H", &tp, &format!("http://127.0.0.1:{pa}/checkout")]);
        sent.push((trace, parent));
    }
    let spans = rx.wait_for_spans(3 * N, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    let spans = if spans.len() == 3 * N { rx.spans() } else { spans };
    let _ = agent.stop();
    assert_eq!(spans.len(), 3 * N, "{spans:#?}");

    let mut by_trace: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    for s in &spans {
        by_trace.entry(s.trace_id.as_str()).or_default().push(s);
    }
    assert_eq!(by_trace.len(), N, "one trace per request, no span outside them");
    let pid_a = a.pid().to_string();
    let pid_b = b.pid().to_string();
    for (trace, parent) in &sent {
        let t = by_trace.get(trace.as_str()).unwrap_or_else(|| panic!("trace {trace} missing: {spans:#?}"));
        assert_eq!(t.len(), 3);
        let a_server = t.iter().find(|s| s.kind == "Server" && s.resource["process.pid"] == pid_a).expect("A server");
        let a_client = t.iter().find(|s| s.kind == "Client" && s.resource["process.pid"] == pid_a).expect("A client");
        let b_server = t.iter().find(|s| s.kind == "Server" && s.resource["process.pid"] == pid_b).expect("B server");
        assert_eq!(a_server.parent_span_id.as_deref(), Some(parent.as_str()));
        assert_eq!(attr(a_server, "waybill.parent.source"), "header");
        assert_eq!(a_client.parent_span_id.as_deref(), Some(a_server.span_id.as_str()));
        assert_eq!(attr(a_client, "waybill.parent.source"), "thread");
        assert!(!a_client.attributes.contains_key("waybill.parent.uncertain"));
        assert_eq!(attr(a_client, "url.full"), format!("http://127.0.0.1:{pb}/stock/42"));
        assert_eq!(b_server.parent_span_id.as_deref(), Some(a_client.span_id.as_str()));
        assert_eq!(attr(b_server, "waybill.parent.source"), "connection");
        assert_eq!(b_server.name, "GET /stock/{id}");
        // Children sit inside their parents in time.
        assert!(a_server.start_unix_ns <= a_client.start_unix_ns && a_client.end_unix_ns <= a_server.end_unix_ns);
        // (The callee may read before the caller's write() returns: allow 1 ms.)
        assert!(a_client.start_unix_ns <= b_server.start_unix_ns + 1_000_000);
        assert!(b_server.end_unix_ns <= a_client.end_unix_ns + 1_000_000);
    }
}
