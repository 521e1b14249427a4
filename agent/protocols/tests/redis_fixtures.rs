//! Golden replays of real Redis 7 traffic recorded by `tests/fixtures/record_proxy.py`
//! (see `tests/fixtures/redis/generate.py`). Chunk k of `<case>.chunks.json` gets timestamp
//! `(k + 1) * 1000`. Set `UPDATE_GOLDEN=1` to rewrite the `<case>.calls.txt` files (then review
//! the diff by hand).
use std::path::PathBuf;

use waybill_protocols::db::{DbCall, RedisConn};
use waybill_protocols::{Chunk, FlowDir};

/// Secrets and literal values present in the recorded bytes that must never come out.
const FORBIDDEN: &[&str] = &[
    "R3dis-S3cret-pw",
    "order:42",
    "qty",
    "alice",
    "job-1",
    "secret-arg",
    "NOSUCHCOMMAND",
    "requirepass",
    "payload",
    "greeting",
    "binary",
    "tracked",
    "LIB-NAME",
];

struct Recorded {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// (dir, offset, captured len, total)
    chunks: Vec<(FlowDir, usize, usize, usize)>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/redis")
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
fn replay(r: &Recorded, split: usize) -> (Vec<DbCall>, RedisConn) {
    let mut conn = RedisConn::new();
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

fn render(calls: &[DbCall], conn: &RedisConn) -> String {
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
fn cli_basic() {
    // redis-cli, RESP2, replies recorded through a 1 KiB capture window (COMMAND DOCS is
    // ~170 KB): the parser must stay paired across the uncaptured bytes.
    let calls = check("cli_basic");
    let ops: Vec<_> = calls.iter().map(|c| c.operation.as_deref().unwrap_or("-")).collect();
    assert_eq!(
        ops,
        [
            "AUTH",
            "COMMAND DOCS",
            "SET",
            "GET",
            "HSET",
            "LPUSH",
            "GET",
            "-",
            "SELECT",
            "SET",
            "CONFIG SET",
            "INCR",
            "MULTI",
            "INCR",
            "SELECT",
            "EXEC",
            "GET"
        ]
    );
    assert_eq!(calls[0].query_text.as_deref(), Some("AUTH ?"));
    assert_eq!(calls[6].status_code.as_deref(), Some("WRONGTYPE"));
    assert_eq!(calls[10].query_text.as_deref(), Some("CONFIG SET ? ?"));
    // AUTH first at the connection's start: namespace 0, then SELECT 2, then SELECT 5 in EXEC.
    assert_eq!(calls[2].namespace.as_deref(), Some("0"));
    assert_eq!(calls[9].namespace.as_deref(), Some("2"));
    assert_eq!(calls[15].batch_size, Some(2));
    assert_eq!(calls[16].namespace.as_deref(), Some("5"));
}

#[test]
fn py_resp2() {
    let calls = check("py_resp2");
    // Pipelined SETs each get a call; pub/sub messages are not replies.
    assert_eq!(calls.iter().filter(|c| c.query_text.as_deref() == Some("SET ? ?")).count(), 6);
    assert!(calls.iter().any(|c| c.operation.as_deref() == Some("SUBSCRIBE")));
    assert!(calls.iter().all(|c| !c.approximate));
}

#[test]
fn py_resp3() {
    let calls = check("py_resp3");
    assert!(calls.iter().all(|c| !c.approximate));
    assert_eq!(calls[0].query_text.as_deref(), Some("HELLO ? ? ? ?"));
}

#[test]
fn raw_resp3_types() {
    let calls = check("raw_resp3_types");
    // HELLO + 13 DEBUG PROTOCOL + inline PING; the attribute and the push are not replies.
    assert_eq!(calls.len(), 15);
    assert_eq!(calls[14].operation.as_deref(), Some("PING"));
    assert!(calls.iter().all(|c| c.error_message.is_none() && !c.approximate));
}
