//! Golden replays of real PostgreSQL 15 traffic recorded by `tests/fixtures/record_proxy.py`
//! (see `tests/fixtures/postgres/generate.py`). Chunk k of `<case>.chunks.json` gets timestamp
//! `(k + 1) * 1000`. Set `UPDATE_GOLDEN=1` to rewrite the `<case>.calls.txt` files (then review
//! the diff by hand).
use std::path::PathBuf;

use waybill_protocols::db::{DbCall, PgConn};
use waybill_protocols::{Chunk, FlowDir};

/// Secrets and literal values present in the recorded bytes that must never come out.
const FORBIDDEN: &[&str] =
    &["Al1ce-S3cret-pw", "B0b-Scram-pw", "Wr0ng-Guess-pw", "SCRAM", "apple", "cherry", "kiwi", "after-error", "9.99"];

struct Recorded {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// (dir, offset, captured len, total)
    chunks: Vec<(FlowDir, usize, usize, usize)>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/postgres")
}

fn load(case: &str) -> Recorded {
    let d = dir();
    let to_server = std::fs::read(d.join(format!("{case}.to_server.bin"))).unwrap();
    let to_client = std::fs::read(d.join(format!("{case}.to_client.bin"))).unwrap();
    let json = std::fs::read_to_string(d.join(format!("{case}.chunks.json"))).unwrap();
    Recorded { to_server, to_client, chunks: parse_chunks(&json) }
}

/// `[["s"|"c", offset, len(, total)], ...]` without a JSON dependency.
fn parse_chunks(json: &str) -> Vec<(FlowDir, usize, usize, usize)> {
    json.split('[')
        .filter_map(|e| {
            let e = e.trim_end_matches([']', ',', ' ', '\n']);
            let mut parts = e.split(',').map(str::trim);
            let dir = match parts.next()? {
                "\"s\"" => FlowDir::ToServer,
                "\"c\"" => FlowDir::ToClient,
                _ => return None,
            };
            let off: usize = parts.next()?.parse().ok()?;
            let len: usize = parts.next()?.parse().ok()?;
            let total = parts.next().and_then(|t| t.parse().ok()).unwrap_or(len);
            Some((dir, off, len, total))
        })
        .collect()
}

/// Replay; `split` > 0 feeds each chunk in pieces of at most `split` bytes (same timestamp,
/// uncaptured tail on the last piece).
fn replay(r: &Recorded, split: usize) -> (Vec<DbCall>, PgConn) {
    let mut conn = PgConn::new();
    let mut out = Vec::new();
    for (k, &(dir, off, len, total)) in r.chunks.iter().enumerate() {
        let src = match dir {
            FlowDir::ToServer => &r.to_server,
            FlowDir::ToClient => &r.to_client,
        };
        let data = &src[off..off + len];
        let ts = (k as u64 + 1) * 1000;
        if split == 0 || data.is_empty() {
            conn.feed(Chunk { dir, data, total, ts_ns: ts }, &mut out);
        } else {
            let pieces: Vec<&[u8]> = data.chunks(split).collect();
            let n = pieces.len();
            for (i, p) in pieces.into_iter().enumerate() {
                let total = if i + 1 == n { p.len() + (total - len) } else { p.len() };
                conn.feed(Chunk { dir, data: p, total, ts_ns: ts }, &mut out);
            }
        }
    }
    let end = (r.chunks.len() as u64 + 1) * 1000;
    conn.close(end, &mut out);
    (out, conn)
}

fn render(calls: &[DbCall], conn: &PgConn) -> String {
    let mut s = String::new();
    for c in calls {
        s.push_str(&format!(
            "{}..{} op={:?} coll={:?} ns={:?} rows={:?} batch={:?} status={:?} err={:?} approx={}\n    text={:?} summary={:?}\n",
            c.start_ns,
            c.end_ns,
            c.operation,
            c.collection,
            c.namespace,
            c.rows,
            c.batch_size,
            c.status_code,
            c.error_message,
            c.approximate,
            c.query_text,
            c.summary
        ));
    }
    s.push_str(&format!("stats: {:?}\n", conn.stats()));
    s
}

fn check(case: &str) -> Vec<DbCall> {
    let r = load(case);
    let (calls, conn) = replay(&r, 0);
    let text = render(&calls, &conn);
    let debug = format!("{calls:?} {conn:?}");
    for f in FORBIDDEN {
        assert!(!text.contains(f), "{case}: {f:?} leaked into the calls:\n{text}");
        assert!(!debug.contains(f), "{case}: {f:?} leaked into Debug output");
    }
    for c in &calls {
        let e = c.error_message.as_deref().unwrap_or("");
        assert!(!e.contains('"') && !e.contains('\''), "{case}: unredacted error {e:?}");
    }
    // Byte-at-a-time and odd splits give exactly the same calls.
    for split in [1, 3, 7, 64] {
        let (again, _) = replay(&r, split);
        assert_eq!(again, calls, "{case}: split {split} differs");
    }
    let golden = dir().join(format!("{case}.calls.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    } else {
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        assert_eq!(text, want, "{case}: calls differ from {}", golden.display());
    }
    calls
}

#[test]
fn psql_simple() {
    let calls = check("psql_simple");
    assert_eq!(calls.len(), 10);
    assert!(calls.iter().all(|c| c.namespace.as_deref() == Some("shop")));
    let sel = &calls[2];
    assert_eq!(sel.query_text.as_deref(), Some("SELECT * FROM items WHERE name = ?"));
    assert_eq!(sel.rows, Some(1));
    let batch = &calls[3];
    assert_eq!(batch.batch_size, Some(3));
    assert_eq!(batch.operation.as_deref(), Some("BATCH"));
    let missing = &calls[4];
    assert_eq!(missing.status_code.as_deref(), Some("42P01"));
    assert_eq!(missing.error_message.as_deref(), Some("ERROR 42P01: relation ? does not exist"));
    assert!(calls.iter().all(|c| !c.approximate));
}

#[test]
fn psql_badpw() {
    // Authentication fails: no call, and the wrong password never shows up anywhere.
    let calls = check("psql_badpw");
    assert!(calls.is_empty());
}

#[test]
fn psycopg_extended() {
    let calls = check("psycopg_extended");
    let q = "SELECT name, price FROM items WHERE id = $1";
    // 5 unnamed executions + 2 of the prepared statement `_pg3_0`.
    let selects: Vec<_> = calls.iter().filter(|c| c.query_text.as_deref() == Some(q)).collect();
    assert_eq!(selects.len(), 7);
    assert!(selects.iter().all(|c| c.rows == Some(1) && c.error_message.is_none()));
    // executemany: one call per Execute in a single pipelined Sync group.
    let inserts = calls.iter().filter(|c| c.operation.as_deref() == Some("INSERT")).count();
    assert_eq!(inserts, 3);
    assert!(calls.iter().all(|c| !c.approximate));
    assert!(calls.iter().all(|c| c.namespace.as_deref() == Some("shop")));
}
