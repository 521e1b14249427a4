//! Database SERVER spans and real database clients nobody here wrote.
//!
//! - PostgreSQL: the agent attaches to the postmaster (`--pid`); backends are forked children of
//!   it and get traced in the kernel before they run. psql (libpq, simple query protocol) sends a
//!   single statement, a multi-statement query and a failing one → exactly three SERVER spans.
//! - Redis: the agent attaches to redis-server; redis-cli sends single commands and a
//!   MULTI/EXEC transaction → one SERVER span per command.
//! - Traced clients: redis-benchmark with `-P 10` pipelining (N commands → exactly N CLIENT
//!   spans), psql traced with `--exe psql` (started before psql runs), curl as an HTTP client.
//!
//! Every test reads the receiver's raw output to check that no literal reached the collector.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use waybill_tests::{
    harness::{Agent, Nginx, Postgres, Redis, require_root},
    otlp_receiver::{Proto, ReceivedSpan, Receiver, attr},
};

fn otlp(rx: &Receiver) -> [(&'static str, String); 2] {
    [("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol().to_string())]
}

fn start_agent(args: &[&str], rx: &Receiver) -> Agent {
    let env = otlp(rx);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Agent::start(args, &refs)
}

/// Waits for `n` spans, then 1.5 s more so that an extra span would show up too.
fn settle(rx: &Receiver, n: usize) -> Vec<ReceivedSpan> {
    let _ = rx.wait_for_spans(n, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    rx.spans()
}

/// Runs psql against `pg` (no password; libpq's default sslmode=prefer, so it sends an
/// SSLRequest first that the plaintext server declines). Returns (success, stdout, stderr).
fn psql(pg: &Postgres, db: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-d", db, "-X", "-Atc", sql])
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_secrets(rx: &Receiver, secrets: &[&str]) {
    let raw = rx.raw_output();
    assert!(!raw.is_empty());
    for s in secrets {
        assert!(!raw.contains(s), "{s:?} reached the collector");
    }
}

#[test]
fn postgres_server_spans_from_psql_against_the_postmaster() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::HttpProtobuf);
    let pg = Postgres::start();
    let agent = start_agent(&["--pid", &pg.pid().to_string()], &rx);

    let (ok, out, err) = psql(&pg, "shop", "SELECT count(*) FROM items WHERE name <> 'secret-literal-1'");
    assert!(ok && out == "3\n", "{out} {err}");
    let (ok, out, err) = psql(
        &pg,
        "shop",
        "INSERT INTO items VALUES (10, 'secret-literal-2', 5); UPDATE items SET qty = 99 WHERE id = 10; SELECT 1",
    );
    // psql 15 prints every statement's result: the tags, then the row.
    assert!(ok && out == "INSERT 0 1\nUPDATE 1\n1\n", "{out} {err}");
    let (ok, _, err) = psql(&pg, "shop", "SELECT * FROM no_such_table WHERE x = 'secret-literal-3'");
    assert!(!ok && err.contains("does not exist"), "{err}");

    let spans = settle(&rx, 3);
    let out = agent.stop();
    assert_eq!(spans.len(), 3, "{spans:#?}\n{}", out.stderr);
    assert_no_secrets(&rx, &["secret-literal", "widget"]);
    let ports: Vec<String> = spans.iter().map(|s| attr(s, "network.peer.port").to_string()).collect();
    for s in &spans {
        assert_eq!(s.kind, "Server");
        assert_eq!(attr(s, "db.system.name"), "postgresql");
        assert_eq!(attr(s, "db.namespace"), "shop");
        assert_eq!(attr(s, "server.address"), "127.0.0.1");
        assert_eq!(attr(s, "server.port"), pg.port.to_string());
        assert_eq!(attr(s, "client.address"), "127.0.0.1");
        // The backend (a forked child of the postmaster) is the traced process. A psql backend
        // is often gone before the agent reads /proc: it is still its parent's program.
        assert_ne!(s.resource.get("process.pid"), Some(&pg.pid().to_string()));
        assert_eq!(s.resource.get("service.name").map(String::as_str), Some("postgres"), "{s:#?}");
        assert_eq!(s.resource.get("process.executable.name").map(String::as_str), Some("postgres"), "{s:#?}");
    }
    // Three psql runs: three connections.
    let mut distinct = ports.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{ports:?}");

    let by_op = |op: &str| spans.iter().find(|s| attr(s, "db.operation.name") == op);
    let select = spans.iter().find(|s| s.status_code != "Error" && attr(s, "db.operation.name") == "SELECT").unwrap();
    assert_eq!(attr(select, "db.query.text"), "SELECT count(*) FROM items WHERE name <> ?");
    assert_eq!(attr(select, "db.collection.name"), "items");
    assert_eq!(attr(select, "db.response.returned_rows"), "1");
    assert_eq!(select.name, "SELECT items");

    let batch = by_op("BATCH").unwrap_or_else(|| panic!("no BATCH span: {spans:#?}"));
    assert_eq!(attr(batch, "db.operation.batch.size"), "3");
    assert_eq!(
        attr(batch, "db.query.text"),
        "INSERT INTO items VALUES (?, ?, ?); UPDATE items SET qty = ? WHERE id = ?; SELECT ?"
    );
    // INSERT 1 + UPDATE 1 + SELECT 1 row.
    assert_eq!(attr(batch, "db.response.returned_rows"), "3");
    assert_eq!(batch.status_code, "Unset");

    let failed = spans.iter().find(|s| s.status_code == "Error").expect("failing statement");
    assert_eq!(attr(failed, "db.response.status_code"), "42P01");
    assert_eq!(attr(failed, "error.type"), "42P01");
    assert_eq!(attr(failed, "db.query.text"), "SELECT * FROM no_such_table WHERE x = ?");
    assert!(failed.status_message.contains("relation ? does not exist"), "{}", failed.status_message);
}

#[test]
fn redis_server_spans_from_redis_cli_including_multi_exec() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let redis = Redis::start();
    let agent = start_agent(&["--pid", &redis.proc.pid().to_string()], &rx);
    let port = redis.port.to_string();
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli").args(["-p", &port]).args(args).output().expect("redis-cli");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cli(&["SET", "k1", "secret-value-1"]), "OK\n");
    assert_eq!(cli(&["GET", "k1"]), "secret-value-1\n");
    assert_eq!(cli(&["CONFIG", "SET", "requirepass", ""]), "OK\n");
    // A transaction on one connection: redis-cli reads the commands from stdin.
    let mut child = Command::new("redis-cli")
        .args(["-p", &port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    child.stdin.take().unwrap().write_all(b"MULTI\nSET k2 secret-value-2\nINCR counter\nLPUSH k1 x\nEXEC\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("OK\nQUEUED\nQUEUED\nQUEUED\n"), "{text}");
    assert!(text.contains("WRONGTYPE"), "{text}");

    let spans = settle(&rx, 9);
    let out = agent.stop();
    assert_no_secrets(&rx, &["secret-value", "requirepass"]);
    let ops: Vec<&str> = spans.iter().map(|s| attr(s, "db.query.text")).collect();
    assert_eq!(
        ops,
        // redis-cli 7 reading from stdin asks for COMMAND DOCS first (for its hints).
        ["SET ? ?", "GET ?", "CONFIG SET ? ?", "COMMAND DOCS", "MULTI", "SET ? ?", "INCR ?", "LPUSH ? ?", "EXEC"],
        "{spans:#?}\n{}",
        out.stderr
    );
    for s in &spans {
        assert_eq!(s.kind, "Server");
        assert_eq!(attr(s, "db.system.name"), "redis");
        assert_eq!(attr(s, "server.port"), port);
        assert_eq!(attr(s, "client.address"), "127.0.0.1");
        assert!(attr(s, "network.peer.port").parse::<u16>().is_ok());
        assert_eq!(s.resource.get("process.pid"), Some(&redis.proc.pid().to_string()));
    }
    let exec = &spans[8];
    assert_eq!(attr(exec, "db.operation.batch.size"), "3");
    // The transaction's commands share one connection.
    assert!(spans[4..].iter().all(|s| attr(s, "network.peer.port") == attr(exec, "network.peer.port")));
}

/// redis-benchmark (a C client nobody here wrote) pipelining 10 commands per write on one
/// connection, traced with `--exe` from its exec: 100 SETs → exactly 100 CLIENT spans, plus the
/// CONFIG GETs it sends on a connection of its own first.
#[test]
fn redis_benchmark_pipelined_commands_give_one_client_span_each() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::HttpProtobuf);
    let redis = Redis::start();
    let agent = start_agent(&["--exe", "redis-benchmark"], &rx);
    let port = redis.port.to_string();
    let out = Command::new("redis-benchmark")
        .args(["-p", &port, "-n", "100", "-P", "10", "-t", "set", "-c", "1", "-q"])
        .output()
        .expect("redis-benchmark (cargo xtask setup installs redis-tools)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = settle(&rx, 100);
    let out = agent.stop();
    let sets: Vec<_> = spans.iter().filter(|s| attr(s, "db.operation.name") == "SET").collect();
    let others: Vec<_> = spans.iter().filter(|s| attr(s, "db.operation.name") != "SET").collect();
    assert_eq!(sets.len(), 100, "{}", out.stderr);
    // CONFIG GET save, CONFIG GET appendonly: redis-benchmark reads them before it starts.
    assert_eq!(others.len(), 2, "{others:#?}");
    assert!(others.iter().all(|s| attr(s, "db.query.text") == "CONFIG GET ?"), "{others:#?}");
    assert_ne!(attr(others[0], "network.peer.port"), "");
    for s in &spans {
        assert_eq!(s.kind, "Client");
        assert_eq!(attr(s, "db.system.name"), "redis");
        assert_eq!(attr(s, "server.address"), "127.0.0.1");
        assert_eq!(attr(s, "server.port"), port);
        assert_eq!(s.resource.get("process.executable.name").map(String::as_str), Some("redis-benchmark"));
    }
    for s in &sets {
        assert_eq!(attr(s, "db.query.text"), "SET ? ?");
        assert_eq!(s.status_code, "Unset");
    }
    // Ten writes of ten commands: the commands of one write share its timestamp.
    let mut starts: Vec<u64> = sets.iter().map(|s| s.start_unix_ns).collect();
    starts.dedup();
    assert_eq!(starts.len(), 10, "{starts:?}");
    assert_no_secrets(&rx, &["xxxxxxxxxx"]);
}

/// psql traced by executable name (`--exe psql`, attached before psql starts: it lives for
/// milliseconds) against an untraced server: CLIENT spans for a simple query, a multi-statement
/// query and a failing one.
#[test]
fn psql_client_spans_by_executable_name() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let pg = Postgres::start();
    let agent = start_agent(&["--exe", "psql"], &rx);
    let (ok, out, err) = psql(&pg, "shop", "SELECT name FROM items WHERE qty = 3 AND name <> 'secret-literal-1'");
    assert!(ok && out == "gizmo\n", "{out} {err}");
    let (ok, _, err) = psql(&pg, "shop", "BEGIN; UPDATE items SET qty = 4 WHERE name = 'secret-literal-2'; COMMIT");
    assert!(ok, "{err}");
    let (ok, _, err) = psql(&pg, "shop", "SELECT 1/0, 'secret-literal-3'");
    assert!(!ok && err.contains("division by zero"), "{err}");
    let spans = settle(&rx, 3);
    let out = agent.stop();
    assert_eq!(spans.len(), 3, "{spans:#?}\n{}", out.stderr);
    assert_no_secrets(&rx, &["secret-literal", "gizmo"]);
    for s in &spans {
        assert_eq!(s.kind, "Client");
        assert_eq!(attr(s, "db.system.name"), "postgresql");
        assert_eq!(attr(s, "db.namespace"), "shop");
        assert_eq!(attr(s, "server.port"), pg.port.to_string());
        assert_eq!(
            s.resource.get("process.executable.name").map(String::as_str),
            Some("psql"),
            "{:?}\n{}",
            s.resource,
            out.stderr
        );
    }
    assert_eq!(attr(&spans[0], "db.query.text"), "SELECT name FROM items WHERE qty = ? AND name <> ?");
    assert_eq!(attr(&spans[0], "db.response.returned_rows"), "1");
    assert_eq!(attr(&spans[1], "db.operation.batch.size"), "3");
    assert_eq!(attr(&spans[1], "db.query.text"), "BEGIN; UPDATE items SET qty = ? WHERE name = ?; COMMIT");
    assert_eq!(spans[1].status_code, "Unset");
    assert_eq!(attr(&spans[2], "db.response.status_code"), "22012");
    assert_eq!(spans[2].status_code, "Error");
}

/// curl (unmodified, traced with `--exe curl`) as an HTTP client of nginx: one CLIENT span per
/// request on a keep-alive connection, with `url.full` (secret-looking query values redacted),
/// `server.address/port`, the status, and ≥ 400 as an error.
#[test]
fn curl_http_client_spans() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::Grpc);
    let nginx = Nginx::start();
    let agent = start_agent(&["--exe", "curl"], &rx);
    let urls = [
        nginx.url("/index.html?page=2&token=secret-token-1"),
        nginx.url("/api/items.json?email=someone%40example.com&q=widgets"),
        nginx.url("/missing?password=secret-pw-2"),
        nginx.url("/teapot"),
    ];
    let mut args: Vec<&str> = Vec::new();
    for (i, u) in urls.iter().enumerate() {
        if i > 0 {
            args.push("--next");
        }
        args.extend(["-s", "-o", "/dev/null", "-w", "%{http_code}\\n", u.as_str()]);
    }
    let out = Command::new("curl").args(&args).output().expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n200\n404\n418\n");
    let spans = settle(&rx, 4);
    let out = agent.stop();
    assert_eq!(spans.len(), 4, "{spans:#?}\n{}", out.stderr);
    assert_no_secrets(&rx, &["secret-token", "secret-pw", "someone"]);
    let p = nginx.port;
    let want = [
        (format!("http://127.0.0.1:{p}/index.html?page=?&token=?"), "200", "Unset"),
        (format!("http://127.0.0.1:{p}/api/items.json?email=?&q=?"), "200", "Unset"),
        (format!("http://127.0.0.1:{p}/missing?password=?"), "404", "Error"),
        (format!("http://127.0.0.1:{p}/teapot"), "418", "Error"),
    ];
    for (s, (full, code, status)) in spans.iter().zip(&want) {
        assert_eq!(s.kind, "Client");
        assert_eq!(s.name, "GET");
        assert_eq!(attr(s, "http.request.method"), "GET");
        assert_eq!(attr(s, "url.full"), full);
        assert_eq!(attr(s, "server.address"), "127.0.0.1");
        assert_eq!(attr(s, "server.port"), p.to_string());
        assert_eq!(attr(s, "http.response.status_code"), *code);
        assert_eq!(s.status_code, *status, "{full}");
        // Opt-In on CLIENT spans (set with --opt-in-attributes).
        assert!(!s.attributes.contains_key("user_agent.original"), "{s:#?}");
        if *status == "Error" {
            assert_eq!(attr(s, "error.type"), *code);
        }
        // curl reused its one connection.
        assert_eq!(attr(s, "network.peer.port"), attr(&spans[0], "network.peer.port"));
    }
}
