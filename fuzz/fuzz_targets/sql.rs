#![no_main]
use libfuzzer_sys::fuzz_target;
use waybill_protocols::sql;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let r = sql::redact(&text);
    // Redaction is idempotent and never lengthens beyond what collapsing allows.
    assert_eq!(sql::redact(&r), r, "not idempotent for {text:?}");
    let _ = sql::describe(&text);
    for s in sql::split_statements(&text) {
        let _ = sql::describe(s);
    }
});
