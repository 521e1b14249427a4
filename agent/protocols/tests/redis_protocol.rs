//! Redis parser: RESP2/RESP3 types, pairing, pipelining, pub/sub, transactions, splits,
//! truncation, garbage, secrets.
use waybill_protocols::db::{DbCall, RedisConn, looks_like_resp};
use waybill_protocols::{Chunk, FlowDir};

fn cmd(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
    }
    v
}

fn cmds(list: &[&[&str]]) -> Vec<u8> {
    list.iter().flat_map(|a| cmd(a)).collect()
}

struct T {
    conn: RedisConn,
    out: Vec<DbCall>,
}

impl T {
    fn new() -> Self {
        T { conn: RedisConn::new(), out: Vec::new() }
    }
    fn s(&mut self, ts: u64, data: &[u8]) -> &mut Self {
        self.feed(FlowDir::ToServer, ts, data, data.len())
    }
    fn c(&mut self, ts: u64, data: &[u8]) -> &mut Self {
        self.feed(FlowDir::ToClient, ts, data, data.len())
    }
    fn feed(&mut self, dir: FlowDir, ts: u64, data: &[u8], total: usize) -> &mut Self {
        self.conn.feed(Chunk { dir, data, total, ts_ns: ts }, &mut self.out);
        self
    }
    fn calls(&mut self) -> Vec<DbCall> {
        std::mem::take(&mut self.out)
    }
    fn ops(&mut self) -> Vec<String> {
        self.calls().iter().map(|c| c.operation.as_deref().unwrap_or("-").to_string()).collect()
    }
}

#[test]
fn basic_pairing_and_redaction() {
    let mut t = T::new();
    t.s(1, &cmd(&["SET", "order:42", "secret-value"]));
    t.c(2, b"+OK\r\n");
    t.s(3, &cmd(&["get", "order:42"]));
    t.c(4, b"$12\r\nsecret-value\r\n");
    t.s(5, b"PING\r\n");
    t.c(6, b"+PONG\r\n");
    let calls = t.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].query_text.as_deref(), Some("SET ? ?"));
    assert_eq!(calls[1].query_text.as_deref(), Some("GET ?"));
    assert_eq!(calls[1].summary.as_deref(), Some("GET"));
    assert_eq!(calls[2].operation.as_deref(), Some("PING"));
    assert_eq!((calls[1].start_ns, calls[1].end_ns), (3, 4));
    assert!(calls.iter().all(|c| c.collection.is_none() && !c.approximate));
    // Mid-stream (first command is not a handshake): namespace unknown.
    assert!(calls.iter().all(|c| c.namespace.is_none()));
    let dbg = format!("{calls:?} {:?}", t.conn);
    assert!(!dbg.contains("order") && !dbg.contains("secret"));
}

