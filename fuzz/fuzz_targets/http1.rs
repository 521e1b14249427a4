#![no_main]
use libfuzzer_sys::fuzz_target;
use waybill_protocols::http1::Http1Conn;

fuzz_target!(|data: &[u8]| {
    let mut conn = Http1Conn::new();
    let mut out = Vec::new();
    for p in &waybill_protocols_fuzz::pieces(data) {
        conn.feed(p.chunk(), &mut out);
    }
    conn.close(u64::MAX / 2, &mut out);
    let _ = conn.stats();
    let _ = waybill_protocols::http1::looks_like_request(data);
    let _ = waybill_protocols::http1::looks_like_response(data);
});
