//! Root integration tests: real HTTP servers (Python http.server, nginx) driven by real clients
//! (curl, a pipelining socket client), traced by the real agent, received by a real OTLP
//! collector (rotel). Each test asserts the exact set of spans and their attributes.

use std::{process::Command, time::Duration};

use waybill_tests::{
    harness::{Agent, Nginx, PythonHttp, free_port, http_get, metric_value, repo_root, require_root, sh, waybill},
    otlp_receiver::{Proto, ReceivedSpan, Receiver, attr, env_refs, otlp_env},
};

fn server_spans(r: &Receiver, n: usize) -> Vec<ReceivedSpan> {
    let spans = r.wait_for_spans(n, Duration::from_secs(20));
    // Give a straggler time to show up: the count must be exact, not "at least".
    std::thread::sleep(Duration::from_millis(1500));
    let spans = if spans.len() == n { r.spans() } else { spans };
    spans.into_iter().filter(|s| s.kind == "Server").collect()
}

/// N requests on ONE keep-alive connection (curl --next), mixed methods and statuses and a slow
/// one, against an already-running Python service attached by PID; exported over OTLP/gRPC.
#[test]
fn python_keepalive_requests_become_exact_server_spans_over_grpc() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let app = PythonHttp::start(&[("OTEL_SERVICE_NAME", "shop")]);
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &app.proc.pid().to_string()], &env_refs(&env));
    let out = sh(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &app.url("/users/42?page=2"),
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            "-X",
            "POST",
            "-d",
            "item=book&qty=2",
            &app.url("/orders"),
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &app.url("/missing"),
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &app.url("/slow"),
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &app.url("/users/7?token=hunter2&page=1"),
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &app.url("/fail"),
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &app.url("/chunked"),
        ],
    );
    // One TCP connection for all seven requests: only the first one connected.
    assert_eq!(out, "200 1\n201 0\n404 0\n200 0\n200 0\n500 0\n200 0\n", "curl did not reuse its connection");
    let spans = server_spans(&rx, 7);
    let _ = agent.stop();
    assert_eq!(spans.len(), 7, "exactly one SERVER span per request: {spans:#?}");

    let by_path =
        |p: &str| spans.iter().find(|s| attr(s, "url.path") == p).unwrap_or_else(|| panic!("no span for {p}"));
    let get42 = by_path("/users/42");
    assert_eq!(get42.name, "GET /users/{id}");
    assert_eq!(attr(get42, "http.request.method"), "GET");
    assert_eq!(attr(get42, "url.query"), "page=2");
    assert_eq!(attr(get42, "http.response.status_code"), "200");
    assert_eq!(attr(get42, "server.address"), "127.0.0.1");
    assert_eq!(attr(get42, "server.port"), app.port.to_string());
    assert_eq!(attr(get42, "client.address"), "127.0.0.1");
    assert_eq!(attr(get42, "network.protocol.version"), "1.1");
    assert!(attr(get42, "user_agent.original").starts_with("curl/"));
    assert_eq!(get42.status_code, "Unset");
    assert_eq!(get42.parent_span_id, None);
    assert_eq!(attr(get42, "waybill.parent.source"), "none");

    let post = by_path("/orders");
    assert_eq!(post.name, "POST /orders");
    assert_eq!(attr(post, "http.response.status_code"), "201");
    // The semantic conventions' Opt-In attributes only with --opt-in-attributes (the nginx
    // test below turns them on).
    for k in ["client.port", "network.transport", "network.protocol.name", "http.request.body.size"] {
        assert!(!post.attributes.contains_key(k), "{k} set by default: {post:#?}");
    }
    assert_eq!(attr(by_path("/missing"), "http.response.status_code"), "404");
    assert_eq!(by_path("/missing").status_code, "Unset", "4xx is not a server error");
    let fail = by_path("/fail");
    assert_eq!(attr(fail, "http.response.status_code"), "500");
    assert_eq!(fail.status_code, "Error");
    assert_eq!(attr(by_path("/chunked"), "http.response.status_code"), "200");

    let slow = by_path("/slow");
    let ms = (slow.end_unix_ns - slow.start_unix_ns) as f64 / 1e6;
    assert!((300.0..2000.0).contains(&ms), "slow request took {ms} ms");
    for s in &spans {
        let d = (s.end_unix_ns - s.start_unix_ns) as f64 / 1e6;
        assert!(d > 0.0 && d < 2000.0, "{}: implausible duration {d} ms", s.name);
        // All on the same client connection.
        assert_eq!(attr(s, "network.peer.port"), attr(get42, "network.peer.port"));
        assert_eq!(s.resource.get("service.name").map(String::as_str), Some("shop"));
        assert_eq!(s.resource.get("process.pid"), Some(&app.proc.pid().to_string()));
        assert!(s.resource.get("process.executable.name").is_some_and(|n| n.starts_with("python")));
        assert!(s.resource.contains_key("host.name"));
        assert_eq!(s.resource.get("telemetry.sdk.language").map(String::as_str), Some("rust"));
    }
    // Secrets in query strings are redacted before export.
    let q = attr(by_path("/users/7"), "url.query");
    assert!(!q.contains("hunter2") && q.contains("token=") && q.contains("page=1"), "{q}");
    // Distinct traces, each a root.
    let mut ids: Vec<_> = spans.iter().map(|s| s.trace_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7);
}