#[test]
fn every_reply_type() {
    // (reply bytes, is an error)
    let cases: &[(&[u8], bool)] = &[
        (b"+OK\r\n", false),
        (b"-ERR bad\r\n", true),
        (b":-12\r\n", false),
        (b"$5\r\nhello\r\n", false),
        (b"$0\r\n\r\n", false),
        (b"$-1\r\n", false),
        (b"*-1\r\n", false),
        (b"*0\r\n", false),
        (b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n", false),
        (b"_\r\n", false),
        (b",3.14\r\n", false),
        (b",-inf\r\n", false),
        (b"#t\r\n", false),
        (b"(3492890328409238509324850943850943825024385\r\n", false),
        (b"!21\r\nSYNTAX invalid syntax\r\n", true),
        (b"=15\r\ntxt:Some string\r\n", false),
        (b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", false),
        (b"~2\r\n+a\r\n+b\r\n", false),
        // An attribute precedes the real reply and is not one itself.
        (b"|1\r\n+key-popularity\r\n*2\r\n$1\r\na\r\n,0.19\r\n*1\r\n:2\r\n", false),
        // Nested attribute inside an array does not count as an element.
        (b"*2\r\n:1\r\n|1\r\n+ttl\r\n:3600\r\n:2\r\n", false),
        // Streamed string and aggregate.
        (b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;0\r\n", false),
        (b"*?\r\n:1\r\n:2\r\n.\r\n", false),
        (b"%?\r\n+a\r\n:1\r\n.\r\n", false),
    ];
    for (reply, is_err) in cases {
        let mut t = T::new();
        t.s(1, &cmds(&[&["X"], &["Y"]]));
        // A push before the reply is not a reply either.
        t.c(2, b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n");
        t.c(3, reply);
        t.c(4, b"+second\r\n");
        let calls = t.calls();
        assert_eq!(calls.len(), 2, "reply {:?}", String::from_utf8_lossy(reply));
        assert_eq!(calls[0].error_message.is_some(), *is_err);
        assert_eq!((calls[0].end_ns, calls[1].end_ns), (3, 4));
        assert_eq!(t.conn.stats().parse_errors, 0);
    }
}

#[test]
fn error_replies() {
    let cases: &[(&[u8], &str, &str)] = &[
        (
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            "WRONGTYPE",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ),
        (b"-ERR value is not an integer or out of range\r\n", "ERR", "ERR value is not an integer or out of range"),
        (b"-MOVED 3999 10.0.0.1:6381\r\n", "MOVED", "MOVED ? ?.?.?.?:?"),
        (b"-ERR Unknown option 'hunter2' for CONFIG\r\n", "ERR", "ERR Unknown option ? for CONFIG"),
        (b"-NOAUTH Authentication required.\r\n", "NOAUTH", "NOAUTH Authentication required."),
    ];
    for (reply, code, msg) in cases {
        let mut t = T::new();
        t.s(1, &cmd(&["GET", "k"])).c(2, reply);
        let c = &t.calls()[0];
        assert_eq!(c.status_code.as_deref(), Some(*code));
        assert_eq!(c.error_message.as_deref(), Some(*msg));
    }
    // Unknown command: its name is not reported (it may be anything the client sent).
    let mut t = T::new();
    t.s(1, &cmd(&["hunter2", "x"])).c(2, b"-ERR unknown command 'hunter2', with args beginning with: 'x' \r\n");
    let c = &t.calls()[0];
    assert_eq!((c.operation.as_deref(), c.query_text.as_deref()), (None, None));
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn pipelining_and_split_at_every_byte() {
    let req = cmds(&[&["SET", "a", "1"], &["INCR", "n"], &["MGET", "a", "b"], &["HGETALL", "h"], &["DEL", "a"]]);
    let resp: &[u8] = b"+OK\r\n:5\r\n*2\r\n$1\r\n1\r\n$-1\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n:1\r\n";
    let mut whole = T::new();
    whole.s(1, &req).c(2, resp);
    let want = whole.calls();
    assert_eq!(want.len(), 5);
    for k in 0..=req.len() {
        for j in 0..=resp.len() {
            let mut t = T::new();
            t.s(1, &req[..k]).s(1, &req[k..]).c(2, &resp[..j]).c(2, &resp[j..]);
            assert_eq!(t.calls(), want, "splits {k}/{j}");
        }
    }
    let mut t = T::new();
    for b in &req {
        t.s(1, std::slice::from_ref(b));
    }
    for b in resp {
        t.c(2, std::slice::from_ref(b));
    }
    assert_eq!(t.calls(), want);
}

#[test]
fn inline_commands() {
    let mut t = T::new();
    t.s(1, b"PING\r\n\r\nset k \"quoted value\" 'x y'\r\nECHO hi\n");
    t.c(2, b"+PONG\r\n+OK\r\n$2\r\nhi\r\n");
    let calls = t.calls();
    let texts: Vec<_> = calls.iter().map(|c| c.query_text.clone().unwrap()).collect();
    assert_eq!(texts, ["PING", "SET ? ? ?", "ECHO ?"]);
}

#[test]
fn multi_exec_select_namespace() {
    let mut t = T::new();
    t.s(1, &cmd(&["HELLO", "3", "AUTH", "default", "pw"]));
    t.c(2, b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n");
    t.s(3, &cmds(&[&["SELECT", "4"], &["GET", "k"]]));
    t.c(4, b"+OK\r\n$-1\r\n");
    t.s(5, &cmds(&[&["MULTI"], &["SELECT", "7"], &["SET", "k", "v"], &["EXEC"]]));
    t.c(6, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+OK\r\n");
    t.s(7, &cmds(&[&["MULTI"], &["SELECT", "9"], &["DISCARD"], &["GET", "k"]]));
    t.c(8, b"+OK\r\n+QUEUED\r\n+OK\r\n$-1\r\n");
    t.s(9, &cmds(&[&["MULTI"], &["BAD"], &["EXEC"]]));
    t.c(10, b"+OK\r\n-ERR unknown command 'BAD'\r\n-EXECABORT Transaction discarded because of previous errors.\r\n");
    let calls = t.calls();
    let ns: Vec<_> = calls.iter().map(|c| c.namespace.clone().unwrap()).collect();
    // HELLO first at the connection start -> "0"; SELECT 4; EXEC applies SELECT 7; DISCARD
    // drops SELECT 9.
    assert_eq!(ns, ["0", "0", "4", "4", "4", "4", "4", "7", "7", "7", "7", "7", "7", "7"]);
    assert_eq!(calls[6].operation.as_deref(), Some("EXEC"));
    assert_eq!(calls[6].batch_size, Some(2));
    assert_eq!(calls[13].status_code.as_deref(), Some("EXECABORT"));
}

#[test]
fn pubsub_resp2_and_resp3() {
    // RESP2: confirmations are arrays; messages are skipped while subscribed.
    let mut t = T::new();
    t.s(1, &cmd(&["SUBSCRIBE", "a", "b"]));
    t.c(2, b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n");
    t.c(3, b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$3\r\nhey\r\n");
    t.c(4, b"*4\r\n$8\r\npmessage\r\n$2\r\na*\r\n$2\r\nab\r\n$1\r\nx\r\n");
    t.s(5, &cmd(&["PING"]));
    t.c(6, b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    t.s(7, &cmd(&["UNSUBSCRIBE"]));
    t.c(8, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n");
    t.c(9, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n");
    t.s(10, &cmd(&["LRANGE", "l", "0", "-1"]));
    t.c(11, b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n"); // a list that looks like a message
    let calls = t.calls();
    let spans: Vec<_> = calls.iter().map(|c| (c.operation.clone().unwrap(), c.end_ns)).collect();
    assert_eq!(spans, [("SUBSCRIBE".into(), 3), ("PING".into(), 6), ("UNSUBSCRIBE".into(), 9), ("LRANGE".into(), 11)]);
    // RESP3: everything pub/sub is a push; confirmations still answer the command.
    let mut t = T::new();
    t.s(1, &cmd(&["SSUBSCRIBE", "c"]));
    t.c(2, b">3\r\n$10\r\nssubscribe\r\n$1\r\nc\r\n:1\r\n>3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$1\r\nm\r\n");
    t.s(3, &cmd(&["GET", "k"]));
    t.c(4, b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n$-1\r\n");
    assert_eq!(t.ops(), ["SSUBSCRIBE", "GET"]);
}

#[test]
fn passwords_never_appear() {
    const PW: &str = "hunter2-Very-Secret";
    let reqs: Vec<Vec<u8>> = vec![
        cmd(&["AUTH", PW]),
        cmd(&["AUTH", "user", PW]),
        cmd(&["HELLO", "3", "AUTH", "user", PW]),
        cmd(&["MIGRATE", "h", "6379", "", "0", "5000", "AUTH", PW, "KEYS", "a"]),
        cmd(&["MIGRATE", "h", "6379", "", "0", "5000", "AUTH2", "user", PW, "KEYS", "a"]),
        cmd(&["CONFIG", "SET", "requirepass", PW]),
        cmd(&["CONFIG", "SET", "masterauth", PW]),
        cmd(&["ACL", "SETUSER", "bob", "on", &format!(">{PW}")]),
        cmd(&["CLIENT", PW]),
        cmd(&[PW]),
        format!("AUTH {PW}\r\n").into_bytes(),
        format!("CONFIG {PW} x\r\n").into_bytes(),
    ];
    let replies: &[u8] = b"+OK\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    for r in &reqs {
        let mut t = T::new();
        if r[0] == b'*' {
            for (i, b) in r.iter().enumerate() {
                t.s(1, std::slice::from_ref(b));
                assert!(!format!("{:?}", t.conn).contains("hunter2"), "Debug leaks at byte {i}");
            }
        } else {
            // Inline commands are recognised at a connection's start only when the first
            // chunk holds the whole command name.
            t.s(1, &r[..6]).s(1, &r[6..]);
        }
        t.c(2, replies);
        t.conn.close(3, &mut t.out);
        let calls = t.calls();
        assert_eq!(calls.len(), 1);
        let all = format!("{calls:?} {:?}", t.conn);
        assert!(!all.contains("hunter2") && !all.contains("HUNTER2"), "{all}");
    }
    let mut t = T::new();
    t.s(1, &reqs[5]).c(2, b"+OK\r\n");
    assert_eq!(t.calls()[0].query_text.as_deref(), Some("CONFIG SET ? ?"));
}

#[test]
fn truncated_bulk_keeps_sync() {
    let mut t = T::new();
    t.s(1, &cmd(&["GET", "big"]));
    let mut reply = b"$1000000\r\n".to_vec();
    reply.extend(vec![b'v'; 1_000_000]);
    reply.extend(b"\r\n");
    // Read in three syscalls, each captured only partially.
    let (a, b) = (reply.len() / 3, 2 * reply.len() / 3);
    for (k, part) in [&reply[..a], &reply[a..b], &reply[b..]].iter().enumerate() {
        let keep = part.len().min(100);
        t.feed(FlowDir::ToClient, 2 + k as u64, &part[..keep], part.len());
    }
    // The command side can be truncated too (a big SET).
    let mut set = cmd(&["SET", "big"]);
    set[1] = b'3';
    set.extend(b"$500000\r\n");
    set.extend(vec![b'x'; 500_000]);
    set.extend(b"\r\n");
    t.feed(FlowDir::ToServer, 10, &set[..64], set.len());
    t.c(11, b"+OK\r\n");
    let calls = t.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].end_ns, 4);
    assert_eq!(calls[1].query_text.as_deref(), Some("SET ? ?"));
    assert!(calls.iter().all(|c| !c.approximate));
}

#[test]
fn lost_aggregate_flushes_on_next_command() {
    let mut t = T::new();
    t.s(1, &cmd(&["LRANGE", "l", "0", "-1"]));
    let mut reply = b"*5000\r\n".to_vec();
    for i in 0..5000 {
        let v = format!("item-{i}");
        reply.extend(format!("${}\r\n{v}\r\n", v.len()).into_bytes());
    }
    let mid = reply.len() / 2;
    t.feed(FlowDir::ToClient, 2, &reply[..200], mid);
    t.feed(FlowDir::ToClient, 3, &reply[mid..mid + 200], reply.len() - mid);
    assert!(t.out.is_empty());
    t.s(4, &cmd(&["GET", "k"]));
    t.c(5, b"$1\r\nv\r\n");
    let calls = t.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[0].approximate);
    assert_eq!((calls[0].start_ns, calls[0].end_ns), (1, 3));
    assert!(!calls[1].approximate);
    assert_eq!((calls[1].start_ns, calls[1].end_ns), (4, 5));
    assert_eq!(t.conn.stats().desyncs, 1);
}

#[test]
fn mid_stream_command_resync() {
    let mut t = T::new();
    // First chunk starts inside a bulk argument.
    let mut s = cmd(&["SET", "k", "some value with\r\n*1\r\ninside"]);
    s.extend(cmd(&["GET", "k2"]));
    t.s(1, &s[15..]);
    t.c(2, b"+OK\r\n$1\r\nv\r\n");
    let calls = t.calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].query_text.as_deref(), Some("GET ?"));
}

#[test]
fn garbage_never_panics_or_emits() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let mut t = T::new();
        for k in 0..8 {
            let len = (rnd() % 300) as usize;
            let data: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let total = len + (rnd() % 3 == 0) as usize * (rnd() % 5000) as usize;
            let dir = if rnd() % 2 == 0 { FlowDir::ToServer } else { FlowDir::ToClient };
            t.feed(dir, k, &data, total);
        }
        t.conn.close(100, &mut t.out);
        assert!(t.calls().is_empty());
    }
}

#[test]
fn queue_overflow_and_close() {
    let mut t = T::new();
    let n = 1100;
    let req: Vec<u8> = (0..n).flat_map(|_| cmd(&["INCR", "c"])).collect();
    let resp: Vec<u8> = (0..n).flat_map(|i| format!(":{i}\r\n").into_bytes()).collect();
    t.s(1, &req).c(2, &resp);
    assert_eq!(t.calls().len(), 1024);
    assert_eq!(t.conn.stats().dropped, (n - 1024) as u64);
    t.s(3, &cmd(&["GET", "x"])).c(4, b"$-1\r\n");
    assert_eq!(t.ops(), ["GET"]);
    t.s(5, &cmd(&["BLPOP", "q", "0"]));
    t.conn.close(9, &mut t.out);
    let calls = t.calls();
    assert!(calls[0].approximate);
    assert_eq!(calls[0].end_ns, 9);
}

#[test]
fn many_arguments_are_capped() {
    let mut t = T::new();
    let args: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    let mut a: Vec<&str> = vec!["MGET"];
    a.extend(args.iter().map(String::as_str));
    t.s(1, &cmd(&a)).c(2, b"*0\r\n");
    let text = t.calls()[0].query_text.clone().unwrap();
    assert_eq!(text, format!("MGET{} …", " ?".repeat(32)));
}

#[test]
fn monitor_stops_pairing() {
    let mut t = T::new();
    t.s(1, &cmd(&["MONITOR"])).c(2, b"+OK\r\n+1700000000.1 [0 127.0.0.1:1] \"GET\" \"k\"\r\n");
    t.s(3, &cmd(&["GET", "x"])).c(4, b"+1700000000.2 [0 127.0.0.1:1] \"SET\" \"k\"\r\n");
    assert_eq!(t.ops(), ["MONITOR"]);
}

#[test]
fn detection() {
    assert!(looks_like_resp(&cmd(&["PING"])));
    assert!(looks_like_resp(&cmd(&["SET", "a", "b"])[..12]));
    assert!(looks_like_resp(b"PING\r\n"));
    assert!(looks_like_resp(b"get key\r\n"));
    assert!(!looks_like_resp(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(!looks_like_resp(b"*1\r\n:1\r\n"));
    assert!(!looks_like_resp(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"));
    assert!(!looks_like_resp(b"Q\x00\x00\x00\x0dSELECT 1\x00"));
    assert!(!looks_like_resp(b""));
}
