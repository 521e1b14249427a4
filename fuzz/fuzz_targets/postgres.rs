#![no_main]
use libfuzzer_sys::fuzz_target;
use waybill_protocols::db::PgConn;

fuzz_target!(|data: &[u8]| {
    let mut conn = PgConn::new();
    let mut out = Vec::new();
    let pieces = waybill_protocols_fuzz::pieces(data);
    for p in &pieces {
        conn.feed(p.chunk(), &mut out);
    }
    conn.close(u64::MAX / 2, &mut out);
    for c in &out {
        assert!(c.end_ns >= c.start_ns);
    }
    let _ = conn.stats();
    let _ = waybill_protocols::db::looks_like_postgres_startup(data);
    let _ = waybill_protocols::db::looks_like_postgres_frontend(data);
});
