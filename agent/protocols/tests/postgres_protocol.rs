//! PostgreSQL parser: message types, pairing, splits, truncation, resync, garbage, secrets.
use waybill_protocols::db::{DbCall, PgConn, looks_like_postgres_frontend, looks_like_postgres_startup};
use waybill_protocols::{Chunk, FlowDir};

// ---- message builders -------------------------------------------------------------------

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}
fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}
fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend(cstr(k));
        body.extend(cstr(v));
    }
    body.push(0);
    let mut v = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    v.extend(body);
    v
}
fn special(code: u32) -> Vec<u8> {
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend(code.to_be_bytes());
    v
}
fn q(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstr(sql))
}
fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend(0u16.to_be_bytes());
    msg(b'P', &b)
}
fn bind(portal: &str, stmt: &str, params: &[&[u8]]) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(cstr(stmt));
    b.extend(0u16.to_be_bytes());
    b.extend((params.len() as u16).to_be_bytes());
    for p in params {
        b.extend((p.len() as u32).to_be_bytes());
        b.extend(*p);
    }
    b.extend(0u16.to_be_bytes());
    msg(b'B', &b)
}
fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend(cstr(name));
    msg(b'D', &b)
}
fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
    let mut b = cstr(portal);
    b.extend(max_rows.to_be_bytes());
    msg(b'E', &b)
}
fn sync() -> Vec<u8> {
    msg(b'S', b"")
}
fn close_stmt(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    msg(b'C', &b)
}
fn password(pw: &str) -> Vec<u8> {
    msg(b'p', &cstr(pw))
}
fn ready() -> Vec<u8> {
    msg(b'Z', b"I")
}
fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cstr(tag))
}
fn row(cols: &[&[u8]]) -> Vec<u8> {
    let mut b = (cols.len() as u16).to_be_bytes().to_vec();
    for c in cols {
        b.extend((c.len() as u32).to_be_bytes());
        b.extend(*c);
    }
    msg(b'D', &b)
}
fn rowdesc(names: &[&str]) -> Vec<u8> {
    let mut b = (names.len() as u16).to_be_bytes().to_vec();
    for n in names {
        b.extend(cstr(n));
        b.extend([0u8; 18]);
    }
    msg(b'T', &b)
}
fn error(code: &str, m: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr("ERROR"));
    b.push(b'V');
    b.extend(cstr("ERROR"));
    b.push(b'C');
    b.extend(cstr(code));
    b.push(b'M');
    b.extend(cstr(m));
    b.push(b'D');
    b.extend(cstr("Key (id)=(42) already exists."));
    b.push(0);
    msg(b'E', &b)
}
fn auth(code: u32) -> Vec<u8> {
    msg(b'R', &code.to_be_bytes())
}
fn param_status(k: &str, v: &str) -> Vec<u8> {
    let mut b = cstr(k);
    b.extend(cstr(v));
    msg(b'S', &b)
}
fn notice() -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr("NOTICE"));
    b.push(0);
    msg(b'N', &b)
}
fn simple(ty: u8) -> Vec<u8> {
    msg(ty, b"")
}
fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// ---- driver -----------------------------------------------------------------------------

struct T {
    conn: PgConn,
    out: Vec<DbCall>,
}

impl T {
    fn new() -> Self {
        T { conn: PgConn::new(), out: Vec::new() }
    }
    fn s(&mut self, ts: u64, data: &[u8]) -> &mut Self {
        self.conn.feed(chunk(FlowDir::ToServer, data, data.len(), ts), &mut self.out);
        self
    }
    fn c(&mut self, ts: u64, data: &[u8]) -> &mut Self {
        self.conn.feed(chunk(FlowDir::ToClient, data, data.len(), ts), &mut self.out);
        self
    }
    /// Only `keep` bytes of `data` are captured.
    fn c_trunc(&mut self, ts: u64, data: &[u8], keep: usize) -> &mut Self {
        self.conn.feed(chunk(FlowDir::ToClient, &data[..keep], data.len(), ts), &mut self.out);
        self
    }
    fn s_trunc(&mut self, ts: u64, data: &[u8], keep: usize) -> &mut Self {
        self.conn.feed(chunk(FlowDir::ToServer, &data[..keep], data.len(), ts), &mut self.out);
        self
    }
    fn calls(&mut self) -> Vec<DbCall> {
        std::mem::take(&mut self.out)
    }
}

