//! PostgreSQL and Redis CLIENT spans from an unmodified Python process (psycopg 3 over libpq,
//! redis-py) whose connections were opened before the agent attached (a pool), against real
//! servers. Secrets and literals must never reach the collector.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use waybill_tests::{
    harness::{Agent, Postgres, Proc, Redis, repo_root, require_root},
    otlp_receiver::{Proto, Receiver, attr},
};

#[test]
fn pooled_postgres_and_redis_calls_become_exact_redacted_client_spans() {
    if !require_root() {
        return;
    }
    let rx = Receiver::start(Proto::HttpProtobuf);
    let pg = Postgres::start();
    let redis = Redis::start();
    let mut child = Command::new("python3")
        .arg(repo_root().join("tests/apps/db_client.py"))
        .args([pg.port.to_string(), redis.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let client = Proc { child, name: "db_client.py".into() };
    assert_eq!(lines.next().unwrap().unwrap(), "ready", "client could not connect");

    let agent = Agent::start(
        &["--pid", &client.pid().to_string()],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint()), ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol())],
    );
    writeln!(stdin, "go").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "done");
    let spans = rx.wait_for_spans(12, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let spans = if spans.len() == 12 { rx.spans() } else { spans };
    let out = agent.stop();
    drop(stdin);
    assert_eq!(spans.len(), 12, "{spans:#?}\n{}", out.stderr);

    // Nothing secret anywhere.
    let raw = rx.raw_output();
    for secret in ["secret-literal", "hunter2-secret", "topsecretpw", "widget"] {
        assert!(!raw.contains(secret), "{secret} reached the collector");
    }
    assert!(spans.iter().all(|s| s.kind == "Client"));

    let pgs: Vec<_> = spans.iter().filter(|s| attr(s, "db.system.name") == "postgresql").collect();
    assert_eq!(pgs.len(), 6, "{pgs:#?}");
    // Only a connection whose StartupMessage was seen knows its database; pooled ones were
    // adopted mid-stream and must not guess.
    let named: Vec<_> = pgs.iter().filter(|s| s.attributes.contains_key("db.namespace")).collect();
    assert_eq!(named.len(), 1, "{named:#?}");
    assert_eq!(attr(named[0], "db.namespace"), "shop");
    assert_eq!(attr(named[0], "db.query.text"), "SELECT count(*) FROM items WHERE qty > ?");
    for s in &pgs {
        assert_eq!(attr(s, "server.address"), "127.0.0.1");
        assert_eq!(attr(s, "server.port"), pg.port.to_string());
    }
    let selects: Vec<_> = pgs.iter().filter(|s| attr(s, "db.operation.name") == "SELECT").collect();
    assert_eq!(selects.len(), 5);
    let prepared: Vec<_> =
        selects.iter().filter(|s| !s.attributes.contains_key("db.namespace") && s.status_code != "Error").collect();
    assert_eq!(prepared.len(), 3, "each execution of the prepared statement reports its SQL");
    for s in &prepared {
        assert_eq!(attr(s, "db.query.text"), "SELECT id, name FROM items WHERE id = $1 AND name <> ?");
        assert_eq!(s.name, "SELECT items");
        assert_eq!(s.status_code, "Unset");
    }
    let update = pgs.iter().find(|s| attr(s, "db.operation.name") == "UPDATE").expect("UPDATE span");
    assert_eq!(attr(update, "db.query.text"), "UPDATE items SET qty = qty + ? WHERE name = ?");
    assert_eq!(attr(update, "db.response.returned_rows"), "1");
    let failed = selects.iter().find(|s| s.status_code == "Error").expect("failing statement");
    assert_eq!(attr(failed, "db.response.status_code"), "42P01");

    let reds: Vec<_> = spans.iter().filter(|s| attr(s, "db.system.name") == "redis").collect();
    let ops: Vec<_> = reds.iter().map(|s| attr(s, "db.operation.name")).collect();
    assert_eq!(ops, ["SET", "SET", "GET", "LPUSH", "GET", "AUTH"], "{reds:#?}");
    assert_eq!(attr(reds[0], "db.query.text"), "SET ? ?");
    assert_eq!(attr(reds[5], "db.query.text"), "AUTH ?");
    assert_eq!(reds[4].status_code, "Error");
    assert_eq!(attr(reds[4], "db.response.status_code"), "WRONGTYPE");
    assert_eq!(reds[5].status_code, "Error");
    for s in &reds {
        assert_eq!(attr(s, "server.port"), redis.port.to_string());
        let d = s.end_unix_ns - s.start_unix_ns;
        assert!(d > 0 && d < 1_000_000_000, "{}: {d} ns", s.name);
    }
    // The three pipelined commands were written at once and answered in order.
    assert!(reds[0].start_unix_ns == reds[1].start_unix_ns && reds[1].start_unix_ns == reds[2].start_unix_ns);
}