/// nginx (master + worker, attached by the master's PID after start), pipelined requests in one
/// write plus a keep-alive curl run, a large sendfile() body; exported over OTLP http/protobuf.
#[test]
fn nginx_pipelined_and_keepalive_over_http_protobuf() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::HttpProtobuf);
    let nginx = Nginx::start();
    std::thread::sleep(Duration::from_millis(300)); // the worker is forked
    let mut env = otlp_env(&rx);
    env.push(("WAYBILL_OPT_IN_ATTRIBUTES", "true".into()));
    let agent = Agent::start(&["--pid", &nginx.proc.pid().to_string()], &env_refs(&env));
    let codes = sh(
        "python3",
        &[
            repo_root().join("tests/apps/pipeline_client.py").to_str().unwrap(),
            &nginx.port.to_string(),
            "/index.html",
            "/nope",
            "/api/items.json",
        ],
    );
    assert_eq!(codes.trim(), "200 404 200");
    let out = sh(
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
            &nginx.url("/teapot"),
            "--next",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
            &nginx.url("/big.bin"),
            "--next",
            "-sS",
            "-I",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
            &nginx.url("/index.html"),
        ],
    );
    assert_eq!(out, "418\n200\n200\n");
    let spans = server_spans(&rx, 6);
    let _ = agent.stop();
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let pipelined: Vec<_> = spans
        .iter()
        .filter(|s| s.attributes.get("server.address").map(String::as_str) == Some("pipelined.test"))
        .collect();
    assert_eq!(pipelined.len(), 3);
    let statuses: Vec<_> =
        pipelined.iter().map(|s| (attr(s, "url.path"), attr(s, "http.response.status_code"))).collect();
    assert!(statuses.contains(&("/index.html", "200")));
    assert!(statuses.contains(&("/nope", "404")));
    assert!(statuses.contains(&("/api/items.json", "200")));
    let big = spans.iter().find(|s| attr(s, "url.path") == "/big.bin").unwrap();
    // Opt-In attributes, asked for through WAYBILL_OPT_IN_ATTRIBUTES.
    assert_eq!(attr(big, "http.response.body.size"), "200000");
    assert_eq!(attr(big, "network.transport"), "tcp");
    assert_eq!(attr(big, "network.protocol.name"), "http");
    assert_eq!(attr(big, "client.port"), attr(big, "network.peer.port"));
    let head = spans.iter().find(|s| attr(s, "http.request.method") == "HEAD").expect("HEAD span");
    assert_eq!(attr(head, "http.response.status_code"), "200");
    let teapot = spans.iter().find(|s| attr(s, "url.path") == "/teapot").unwrap();
    assert_eq!(attr(teapot, "http.response.status_code"), "418");
    for s in &spans {
        // The worker process serves; the resource names nginx.
        assert_eq!(s.resource.get("service.name").map(String::as_str), Some("nginx"));
        assert_ne!(s.resource.get("process.pid"), Some(&nginx.proc.pid().to_string()), "the master does not serve");
    }
}

/// Without an OTLP endpoint the agent prints one waterfall per trace.
#[test]
fn terminal_view_shows_each_request() {
    if !require_root() {
        return;
    }
    let app = PythonHttp::start(&[]);
    let agent = Agent::start(&["--pid", &app.proc.pid().to_string()], &[]);
    sh(
        "curl",
        &["-sS", "-o", "/dev/null", &app.url("/users/99"), "--next", "-sS", "-o", "/dev/null", &app.url("/missing")],
    );
    std::thread::sleep(Duration::from_secs(2));
    let out = agent.stop();
    let traces: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("Trace ")).collect();
    assert_eq!(traces.len(), 2, "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(traces[0].contains("GET /users/{id}") && traces[0].contains("200"), "{}", traces[0]);
    assert!(traces[1].contains("GET /missing") && traces[1].contains("404"), "{}", traces[1]);
    assert!(traces.iter().all(|l| l.contains(&format!("(pid {})", app.proc.pid()))));
}