fn chunk(dir: FlowDir, data: &[u8], total: usize, ts_ns: u64) -> Chunk<'_> {
    Chunk { dir, data, total, ts_ns }
}

fn login(t: &mut T) {
    t.s(1, &startup(&[("user", "alice"), ("database", "shop")]));
    t.c(2, &cat(&[auth(0), param_status("server_version", "15"), ready()]));
}

// ---- tests ------------------------------------------------------------------------------

#[test]
fn simple_query_rows_and_namespace() {
    let mut t = T::new();
    login(&mut t);
    t.s(10, &q("SELECT * FROM users WHERE id = 42 AND name = 'bob'"));
    t.c(20, &cat(&[rowdesc(&["id"]), row(&[b"42"]), complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.operation.as_deref(), Some("SELECT"));
    assert_eq!(c.collection.as_deref(), Some("users"));
    assert_eq!(c.summary.as_deref(), Some("SELECT users"));
    assert_eq!(c.query_text.as_deref(), Some("SELECT * FROM users WHERE id = ? AND name = ?"));
    assert_eq!(c.namespace.as_deref(), Some("shop"));
    assert_eq!((c.start_ns, c.end_ns, c.rows), (10, 20, Some(1)));
    assert!(!c.approximate && c.error_message.is_none());
}

#[test]
fn namespace_falls_back_to_user() {
    let mut t = T::new();
    t.s(1, &startup(&[("user", "carol")]));
    t.c(2, &cat(&[auth(0), ready()]));
    t.s(3, &q("SELECT 1"));
    t.c(4, &cat(&[complete("SELECT 1"), ready()]));
    assert_eq!(t.calls()[0].namespace.as_deref(), Some("carol"));
}

#[test]
fn command_complete_tags() {
    let cases: &[(&str, Option<u64>)] = &[
        ("INSERT 0 5", Some(5)),
        ("UPDATE 3", Some(3)),
        ("DELETE 0", Some(0)),
        ("SELECT 12", Some(12)),
        ("MERGE 2", Some(2)),
        ("FETCH 7", Some(7)),
        ("MOVE 1", Some(1)),
        ("COPY 9", Some(9)),
        ("CREATE TABLE", None),
        ("BEGIN", None),
    ];
    for (tag, rows) in cases {
        let mut t = T::new();
        t.s(1, &q("X"));
        t.c(2, &cat(&[complete(tag), ready()]));
        assert_eq!(t.calls()[0].rows, *rows, "tag {tag}");
    }
}

#[test]
fn multi_statement_is_one_batch_call() {
    let mut t = T::new();
    t.s(1, &q("INSERT INTO a VALUES (1); INSERT INTO a VALUES (2)"));
    t.c(2, &cat(&[complete("INSERT 0 1"), complete("INSERT 0 1"), ready()]));
    let c = &t.calls()[0];
    assert_eq!(c.operation.as_deref(), Some("BATCH INSERT"));
    assert_eq!(c.collection.as_deref(), Some("a"));
    assert_eq!(c.batch_size, Some(2));
    assert_eq!(c.rows, Some(2));
    assert_eq!(c.summary.as_deref(), Some("INSERT a"));
}

#[test]
fn error_response_redacted_and_user_raised_dropped() {
    let mut t = T::new();
    t.s(1, &q("INSERT INTO users VALUES (42)"));
    t.c(2, &cat(&[error("23505", "duplicate key value violates unique constraint \"users_pkey\""), ready()]));
    t.s(3, &q("SELECT f()"));
    t.c(4, &cat(&[error("P0001", "user alice@example.com not allowed"), ready()]));
    let calls = t.calls();
    assert_eq!(calls[0].status_code.as_deref(), Some("23505"));
    assert_eq!(
        calls[0].error_message.as_deref(),
        Some("ERROR 23505: duplicate key value violates unique constraint ?")
    );
    assert_eq!(calls[1].error_message.as_deref(), Some("ERROR P0001"));
    let dbg = format!("{calls:?}");
    assert!(!dbg.contains("Key (id)") && !dbg.contains("already exists"));
    assert!(!dbg.contains("alice@example.com"));
}

#[test]
fn empty_query() {
    let mut t = T::new();
    t.s(1, &q(""));
    t.c(2, &cat(&[simple(b'I'), ready()]));
    let c = &t.calls()[0];
    assert_eq!((c.operation.as_deref(), c.query_text.as_deref(), c.rows), (None, None, None));
}

#[test]
fn async_messages_are_skipped() {
    let mut t = T::new();
    t.s(1, &q("LISTEN x"));
    t.c(
        2,
        &cat(&[
            notice(),
            param_status("TimeZone", "UTC"),
            complete("LISTEN"),
            msg(b'A', &cat(&[7u32.to_be_bytes().to_vec(), cstr("x"), cstr("payload")])),
            ready(),
        ]),
    );
    t.c(3, &msg(b'A', &cat(&[7u32.to_be_bytes().to_vec(), cstr("x"), cstr("later")])));
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(t.conn.stats().unmatched, 0);
}

#[test]
fn extended_unnamed_and_describe() {
    let mut t = T::new();
    t.s(
        5,
        &cat(&[
            parse("", "SELECT * FROM t WHERE a = $1"),
            bind("", "", &[b"secret-param"]),
            describe(b'P', ""),
            execute("", 0),
            sync(),
        ]),
    );
    t.c(
        9,
        &cat(&[simple(b'1'), simple(b'2'), rowdesc(&["a"]), row(&[b"x"]), row(&[b"y"]), complete("SELECT 2"), ready()]),
    );
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.query_text.as_deref(), Some("SELECT * FROM t WHERE a = $1"));
    assert_eq!((c.start_ns, c.end_ns, c.rows), (5, 9, Some(2)));
    assert!(!format!("{calls:?} {:?}", t.conn).contains("secret-param"));
}

#[test]
fn prepared_statement_executed_many_times() {
    let mut t = T::new();
    t.s(1, &cat(&[parse("s1", "UPDATE c SET n = n + 1 WHERE id = $1"), sync()]));
    t.c(2, &cat(&[simple(b'1'), ready()]));
    for i in 0..100u64 {
        let id = i.to_string();
        t.s(10 + i * 2, &cat(&[bind("", "s1", &[id.as_bytes()]), execute("", 0), sync()]));
        t.c(11 + i * 2, &cat(&[simple(b'2'), complete("UPDATE 1"), ready()]));
    }
    let calls = t.calls();
    assert_eq!(calls.len(), 100);
    for (i, c) in calls.iter().enumerate() {
        assert_eq!(c.query_text.as_deref(), Some("UPDATE c SET n = n + ? WHERE id = $1"));
        assert_eq!(c.operation.as_deref(), Some("UPDATE"));
        assert_eq!((c.start_ns, c.end_ns), (10 + i as u64 * 2, 11 + i as u64 * 2));
    }
    // Closing the statement forgets it.
    t.s(500, &cat(&[close_stmt("s1"), bind("", "s1", &[]), execute("", 0), sync()]));
    t.c(501, &cat(&[simple(b'3'), error("26000", "prepared statement \"s1\" does not exist"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].query_text, None);
    assert_eq!(calls[0].status_code.as_deref(), Some("26000"));
}

#[test]
fn statement_cache_is_bounded() {
    let mut t = T::new();
    let mut req = Vec::new();
    let mut resp = Vec::new();
    for i in 0..300 {
        req.extend(parse(&format!("s{i}"), &format!("SELECT {i} FROM t{i}")));
        resp.extend(simple(b'1'));
    }
    req.extend(sync());
    resp.extend(ready());
    t.s(1, &req).c(2, &resp);
    t.s(3, &cat(&[bind("", "s0", &[]), execute("", 0), bind("", "s299", &[]), execute("", 0), sync()]));
    t.c(4, &cat(&[simple(b'2'), complete("SELECT 1"), simple(b'2'), complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].query_text, None, "s0 was evicted");
    assert_eq!(calls[1].collection.as_deref(), Some("t299"));
}

#[test]
fn pipelined_syncs_with_error_in_the_middle() {
    let mut t = T::new();
    let group = |sql: &str| cat(&[parse("", sql), bind("", "", &[]), execute("", 0), sync()]);
    t.s(1, &cat(&[group("SELECT 1 FROM a"), group("SELECT 1 FROM b"), group("SELECT 1 FROM c")]));
    t.c(2, &cat(&[simple(b'1'), simple(b'2'), complete("SELECT 1"), ready()]));
    t.c(3, &cat(&[simple(b'1'), simple(b'2'), error("57014", "canceling statement"), ready()]));
    t.c(4, &cat(&[simple(b'1'), simple(b'2'), complete("SELECT 1"), ready()]));
    let calls = t.calls();
    let colls: Vec<_> = calls.iter().map(|c| c.collection.clone().unwrap()).collect();
    assert_eq!(colls, ["a", "b", "c"]);
    assert_eq!(calls.iter().map(|c| c.end_ns).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(calls[1].status_code.as_deref(), Some("57014"));
    assert!(calls.iter().all(|c| !c.approximate));
}

#[test]
fn parse_error_reports_on_the_execute_and_skips_to_sync() {
    let mut t = T::new();
    // Two executes in one group; Parse fails: one call (the group's first Execute), the rest
    // of the group is skipped by the server.
    t.s(
        1,
        &cat(&[
            parse("", "SELEC oops"),
            bind("", "", &[]),
            execute("", 0),
            bind("", "", &[]),
            execute("", 0),
            sync(),
            q("SELECT 2"),
        ]),
    );
    t.c(2, &cat(&[error("42601", "syntax error at or near \"SELEC\""), ready()]));
    t.c(3, &cat(&[complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].status_code.as_deref(), Some("42601"));
    assert_eq!(calls[0].query_text.as_deref(), Some("SELEC oops"));
    assert_eq!(calls[0].operation, None);
    assert_eq!(calls[0].error_message.as_deref(), Some("ERROR 42601: syntax error at or near ?"));
    assert_eq!(calls[1].query_text.as_deref(), Some("SELECT ?"));
}

#[test]
fn parse_error_without_execute_still_reported() {
    let mut t = T::new();
    t.s(1, &cat(&[parse("p1", "SELECT * FROM nope"), describe(b'S', "p1"), sync()]));
    t.c(2, &cat(&[error("42P01", "relation \"nope\" does not exist"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].collection.as_deref(), Some("nope"));
}

#[test]
fn error_before_sync_sent_discards_until_sync() {
    let mut t = T::new();
    // Flush-driven client: the error arrives before it sends Sync; messages it sends in the
    // meantime are discarded by the server.
    t.s(1, &cat(&[parse("", "SELECT 1/0"), bind("", "", &[]), execute("", 0), msg(b'H', b"")]));
    t.c(2, &cat(&[simple(b'1'), simple(b'2'), error("22012", "division by zero")]));
    t.s(3, &cat(&[bind("", "", &[]), execute("", 0), sync()]));
    t.c(4, &ready());
    t.s(5, &q("SELECT 3"));
    t.c(6, &cat(&[complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(calls[0].status_code.as_deref(), Some("22012"));
    assert_eq!(calls[1].query_text.as_deref(), Some("SELECT ?"));
}

#[test]
fn portal_suspended_and_named_portals() {
    let mut t = T::new();
    t.s(1, &cat(&[parse("st", "SELECT x FROM big"), bind("cur", "st", &[]), execute("cur", 2), msg(b'H', b"")]));
    t.c(2, &cat(&[simple(b'1'), simple(b'2'), row(&[b"1"]), row(&[b"2"]), simple(b's')]));
    t.s(3, &cat(&[execute("cur", 2), sync()]));
    t.c(4, &cat(&[row(&[b"3"]), complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].rows, calls[1].rows), (Some(2), Some(1)));
    assert!(calls.iter().all(|c| c.collection.as_deref() == Some("big")));
    assert_eq!((calls[1].start_ns, calls[1].end_ns), (3, 4));
}

#[test]
fn extended_copy_out_and_in() {
    let mut t = T::new();
    t.s(1, &cat(&[parse("", "COPY t TO STDOUT"), bind("", "", &[]), execute("", 0), sync()]));
    let copy_resp = msg(b'H', &[0, 0, 1, 0, 0]);
    t.c(
        2,
        &cat(&[
            simple(b'1'),
            simple(b'2'),
            copy_resp,
            msg(b'd', b"1\tx\n"),
            msg(b'd', b"2\ty\n"),
            simple(b'c'),
            complete("COPY 2"),
            ready(),
        ]),
    );
    t.s(3, &q("COPY t FROM STDIN"));
    t.c(4, &msg(b'G', &[0, 0, 1, 0, 0]));
    t.s(5, &cat(&[msg(b'd', b"Q\0\0\0\x05garbage-looking copy data"), simple(b'c')]));
    t.c(6, &cat(&[complete("COPY 1"), ready()]));
    t.s(7, &q("COPY t FROM STDIN"));
    t.c(8, &msg(b'G', &[0, 0, 1, 0, 0]));
    t.s(9, &msg(b'f', &cstr("client gave up")));
    t.c(10, &cat(&[error("57014", "COPY from stdin failed: client gave up"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert_eq!((calls[0].rows, calls[1].rows), (Some(2), Some(1)));
    assert_eq!(calls[2].status_code.as_deref(), Some("57014"));
    assert!(calls.iter().all(|c| !c.approximate));
}

#[test]
fn ssl_and_gss_negotiation() {
    // 'N': startup follows in clear.
    let mut t = T::new();
    t.s(1, &special(80_877_103)).c(2, b"N");
    login(&mut t);
    t.s(3, &q("SELECT 1")).c(4, &cat(&[complete("SELECT 1"), ready()]));
    assert_eq!(t.calls().len(), 1);
    // 'S': TLS from here on: nothing is reported, whatever follows.
    for (code, answer) in [(80_877_103u32, b'S'), (80_877_104, b'G')] {
        let mut t = T::new();
        t.s(1, &special(code)).c(2, &[answer]);
        t.s(3, &q("SELECT 1")).c(4, &cat(&[complete("SELECT 1"), ready()]));
        t.conn.close(5, &mut t.out);
        assert!(t.calls().is_empty());
    }
    // CancelRequest: nothing to report.
    let mut t = T::new();
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend(80_877_102u32.to_be_bytes());
    cancel.extend([0; 8]);
    t.s(1, &cancel);
    t.conn.close(2, &mut t.out);
    assert!(t.calls().is_empty());
    // Direct TLS ClientHello.
    let mut t = T::new();
    t.s(1, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
    t.s(2, &q("SELECT 1")).c(3, &cat(&[complete("SELECT 1"), ready()]));
    assert!(t.calls().is_empty());
}

#[test]
fn passwords_never_stored_or_emitted() {
    const PW: &str = "Sup3r-Secret-PW";
    let conv_s = cat(&[startup(&[("user", "u"), ("database", "d")]), password(PW), q("SELECT 1")]);
    let conv_c = cat(&[auth(3), auth(0), ready(), complete("SELECT 1"), ready()]);
    // Feed byte by byte, checking Debug output at every step (the password may sit half-read).
    let mut t = T::new();
    for (i, b) in conv_s.iter().enumerate() {
        t.s(i as u64, std::slice::from_ref(b));
        assert!(!format!("{:?}", t.conn).contains("Sup3r"), "at byte {i}");
    }
    for b in &conv_c {
        t.c(1000, std::slice::from_ref(b));
    }
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    let all = format!("{calls:?} {:?}", t.conn);
    assert!(!all.contains(PW) && !all.contains("Sup3r"));
    // SASL messages are 'p' too.
    let mut t = T::new();
    t.s(1, &startup(&[("user", "u")]));
    t.c(2, &auth(10));
    t.s(3, &msg(b'p', b"SCRAM-SHA-256\0\0\0\0\x20n,,n=,r=Sup3r-Secret-PW-nonce"));
    assert!(!format!("{:?}", t.conn).contains("Sup3r"));
}

/// A whole conversation (login + extended + simple), used by the split tests.
fn conversation() -> (Vec<u8>, Vec<u8>) {
    let s = cat(&[
        startup(&[("user", "u"), ("database", "db")]),
        password("pw"),
        q("SELECT * FROM a WHERE x = 'lit'"),
        parse("n", "INSERT INTO b VALUES ($1)"),
        bind("", "n", &[b"v"]),
        execute("", 0),
        sync(),
        bind("", "n", &[b"w"]),
        execute("", 0),
        sync(),
    ]);
    let c = cat(&[
        auth(3),
        auth(0),
        param_status("a", "b"),
        msg(b'K', &[0; 8]),
        ready(),
        rowdesc(&["x"]),
        row(&[b"lit"]),
        complete("SELECT 1"),
        ready(),
        simple(b'1'),
        simple(b'2'),
        complete("INSERT 0 1"),
        ready(),
        simple(b'2'),
        complete("INSERT 0 1"),
        ready(),
    ]);
    (s, c)
}

fn strip_ts(mut calls: Vec<DbCall>) -> Vec<DbCall> {
    for c in &mut calls {
        c.start_ns = 0;
        c.end_ns = 0;
    }
    calls
}

#[test]
fn split_at_every_byte_boundary() {
    let (s, c) = conversation();
    let mut whole = T::new();
    whole.s(1, &s).c(2, &c);
    let want = strip_ts(whole.calls());
    assert_eq!(want.len(), 3);
    for k in 0..=s.len() {
        for j in [0, c.len() / 3, c.len() / 2, c.len()] {
            let mut t = T::new();
            t.s(1, &s[..k]).s(1, &s[k..]).c(2, &c[..j]).c(2, &c[j..]);
            assert_eq!(strip_ts(t.calls()), want, "server split {k}, client split {j}");
        }
    }
    for k in 0..=c.len() {
        let mut t = T::new();
        t.s(1, &s).c(2, &c[..k]).c(2, &c[k..]);
        assert_eq!(strip_ts(t.calls()), want, "client split {k}");
    }
    // One byte at a time, interleaved.
    let mut t = T::new();
    let (mut i, mut j) = (0, 0);
    while i < s.len() || j < c.len() {
        if i < s.len() {
            t.s(1, &s[i..i + 1]);
            i += 1;
        }
        if i == s.len() && j < c.len() {
            t.c(2, &c[j..j + 1]);
            j += 1;
        }
    }
    assert_eq!(strip_ts(t.calls()), want);
}

#[test]
fn truncated_prefix_inside_message_keeps_sync() {
    let mut t = T::new();
    login(&mut t);
    // A 100 KB DataRow of which only 64 bytes are captured, in the same syscall as C and Z
    // which are then uncaptured too... so use a separate syscall for them.
    let big = row(&[&vec![b'x'; 100_000]]);
    t.s(10, &q("SELECT blob FROM files"));
    t.c_trunc(11, &big, 64);
    t.c(12, &cat(&[complete("SELECT 1"), ready()]));
    // A huge query text, captured partially: still one call.
    let long = format!("INSERT INTO logs VALUES ('{}')", "y".repeat(50_000));
    t.s_trunc(13, &q(&long), 100);
    t.c(14, &cat(&[complete("INSERT 0 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].rows, calls[0].end_ns, calls[0].approximate), (Some(1), 12, false));
    assert_eq!(calls[1].query_text.as_deref(), Some("INSERT INTO logs VALUES (?"));
    assert!(!calls[1].approximate);
}

#[test]
fn lost_bytes_across_boundaries_resync() {
    let mut t = T::new();
    login(&mut t);
    t.s(10, &q("SELECT * FROM big"));
    // Rows then C/Z all in one syscall, only a prefix captured: the end is lost.
    let mut reply = vec![rowdesc(&["v"])];
    for i in 0..200 {
        reply.push(row(&[format!("value-{i}").as_bytes()]));
    }
    let reply = cat(&reply);
    let tail = cat(&[complete("SELECT 200"), ready()]);
    let all = cat(&[reply.clone(), tail]);
    t.c_trunc(11, &all, 100);
    // The client sends its next query only after ReadyForQuery: the first call is flushed.
    t.s(12, &q("SELECT 2"));
    t.c(13, &cat(&[complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert!(calls[0].approximate);
    assert_eq!(calls[0].end_ns, 11);
    assert_eq!(calls[1].query_text.as_deref(), Some("SELECT ?"));
    assert_eq!((calls[1].end_ns, calls[1].rows), (13, Some(1)));

    // Big result over several reads: the second read starts mid-message and resyncs.
    let mut t = T::new();
    login(&mut t);
    t.s(20, &q("SELECT * FROM big"));
    let all = cat(&[reply, complete("SELECT 200"), ready()]);
    let cut1 = 1000;
    let cut2 = all.len() - 700;
    t.c_trunc(21, &all[..cut1], 300); // first read: prefix captured
    t.c(22, &all[cut1..cut2]); // starts mid-message
    t.c(23, &all[cut2..]);
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].rows, calls[0].end_ns), (Some(200), 23));
    assert!(calls[0].approximate);
    assert!(t.conn.stats().resyncs >= 1);
}

#[test]
fn mid_stream_adoption() {
    // Connection opened before the agent attached: no startup, namespace unknown.
    let mut t = T::new();
    t.c(1, &cat(&[complete("SELECT 1"), ready()])); // answer to something we never saw
    t.s(2, &q("SELECT 1 FROM a"));
    t.c(3, &cat(&[complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].namespace, None);
    assert!(!calls[0].approximate);
    assert_eq!(t.conn.stats().unmatched, 1);

    // First chunk starts in the middle of a message.
    let mut t = T::new();
    let first = cat(&[q("SELECT 'something long enough' FROM x"), q("SELECT 1 FROM y")]);
    t.s(1, &first[7..]);
    t.c(2, &cat(&[complete("SELECT 1"), ready(), complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].collection.as_deref(), Some("y"));
    assert!(calls[0].approximate);
}

#[test]
fn garbage_never_panics_or_emits() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
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
            t.conn.feed(chunk(dir, &data, total, k), &mut t.out);
        }
        t.conn.close(100, &mut t.out);
        assert!(t.calls().is_empty());
    }
}

#[test]
fn queue_overflow_is_counted_and_recovers() {
    let mut t = T::new();
    let n = 1100;
    let reqs: Vec<u8> = (0..n).flat_map(|_| q("SELECT 1")).collect();
    let resps: Vec<u8> = (0..n).flat_map(|_| cat(&[complete("SELECT 1"), ready()])).collect();
    t.s(1, &reqs).c(2, &resps);
    assert_eq!(t.calls().len(), 1024);
    assert_eq!(t.conn.stats().dropped, (n - 1024) as u64);
    t.s(3, &q("SELECT 2 FROM z")).c(4, &cat(&[complete("SELECT 1"), ready()]));
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].collection.as_deref(), Some("z"));
}

#[test]
fn close_flushes_outstanding() {
    let mut t = T::new();
    t.s(1, &q("SELECT pg_sleep(100)"));
    t.conn.close(50, &mut t.out);
    let calls = t.calls();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].approximate);
    assert_eq!((calls[0].start_ns, calls[0].end_ns), (1, 50));
}

#[test]
fn detection_helpers() {
    assert!(looks_like_postgres_startup(&startup(&[("user", "u")])));
    assert!(looks_like_postgres_startup(&special(80_877_103)));
    assert!(looks_like_postgres_startup(&startup(&[("user", "u"), ("database", "d")])[..12]));
    assert!(!looks_like_postgres_startup(b"GET / HTTP/1.1\r\n"));
    assert!(!looks_like_postgres_startup(&q("SELECT 1")));
    assert!(looks_like_postgres_frontend(&q("SELECT 1")));
    assert!(looks_like_postgres_frontend(&cat(&[parse("", "SELECT 1"), bind("", "", &[]), execute("", 0), sync()])));
    assert!(!looks_like_postgres_frontend(&sync()));
    assert!(!looks_like_postgres_frontend(b"*1\r\n$4\r\nPING\r\n"));
    assert!(!looks_like_postgres_frontend(b"GET / HTTP/1.1\r\n"));
}
