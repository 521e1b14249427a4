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
    harness::{
        Agent, Postgres, Proc, Redis, TempDir, free_port, repo_root, require_root, self_signed_cert, sh, wait_port,
    },
    otlp_receiver::{Proto, ReceivedSpan, Receiver, attr, env_refs, otlp_env},
};

/// Waits for `n` spans, then a little more so that an extra span would show up too.
fn spans_of_kind(r: &Receiver, n: usize, kind: &str) -> Vec<ReceivedSpan> {
    let _ = r.wait_for_spans(n, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    r.spans().into_iter().filter(|s| s.kind == kind).collect()
}

fn cert() -> (TempDir, PathBuf, PathBuf) {
    self_signed_cert()
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
        assert_eq!(attr(s, "network.peer.port"), attr(&spans[0], "network.peer.port"));
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

/// Builds tests/apps/tls_go_server with Debian's golang-go (standard library only).
fn build_go_server() -> (TempDir, PathBuf) {
    build_go_server_with(&[])
}

fn build_go_server_with(flags: &[&str]) -> (TempDir, PathBuf) {
    let dir = TempDir::new("gotls");
    let bin = dir.path().join("tls_go_server");
    let out = Command::new("go")
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(".")
        .current_dir(repo_root().join("tests/apps/tls_go_server"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", dir.path().join("cache"))
        .output()
        .expect("go must be installed (cargo xtask setup installs golang-go)");
    assert!(out.status.success(), "go build: {}", String::from_utf8_lossy(&out.stderr));
    (dir, bin)
}

/// Go `net/http` TLS server built from source with Debian's golang-go: probes at the entry and at
/// every RET instruction of crypto/tls.(*Conn).Read/Write, paired by goroutine.
#[test]
fn go_tls_server_spans_are_decrypted() {
    if !require_root() {
        return;
    }
    let (_dir, bin) = build_go_server();
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
        let full = format!("https://127.0.0.1:{port}{p}?k=?");
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

fn db_attr_list(spans: &[ReceivedSpan], system: &str) -> Vec<String> {
    spans.iter().filter(|s| attr(s, "db.system.name") == system).map(|s| attr(s, "db.query.text").to_string()).collect()
}

/// PostgreSQL (sslmode=require) and Redis over TLS from one Python process attached by PID:
/// psycopg-binary brings its own libssl (`libssl-<hash>.so.3`, renamed by auditwheel), redis-py
/// uses Python's `ssl` (the system libssl). The same DB spans as in plaintext, each exactly once
/// (the ciphertext the syscall tracepoints see produces nothing), and no literal anywhere.
#[test]
fn postgres_and_redis_over_tls_from_python_client() {
    if !require_root() {
        return;
    }
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::Grpc);
    let pg = Postgres::start_tls();
    let redis = Redis::start_tls(&c, &k);
    if redis.is_none() {
        eprintln!("NOTE: redis-server was built without TLS: Redis over TLS not tested");
    }
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("tests/apps/tls_db_client.py")).arg(pg.port.to_string());
    if let Some(r) = &redis {
        cmd.arg(r.port.to_string());
    }
    let mut client = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python3");
    let cpid = client.id();
    let mut stdin = client.stdin.take().unwrap();
    let mut stdout = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "waiting\n");
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &cpid.to_string()], &env_refs(&env));
    stdin.write_all(b"go\n").unwrap();
    // psycopg loads its libpq (and with it the bundled libssl) at import time, already done: the
    // probes were attached at start. redis-py's ssl module may be loaded now: wait for it.
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n", "the client failed under the probes");
    assert!(client.wait().unwrap().success());
    let want_redis = if redis.is_some() { 2 } else { 0 };
    let _ = rx.wait_for_spans(3 + want_redis, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let spans = rx.spans();
    let out = agent.stop();
    let probes = probes_line(&out.stderr, cpid);
    assert!(out.stderr.contains("libssl-"), "the wheel's bundled libssl was not probed:\n{}", out.stderr);
    let _ = probes;
    let raw = rx.raw_output();
    for secret in ["secret-tls-literal", "secret-tls-value", "widget"] {
        assert!(!raw.contains(secret), "{secret} reached the collector");
    }
    assert!(spans.iter().all(|s| s.kind == "Client" && attr(s, "tls.protocol.name") == "tls"), "{spans:#?}");
    assert_eq!(
        db_attr_list(&spans, "postgresql"),
        [
            "SELECT name FROM items WHERE name <> ? ORDER BY id",
            "UPDATE items SET qty = $1 WHERE id = ?",
            "SELECT * FROM no_such_table"
        ],
        "{spans:#?}\n{}",
        out.stderr
    );
    let pgs: Vec<_> = spans.iter().filter(|s| attr(s, "db.system.name") == "postgresql").collect();
    for s in &pgs {
        assert_eq!(attr(s, "db.namespace"), "shop");
        assert_eq!(attr(s, "server.port"), pg.port.to_string());
    }
    assert_eq!(attr(pgs[0], "db.response.returned_rows"), "3");
    assert_eq!(attr(pgs[1], "db.response.returned_rows"), "1");
    assert_eq!(attr(pgs[2], "db.response.status_code"), "42P01");
    if let Some(r) = &redis {
        let reds: Vec<_> = spans.iter().filter(|s| attr(s, "db.system.name") == "redis").collect();
        let ops: Vec<_> = reds.iter().map(|s| attr(s, "db.query.text")).collect();
        // redis-py 5 names itself on connect (CLIENT SETINFO), then the two calls.
        let calls: Vec<_> = ops.iter().filter(|o| !o.starts_with("CLIENT SETINFO")).collect();
        assert_eq!(calls, [&"SET ? ?", &"GET ?"], "{reds:#?}");
        assert_eq!(spans.len(), 3 + ops.len(), "{spans:#?}");
        assert!(reds.iter().all(|s| attr(s, "server.port") == r.port.to_string()));
    } else {
        assert_eq!(spans.len(), 3, "{spans:#?}");
    }
}

/// psql with sslmode=require (system libpq + libssl) attached by PID, then told to open a new
/// connection (`\c shop`) so that its TLS startup is seen; and redis-server with only a TLS port
/// traced by PID, its client redis-cli --tls: CLIENT spans from psql, SERVER spans from Redis,
/// each once. (A psql run with `-c` lives ~30 ms, less than attaching its 9 uprobes takes here:
/// see docs/tls.md.)
#[test]
fn psql_and_redis_server_over_tls() {
    if !require_root() {
        return;
    }
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::HttpProtobuf);
    let pg = Postgres::start_tls();
    let redis = Redis::start_tls(&c, &k);
    let mut psql = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-d", "postgres", "-X", "-q", "-At"])
        .env("PGSSLMODE", "require")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("psql");
    let ppid = psql.id();
    let mut args = vec!["--pid".to_string(), ppid.to_string()];
    if let Some(r) = &redis {
        args.extend(["--pid".to_string(), r.proc.pid().to_string()]);
    } else {
        eprintln!("NOTE: redis-server was built without TLS: Redis over TLS not tested");
    }
    let env = otlp_env(&rx);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&arg_refs, &env_refs(&env));
    let _ = probes_line(&agent.stderr(), ppid);
    let mut stdin = psql.stdin.take().unwrap();
    stdin
        .write_all(
            b"\\c shop\nSELECT count(*) FROM items WHERE name <> 'secret-tls-literal';\n\
              SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid(); SELECT 'secret-tls-2';\n",
        )
        .unwrap();
    drop(stdin);
    let o = psql.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "3\nt\nsecret-tls-2\n", "psql did not use TLS");
    if let Some(r) = &redis {
        let port = r.port.to_string();
        for cmd in [&["SET", "tls:k", "secret-tls-value"][..], &["GET", "tls:k"], &["INCR", "tls:n"]] {
            let o = Command::new("redis-cli")
                .args(["--tls", "--insecure", "-p", &port])
                .args(cmd)
                .output()
                .expect("redis-cli");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let want = 3 + if redis.is_some() { 3 } else { 0 };
    let _ = rx.wait_for_spans(want, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let spans = rx.spans();
    let out = agent.stop();
    assert_eq!(spans.len(), want, "{spans:#?}\n{}", out.stderr);
    let raw = rx.raw_output();
    for secret in ["secret-tls-literal", "secret-tls-value", "secret-tls-2"] {
        assert!(!raw.contains(secret), "{secret} reached the collector");
    }
    assert!(spans.iter().all(|s| attr(s, "tls.protocol.name") == "tls"), "{spans:#?}");
    assert_eq!(
        db_attr_list(&spans, "postgresql"),
        // psql reading a script splits it into statements and sends each on its own.
        [
            "SELECT count(*) FROM items WHERE name <> ?;",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();",
            "SELECT ?;"
        ]
    );
    for s in spans.iter().filter(|s| attr(s, "db.system.name") == "postgresql") {
        assert_eq!(s.kind, "Client");
        assert_eq!(attr(s, "db.namespace"), "shop");
        assert_eq!(s.resource.get("process.executable.name").map(String::as_str), Some("psql"));
    }
    if let Some(r) = &redis {
        assert_eq!(db_attr_list(&spans, "redis"), ["SET ? ?", "GET ?", "INCR ?"]);
        for s in spans.iter().filter(|s| attr(s, "db.system.name") == "redis") {
            assert_eq!(s.kind, "Server");
            assert_eq!(attr(s, "server.port"), r.port.to_string());
            assert_eq!(attr(s, "client.address"), "127.0.0.1");
        }
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// 10 000 HTTPS requests (curl, 4 parallel keep-alive connections, HTTP/1.1) to the Go TLS server
/// under its entry + RET-instruction uprobes: every response is correct (status and body size),
/// the server is alive afterwards, and the collector got exactly one SERVER span per request
/// (each request's path exactly once) — or, had anything been lost, the agent's own counters
/// account for every missing span.
#[test]
fn ten_thousand_https_requests_under_the_go_probes() {
    if !require_root() {
        return;
    }
    const N: usize = 10_000;
    let (dir, bin) = build_go_server();
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::Grpc);
    let port = free_port();
    let mut server = spawn("go https", Command::new(&bin).arg(port.to_string()).arg(&c).arg(&k), port);
    let maddr = format!("127.0.0.1:{}", free_port());
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &server.pid().to_string(), "--metrics-addr", &maddr], &env_refs(&env));
    let cfg = dir.path().join("curl.cfg");
    let mut text = String::new();
    for i in 0..N {
        text.push_str(&format!("url = \"https://127.0.0.1:{port}/users/{i}\"\noutput = \"/dev/null\"\n"));
    }
    std::fs::write(&cfg, text).unwrap();
    let t0 = Instant::now();
    let out = Command::new("curl")
        .args(["-sSk", "--no-progress-meter", "--http1.1", "--parallel", "--parallel-max", "4", "-K"])
        .arg(&cfg)
        .args(["-w", "%{http_code} %{size_download} %{url_effective}\\n"])
        .output()
        .expect("curl");
    let took = t0.elapsed();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(lines.lines().count(), N);
    for l in lines.lines() {
        let mut it = l.split(' ');
        let (code, size, url) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let id = url.rsplit('/').next().unwrap();
        // Body: {"user": "<id>"}\n
        assert_eq!((code, size), ("200", (id.len() + 13).to_string().as_str()), "{l}");
    }
    assert!(server.child.try_wait().unwrap().is_none(), "the Go server died under the probes");
    eprintln!("{N} HTTPS requests in {took:?} under the probes");
    assert!(took < Duration::from_secs(45), "{N} requests took {took:?}");

    let _ = rx.wait_for_spans(N, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    let spans: Vec<_> = rx.spans().into_iter().filter(|s| s.kind == "Server").collect();
    let (_, metrics) = waybill_tests::harness::http_get(&maddr, "/metrics");
    let out = agent.stop();
    let created = metric(&metrics, "waybill_spans_created_total");
    let exported = metric(&metrics, "waybill_spans_exported_total");
    let lost_ring = metric(&metrics, "waybill_ringbuf_records_lost_total");
    let dropped = metric(&metrics, "waybill_spans_dropped_total");
    let unpaired = metric(&metrics, "waybill_requests_unpaired_total");
    eprintln!(
        "spans received={} created={created} exported={exported} ringbuf_lost={lost_ring} dropped={dropped}",
        spans.len()
    );
    let mut paths: Vec<&str> = spans.iter().map(|s| attr(s, "url.path")).collect();
    paths.sort_unstable();
    let before = paths.len();
    paths.dedup();
    assert_eq!(paths.len(), before, "a request produced two spans");
    assert_eq!(spans.len() as u64, exported, "the collector got what the agent says it exported");
    assert_eq!(created, exported + dropped, "every span built was exported or counted as dropped");
    if lost_ring == 0 && dropped == 0 {
        assert_eq!(spans.len(), N, "no loss was counted, so every request must have its span\n{}", out.stderr);
    } else {
        // Losses happened and were counted: each missing span is a lost record or a dropped span.
        assert!((N - spans.len()) as u64 <= lost_ring + dropped, "uncounted losses: {metrics}");
    }
    assert_eq!(unpaired, 0);
    assert!(
        spans.iter().all(|s| attr(s, "http.response.status_code") == "200" && attr(s, "tls.protocol.name") == "tls")
    );
    assert!(server.child.try_wait().unwrap().is_none(), "the Go server died under the probes");
}

/// A stripped Go TLS server (`-ldflags=-s -w`: no symbol table) is reported clearly, by the agent
/// and by `waybill check --pid`, and left alone: it keeps serving, and its ciphertext gives no span.
#[test]
fn stripped_go_binary_is_reported_not_probed() {
    if !require_root() {
        return;
    }
    let (_dir, bin) = build_go_server_with(&["-ldflags=-s -w"]);
    let (_d, c, k) = cert();
    let rx = Receiver::start(Proto::Grpc);
    let port = free_port();
    let mut server = spawn("stripped go https", Command::new(&bin).arg(port.to_string()).arg(&c).arg(&k), port);
    let pid = server.pid();
    let check = waybill_tests::harness::waybill(&["check", "--pid", &pid.to_string()], &[]);
    let want = "the Go binary is stripped";
    assert!(check.stdout.contains(&format!("pid {pid}: ")) && check.stdout.contains(want), "{}", check.stdout);
    assert!(check.stdout.contains("TLS in it will not be seen"), "{}", check.stdout);
    let env = otlp_env(&rx);
    let agent = Agent::start(&["--pid", &pid.to_string()], &env_refs(&env));
    let out =
        sh("curl", &["-sk", "-o", "/dev/null", "-w", "%{http_code}", &format!("https://127.0.0.1:{port}/users/1")]);
    assert_eq!(out, "200");
    std::thread::sleep(Duration::from_millis(1500));
    let out = agent.stop();
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains(&format!("pid={pid} ")) && l.contains(want))
        .unwrap_or_else(|| panic!("no clear warning about the stripped binary:\n{}", out.stderr));
    assert!(line.contains("will not be seen"), "{line}");
    assert!(rx.spans().is_empty(), "{:#?}", rx.spans());
    assert!(server.child.try_wait().unwrap().is_none());
}