/// `--port` picks up a server that starts after the agent; /metrics and /healthz answer.
#[test]
fn port_selection_picks_up_later_process_and_metrics_count_it() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let port = free_port();
    let maddr = format!("127.0.0.1:{}", free_port());
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--port", &port.to_string(), "--metrics-addr", &maddr], &env_refs(&env));
    assert_eq!(http_get(&maddr, "/healthz").0, 200);
    let app = PythonHttp::start_on(port, &[]);
    for p in ["/users/1", "/users/2", "/users/3"] {
        sh("curl", &["-sS", "-o", "/dev/null", &app.url(p)]);
    }
    let spans = server_spans(&rx, 3);
    assert_eq!(spans.len(), 3, "{spans:#?}\n{}", agent.stderr());
    assert!(spans.iter().all(|s| s.resource.get("process.pid") == Some(&app.proc.pid().to_string())));
    let (code, body) = http_get(&maddr, "/metrics");
    assert_eq!(code, 200);
    let metric = |name: &str| metric_value(&body, name);
    assert_eq!(metric("waybill_spans_created_total"), 3);
    assert_eq!(metric("waybill_spans_exported_total"), 3);
    assert_eq!(metric("waybill_processes_attached"), 1);
    assert_eq!(metric("waybill_ringbuf_records_lost_total{reason=\"buffer_full\"}"), 0);
    assert!(metric("waybill_ringbuf_records_received_total") >= 9);
    let _ = agent.stop();
}

/// `--port` finds a server in another network namespace (a container's, a Kubernetes pod's) that
/// was listening before the agent started, and traces requests on a keep-alive connection it
/// accepted before then. No listen or accept after the start tells the kernel side about that
/// server: only the start-up scan of every namespace's listeners finds it.
#[test]
fn port_selection_finds_a_server_in_another_network_namespace() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let port = free_port().to_string();
    let server = repo_root().join("tests/apps/http_server.py");
    // A namespace of its own with its loopback up; `exec` keeps the child's PID the server's.
    let script = format!("ip link set lo up && exec python3 {} {port}", server.display());
    let server = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .stdout(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) and ip (iproute2) must be installed (cargo xtask setup)");
    let server = waybill_tests::harness::Proc { child: server, name: "python http.server in a netns".into() };
    let spid = server.pid().to_string();
    // The child enters its namespace only once `unshare` runs: wait for that before `nsenter`.
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    let t = std::time::Instant::now();
    while netns(&spid) == netns("self") && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_ne!(netns(&spid), netns("self"), "the server never entered a network namespace of its own");
    // A client in the same namespace: one keep-alive connection, a GET per path read on stdin.
    let client_py = "import http.client,sys,time\n\
        for _ in range(100):\n\
        \ttry:\n\t\tc=http.client.HTTPConnection('127.0.0.1',int(sys.argv[1]));c.connect();break\n\
        \texcept OSError:\n\t\ttime.sleep(0.1)\n\
        for p in sys.stdin:\n\
        \tc.request('GET',p.strip());r=c.getresponse();r.read();print(r.status,flush=True)\n";
    let mut client = Command::new("nsenter")
        .args(["-t", &spid, "-n", "python3", "-c", client_py, &port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("nsenter");
    let mut to_client = client.stdin.take().unwrap();
    let mut from_client = BufReader::new(client.stdout.take().unwrap());
    let mut get = |path: &str| {
        writeln!(to_client, "{path}").unwrap();
        let mut status = String::new();
        from_client.read_line(&mut status).unwrap();
        status.trim().to_string()
    };
    assert_eq!(get("/users/0"), "200", "the request before the agent started");
    // Not visible from the agent's namespace.
    assert!(!sh("ss", &["-Hltn"]).contains(&format!(":{port} ")));

    let env = otlp_env(&rx);
    let agent = Agent::start(&["--port", &port], &env_refs(&env));
    assert_eq!(get("/users/1"), "200");
    assert_eq!(get("/users/2"), "200");
    let spans = server_spans(&rx, 2);
    let paths: Vec<&str> = spans.iter().map(|s| attr(s, "url.path")).collect();
    assert_eq!(paths, ["/users/1", "/users/2"], "{spans:#?}\n{}", agent.stderr());
    assert!(spans.iter().all(|s| s.resource.get("process.pid") == Some(&spid)));
    drop(to_client);
    let _ = client.wait();
    let _ = agent.stop();
}

/// With no traffic the agent's event loop goes to sleep (no drain timer: it asks the kernel side
/// to wake it with the next record), and the first request wakes it: the span arrives, drained on
/// the kernel's wake-up, not on the timer.
#[test]
fn an_idle_agent_sleeps_and_the_first_request_wakes_it() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let nginx = Nginx::start();
    std::thread::sleep(Duration::from_millis(300)); // the worker is forked
    let maddr = format!("127.0.0.1:{}", free_port());
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &nginx.proc.pid().to_string(), "--metrics-addr", &maddr], &env_refs(&env));
    let metrics = || http_get(&maddr, "/metrics").1;
    let asleep = || metric_value(&metrics(), "waybill_event_loop_asleep") == 1;
    let t = std::time::Instant::now();
    while !asleep() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(asleep(), "the idle event loop never went to sleep:\n{}", metrics());
    let before = metrics();
    let drains =
        |body: &str, trigger: &str| metric_value(body, &format!("waybill_ring_drains_total{{trigger=\"{trigger}\"}}"));
    std::thread::sleep(Duration::from_millis(1500));
    let idle = metrics();
    assert_eq!(drains(&idle, "timer"), drains(&before, "timer"), "timer drains while asleep:\n{idle}");
    assert_eq!(metric_value(&idle, "waybill_event_loop_asleep"), 1);
    let out = sh("curl", &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &nginx.url("/index.html")]);
    assert_eq!(out, "200");
    let spans = server_spans(&rx, 1);
    assert_eq!(spans.len(), 1, "{spans:#?}\n{}", agent.stderr());
    assert_eq!(attr(&spans[0], "url.path"), "/index.html");
    let after = metrics();
    assert!(
        drains(&after, "wakeup") > drains(&idle, "wakeup"),
        "the first record after sleep did not wake the agent:\n{after}"
    );
    assert_eq!(metric_value(&after, "waybill_ringbuf_records_lost_total{reason=\"buffer_full\"}"), 0);
    let _ = agent.stop();
}

