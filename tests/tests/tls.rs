//! Root integration tests for TLS: real HTTPS servers and clients whose plaintext the agent reads
//! with uprobes, attached by PID, exported to a real OTLP collector (rotel). Three TLS stacks:
//! - Python `ssl` (libssl.so, socket BIO) — server, and Python requests as a client (libssl
//!   loaded with dlopen after the agent attached);
//! - Node.js `https` (OpenSSL linked into the `node` executable, memory BIO);
//! - Go `net/http` + `crypto/tls` built from source with Debian's golang-go (probes at the RET
//!   instructions, no uretprobes).
//!
//! Each test asserts one SERVER (or CLIENT) span per request with the decrypted method, path and
//! status, `url.scheme = https`, `tls.protocol.name = tls`, and that the traced program survived.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use waybill_tests::{
    harness::{Agent, Proc, TempDir, free_port, repo_root, require_root, sh, wait_port},
    otlp_receiver::{Proto, ReceivedSpan, Receiver},
};

fn otlp_env(r: &Receiver) -> Vec<(&'static str, String)> {
    vec![("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", r.protocol().to_string())]
}

fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

fn attr<'a>(s: &'a ReceivedSpan, k: &str) -> &'a str {
    s.attributes
        .get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("span {:?} has no {k}: {:?}", s.name, s.attributes))
}

/// Waits for `n` spans, then a little more so that an extra span would show up too.
fn spans_of_kind(r: &Receiver, n: usize, kind: &str) -> Vec<ReceivedSpan> {
    let _ = r.wait_for_spans(n, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    r.spans().into_iter().filter(|s| s.kind == kind).collect()
}

/// A self-signed certificate for 127.0.0.1 / localhost: (dir guard, cert, key).
fn cert() -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new("tls");
    let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            k.to_str().unwrap(),
            "-out",
            c.to_str().unwrap(),
        ],
    );
    (dir, c, k)
}

fn spawn(name: &str, cmd: &mut Command, port: u16) -> Proc {
    let child = cmd.stdout(Stdio::null()).spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let p = Proc { child, name: name.into() };
    wait_port(port, Duration::from_secs(20));
    p
}

/// Requests on ONE keep-alive connection with curl (HTTP/1.1, certificate not verified).
const REQUESTS: &[(&str, &str, &str)] = &[
    ("GET", "/users/42", "200"),
    ("POST", "/orders", "201"),
    ("GET", "/missing", "404"),
    ("GET", "/fail", "500"),
    ("GET", "/slow", "200"),
    ("GET", "/users/7", "200"),
];

