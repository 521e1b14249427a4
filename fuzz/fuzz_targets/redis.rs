#![no_main]
use libfuzzer_sys::fuzz_target;
use waybill_protocols::db::RedisConn;

fuzz_target!(|data: &[u8]| {
    let mut conn = RedisConn::new();
    let mut out = Vec::new();
    for p in &waybill_protocols_fuzz::pieces(data) {
        conn.feed(p.chunk(), &mut out);
    }
    conn.close(u64::MAX / 2, &mut out);
    for c in &out {
        assert!(c.end_ns >= c.start_ns);
        // Every argument is redacted: a query text is a command name and placeholders.
        if let Some(t) = &c.query_text {
            assert!(
                t.split(' ').skip(1).all(|w| w == "?"
                    || w == "…"
                    || w.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')),
                "{t}"
            );
        }
    }
    let _ = waybill_protocols::db::looks_like_resp(data);
});