/// Bad input gets one clear line and a non-zero exit code.
#[test]
fn bad_input_is_refused_clearly() {
    if !require_root() {
        return;
    }
    let out = waybill(&["run", "--pid", "999999999"], &[]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("no process with PID 999999999"), "{}", out.stderr);
    let out = waybill(&["run"], &[]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("nothing to trace"), "{}", out.stderr);
    let me = std::process::id().to_string();
    let out = waybill(
        &["run", "--pid", &me],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")],
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{}", out.stderr);
    // Without privileges (nobody, no capabilities).
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(waybill_tests::harness::waybill_bin())
        .args(["run", "--pid", &me])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!nobody.status.success());
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert!(err.contains("not enough privileges") && err.contains("root"), "{err}");
}

/// `waybill check` on this kernel: kprobes absent, fentry refused, tracepoints in use.
#[test]
fn check_reports_this_kernel() {
    if !require_root() {
        return;
    }
    let out = waybill(&["check"], &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let line = |name: &str| {
        out.stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name}:\n{}", out.stdout))
            .to_string()
    };
    assert!(line("tracepoints").contains(" yes "), "{}", out.stdout);
    assert!(line("BTF").contains(" yes "));
    let kprobes_here = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    assert_eq!(line("kprobes").contains(" yes "), kprobes_here);
    assert!(line("accelerators").contains("tracepoints"), "{}", out.stdout);
    assert!(line("socket data").contains("raw tracepoint sys_exit"), "{}", out.stdout);
    assert!(line("mmapable array map").contains(" yes "), "{}", out.stdout);
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let covered = pid_max.div_ceil(4096).clamp(1, 1024) * 4096;
    assert!(line("target filter").contains(&format!("one byte per tgid below {covered} ")), "{}", out.stdout);
    if !kprobes_here {
        assert!(line("accelerators").contains("fallback to syscall tracepoints"), "{}", out.stdout);
    }
}

/// The benchmark's hook floor (`waybill floor`): each hook type attaches exactly one program, it
/// is gone once the helper is interrupted, and a uprobe without a process is refused clearly.
#[test]
fn floor_helper_attaches_one_empty_program_and_detaches() {
    if !require_root() {
        return;
    }
    use std::io::{BufRead, BufReader};
    let bpf_progs = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("bpf-prog")))
                    .count()
            })
            .unwrap_or(0)
    };
    let mut target = Command::new("sleep").arg("60").spawn().expect("sleep");
    for hook in ["raw-sys-exit", "syscall-tracepoint", "uprobe"] {
        let mut child = Command::new(waybill_tests::harness::waybill_bin())
            .args(["floor", "--hook", hook, "--pid", &target.id().to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("waybill floor");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("a line");
        assert!(line.starts_with("attached"), "{hook}: {line:?}");
        assert_eq!(bpf_progs(child.id()), 1, "{hook}: one program loaded");
        sh("kill", &["-INT", &child.id().to_string()]);
        let out = child.wait_with_output().expect("exit");
        assert!(out.status.success(), "{hook}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = target.kill();
    let _ = target.wait();
    let out = waybill(&["floor", "--hook", "uprobe"], &[]);
    assert!(!out.status.success());
    assert!(out.stderr.contains("needs --pid"), "{}", out.stderr);
}