fn curl_keepalive(port: u16) {
    let mut args: Vec<String> = Vec::new();
    for (i, (method, path, _)) in REQUESTS.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        args.extend(
            ["-sSk", "--http1.1", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n"]
                .iter()
                .map(|s| s.to_string()),
        );
        if *method == "POST" {
            args.extend(["-X", "POST", "-d", "item=book&qty=2"].iter().map(|s| s.to_string()));
        }
        args.push(format!("https://127.0.0.1:{port}{path}?page=1"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sh("curl", &refs);
    let want: String = REQUESTS
        .iter()
        .enumerate()
        .map(|(i, (_, _, code))| format!("{code} {}\n", if i == 0 { 1 } else { 0 }))
        .collect();
    assert_eq!(out, want, "curl did not get the expected answers on one connection");
}

/// The common assertions for a TLS server under the agent.
fn assert_server_spans(rx: &Receiver, server: &mut Proc, agent: Agent, port: u16) -> String {
    curl_keepalive(port);
    let spans = spans_of_kind(rx, REQUESTS.len(), "Server");
    let out = agent.stop();
    assert_eq!(spans.len(), REQUESTS.len(), "exactly one SERVER span per request: {spans:#?}\n{}", out.stderr);
    for (method, path, code) in REQUESTS {
        let s = spans
            .iter()
            .find(|s| attr(s, "url.path") == *path)
            .unwrap_or_else(|| panic!("no span for {path}: {spans:#?}"));
        assert_eq!(attr(s, "http.request.method"), *method);
        assert_eq!(attr(s, "http.response.status_code"), *code);
        assert_eq!(attr(s, "url.query"), "page=1");
        assert_eq!(attr(s, "url.scheme"), "https");
        assert_eq!(attr(s, "tls.protocol.name"), "tls");
        assert_eq!(attr(s, "server.port"), port.to_string());
        assert_eq!(attr(s, "network.protocol.version"), "1.1");
        assert!(attr(s, "user_agent.original").starts_with("curl/"));
        assert_eq!(s.resource.get("process.pid"), Some(&server.pid().to_string()));
        // All on curl's one connection.
        assert_eq!(attr(s, "client.port"), attr(&spans[0], "client.port"));
    }
    let slow = spans.iter().find(|s| attr(s, "url.path") == "/slow").unwrap();
    let ms = (slow.end_unix_ns - slow.start_unix_ns) as f64 / 1e6;
    assert!((300.0..2000.0).contains(&ms), "slow request took {ms} ms");
    assert_eq!(spans.iter().find(|s| attr(s, "url.path") == "/fail").unwrap().status_code, "Error");
    // The ciphertext seen by the syscall tracepoints produced nothing (no unknown-protocol spans,
    // no second span per request), and the traced program is alive and well.
    assert!(server.child.try_wait().unwrap().is_none(), "{} died under the probes", server.name);
    out.stderr
}

fn probes_line(stderr: &str, pid: u32) -> String {
    stderr
        .lines()
        .find(|l| l.contains("TLS probes attached") && l.contains(&format!("pid={pid} ")))
        .unwrap_or_else(|| panic!("no TLS probes attached for pid {pid}:\n{stderr}"))
        .to_string()
}

/// Python `ssl` HTTPS server (libssl.so from /proc/PID/maps), attached by PID.
#[test]
fn python_ssl_server_spans_are_decrypted() {
    if !require_root() {
        return;
    }
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::Grpc);
    let port = free_port();
    let mut server = spawn(
        "python https",
        Command::new("python3")
            .arg(repo_root().join("tests/apps/tls_https_server.py"))
            .arg(port.to_string())
            .arg(&c)
            .arg(&k)
            .env("OTEL_SERVICE_NAME", "secure-shop"),
        port,
    );
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &server.pid().to_string()], &env_refs(&env));
    let stderr = assert_server_spans(&rx, &mut server, agent, port);
    let line = probes_line(&stderr, server.pid());
    assert!(line.contains("libssl.so"), "{line}");
    assert!(line.contains("SSL_read_ex") && line.contains("SSL_write_ex"), "{line}");
}

/// Node.js `https`: OpenSSL is inside the `node` executable (symbols found with `object`), and
/// Node feeds it through memory BIOs (no socket syscall inside SSL_read).
#[test]
fn node_https_server_with_static_openssl_spans_are_decrypted() {
    if !require_root() {
        return;
    }
    let node = which("node").expect("node must be installed");
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::HttpProtobuf);
    let port = free_port();
    let mut server = spawn(
        "node https",
        Command::new(&node)
            .arg(repo_root().join("tests/apps/tls_node_server.js"))
            .arg(port.to_string())
            .arg(&c)
            .arg(&k),
        port,
    );
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &server.pid().to_string()], &env_refs(&env));
    let stderr = assert_server_spans(&rx, &mut server, agent, port);
    let line = probes_line(&stderr, server.pid());
    let ldd = sh("ldd", &[node.to_str().unwrap()]);
    if !ldd.contains("libssl") {
        // The case this test is about: OpenSSL linked statically into node.
        let exe = std::fs::canonicalize(&node).unwrap();
        assert!(line.contains(&format!("file={} ", exe.display())), "{line}");
    }
    assert!(line.contains("SSL_read") && line.contains("SSL_write"), "{line}");
}

/// Go `net/http` TLS server built from source with Debian's golang-go: probes at the entry and at
/// every RET instruction of crypto/tls.(*Conn).Read/Write, paired by goroutine.
#[test]
fn go_tls_server_spans_are_decrypted() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("gotls");
    let bin = dir.path().join("tls_go_server");
    let src = repo_root().join("tests/apps/tls_go_server");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", dir.path().join("cache"))
        .output()
        .expect("go must be installed (cargo xtask setup installs golang-go)");
    assert!(out.status.success(), "go build: {}", String::from_utf8_lossy(&out.stderr));
    let version = sh("go", &["version"]);
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::Grpc);
    let port = free_port();
    let mut server = spawn("go https", Command::new(&bin).arg(port.to_string()).arg(&c).arg(&k), port);
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &server.pid().to_string()], &env_refs(&env));
    let stderr = assert_server_spans(&rx, &mut server, agent, port);
    let line = probes_line(&stderr, server.pid());
    let go = version.split_whitespace().nth(2).unwrap();
    assert!(line.contains(&format!("go={go} ")), "{line}");
    assert!(line.contains("crypto/tls.(*Conn).Read") && line.contains("crypto/tls.(*Conn).Write"));
}

/// Python requests as an HTTPS client: attached before it loads libssl (dlopen of `_ssl`), so the
/// agent finds libssl on a rescan; one CLIENT span per request with the decrypted URL and status.
#[test]
fn python_requests_client_spans_after_dlopen() {
    if !require_root() {
        return;
    }
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::Grpc);
    let port = free_port();
    // The server is not traced: only the client's view is exported.
    let _server = spawn(
        "python https",
        Command::new("python3")
            .arg(repo_root().join("tests/apps/tls_https_server.py"))
            .arg(port.to_string())
            .arg(&c)
            .arg(&k),
        port,
    );
    let paths = ["/users/1", "/missing", "/fail"];
    let mut client = Command::new("python3")
        .arg(repo_root().join("tests/apps/tls_client.py"))
        .arg(&c)
        .args(paths.iter().map(|p| format!("https://127.0.0.1:{port}{p}?k=v")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let cpid = client.id();
    let mut stdin = client.stdin.take().unwrap();
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "waiting\n");
    assert!(!maps_have_libssl(cpid), "the client must not have loaded libssl yet");

    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &cpid.to_string()], &env_refs(&env));
    // Import requests (dlopen of _ssl → libssl.so), then wait until the agent's rescan attached.
    stdin.write_all(b"import\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "imported\n");
    assert!(maps_have_libssl(cpid));
    let end = Instant::now() + Duration::from_secs(10);
    while !agent.stderr().contains(&format!("TLS probes attached pid={cpid} ")) {
        assert!(Instant::now() < end, "libssl loaded later was not probed:\n{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    stdin.write_all(b"go\n").unwrap();
    let mut rest = String::new();
    for _ in paths {
        stdout.read_line(&mut rest).unwrap();
    }
    assert_eq!(rest, "200\n404\n500\n");
    drop(stdin);
    let st = client.wait().unwrap();
    assert!(st.success(), "the client failed under the probes: {st}");

    let spans = spans_of_kind(&rx, paths.len(), "Client");
    let out = agent.stop();
    assert_eq!(spans.len(), paths.len(), "{spans:#?}\n{}", out.stderr);
    for (p, code) in paths.iter().zip(["200", "404", "500"]) {
        let full = format!("https://127.0.0.1:{port}{p}?k=v");
        let s = spans
            .iter()
            .find(|s| attr(s, "url.full") == full)
            .unwrap_or_else(|| panic!("no CLIENT span for {full}: {spans:#?}"));
        assert_eq!(attr(s, "http.request.method"), "GET");
        assert_eq!(attr(s, "http.response.status_code"), code);
        assert_eq!(attr(s, "tls.protocol.name"), "tls");
        assert_eq!(attr(s, "server.port"), port.to_string());
        assert_eq!(s.resource.get("process.pid"), Some(&cpid.to_string()));
    }
}

fn maps_have_libssl(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default().contains("libssl.so")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| Path::new(f).is_file()))
}
