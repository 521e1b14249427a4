//! Table-driven behaviour tests of the HTTP/1.x parser, through its public API.

use waybill_protocols::http1::*;
use waybill_protocols::{Chunk, FlowDir};

const C: FlowDir = FlowDir::ToServer;
const S: FlowDir = FlowDir::ToClient;

/// One syscall: direction, captured bytes, bytes really transferred, timestamp.
#[derive(Clone)]
struct Step {
    dir: FlowDir,
    data: Vec<u8>,
    total: usize,
    ts: u64,
}

fn st(dir: FlowDir, data: &[u8], ts: u64) -> Step {
    Step { dir, data: data.to_vec(), total: data.len(), ts }
}

/// A chunk of which only `data` was captured out of `total` bytes.
fn tr(dir: FlowDir, data: &[u8], total: usize, ts: u64) -> Step {
    Step { dir, data: data.to_vec(), total, ts }
}

struct Run {
    out: Vec<HttpExchange>,
    conn: Http1Conn,
}

fn feed_all(steps: &[Step]) -> Run {
    let mut conn = Http1Conn::new();
    let mut out = Vec::new();
    for s in steps {
        conn.feed(Chunk { dir: s.dir, data: &s.data, total: s.total, ts_ns: s.ts }, &mut out);
    }
    Run { out, conn }
}

fn run_closed(steps: &[Step], close_ts: u64) -> Run {
    let mut r = feed_all(steps);
    r.conn.close(close_ts, &mut r.out);
    r
}

/// Split every step into single bytes (same ts); uncaptured bytes stay on the last piece.
fn bytewise(steps: &[Step]) -> Vec<Step> {
    let mut v = Vec::new();
    for s in steps {
        if s.data.is_empty() {
            v.push(s.clone());
            continue;
        }
        let n = s.data.len();
        for (i, &b) in s.data.iter().enumerate() {
            let total = if i + 1 == n { 1 + s.total - n } else { 1 };
            v.push(Step { dir: s.dir, data: vec![b], total, ts: s.ts });
        }
    }
    v
}

/// Split step `idx` at byte `at` (both pieces keep the step's ts).
fn split_at(steps: &[Step], idx: usize, at: usize) -> Vec<Step> {
    let mut v = steps.to_vec();
    let s = v.remove(idx);
    let rest_total = s.total - at;
    v.insert(idx, Step { dir: s.dir, data: s.data[at..].to_vec(), total: rest_total, ts: s.ts });
    v.insert(idx, Step { dir: s.dir, data: s.data[..at].to_vec(), total: at, ts: s.ts });
    v
}

fn req(method: &str, path: &str) -> HttpRequest {
    HttpRequest { method: method.to_string().into(), path: path.into(), version_minor: 1, ..Default::default() }
}

fn resp(status: u16) -> HttpResponse {
    HttpResponse { status, version_minor: 1, ..Default::default() }
}

fn ex(request: HttpRequest, response: Option<HttpResponse>, ts: [u64; 4]) -> HttpExchange {
    HttpExchange {
        request,
        response,
        request_start_ns: ts[0],
        request_end_ns: ts[1],
        response_start_ns: ts[2],
        response_end_ns: ts[3],
        approximate: false,
    }
}

fn approx(mut e: HttpExchange) -> HttpExchange {
    e.approximate = true;
    e
}

const GET_A: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
const GET_B: &[u8] = b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n";
const GET_C: &[u8] = b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n";
const OK_2: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const NF_0: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";

fn host(mut r: HttpRequest) -> HttpRequest {
    r.host = Some("h".into());
    r
}

fn ok2() -> HttpResponse {
    HttpResponse { content_length: Some(2), ..resp(200) }
}

fn nf0() -> HttpResponse {
    HttpResponse { content_length: Some(0), ..resp(404) }
}

#[test]
fn simple_get() {
    let steps = [st(C, GET_A, 10), st(S, OK_2, 20)];
    let r = feed_all(&steps);
    assert_eq!(r.out, vec![ex(host(req("GET", "/a")), Some(ok2()), [10, 10, 20, 20])]);
    assert_eq!(r.conn.in_flight(), 0);
    assert_eq!(r.conn.stats(), Http1Stats::default());
}

#[test]
fn request_targets_and_headers() {
    struct Case {
        head: &'static [u8],
        want: HttpRequest,
    }
    let cases = [
        Case {
            head: b"GET /search?q=rust&token=abc HTTP/1.1\r\nHost: example.com\r\n\r\n",
            want: HttpRequest {
                query: Some("q=rust&token=REDACTED".into()),
                host: Some("example.com".into()),
                ..req("GET", "/search")
            },
        },
        Case { head: b"GET /x? HTTP/1.0\r\n\r\n", want: HttpRequest { version_minor: 0, ..req("GET", "/x") } },
        Case {
            head: b"GET /p#frag HTTP/1.1\r\n\r\n",
            want: req("GET", "/p"),
        },
        Case {
            head: b"GET http://user:pw@proxy.test:8080/a/b?api_key=1 HTTP/1.1\r\n\r\n",
            want: HttpRequest {
                authority: Some("proxy.test:8080".into()),
                query: Some("api_key=REDACTED".into()),
                ..req("GET", "/a/b")
            },
        },
        Case {
            head: b"GET http://proxy.test HTTP/1.1\r\n\r\n",
            want: HttpRequest { authority: Some("proxy.test".into()), ..req("GET", "/") },
        },
        Case { head: b"OPTIONS * HTTP/1.1\r\n\r\n", want: req("OPTIONS", "*") },
        Case {
            head: b"CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n\r\n",
            want: HttpRequest {
                authority: Some("db.test:5432".into()),
                host: Some("db.test:5432".into()),
                ..req("CONNECT", "")
            },
        },
        Case {
            head: b"GET / HTTP/1.1\r\nHOST: A\r\nuser-AGENT:  curl/8 \r\nTraceParent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: a=1\r\nTRACESTATE: b=2\r\nX-Other: y\r\n\r\n",
            want: HttpRequest {
                host: Some("A".into()),
                user_agent: Some("curl/8".into()),
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                tracestate: Some("a=1,b=2".into()),
                ..req("GET", "/")
            },
        },
        Case {
            head: b"POST /u HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 0\r\n\r\n",
            want: HttpRequest { expect_continue: true, content_length: Some(0), ..req("POST", "/u") },
        },
        Case { head: b"PURGE /cache HTTP/1.1\n\n", want: req("PURGE", "/cache") },
        Case { head: b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", want: req("GET", "/caf\u{e9}") },
    ];
    for c in cases {
        let r = feed_all(&[st(C, c.head, 1), st(S, NF_0, 2)]);
        assert_eq!(r.out, vec![ex(c.want, Some(nf0()), [1, 1, 2, 2])], "{:?}", String::from_utf8_lossy(c.head));
        assert_eq!(r.conn.stats().parse_errors, 0);
    }
}

#[test]
fn content_length_bodies_split() {
    let steps = [
        st(C, b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123", 1),
        st(C, b"456", 2),
        st(C, b"789", 3),
        st(S, b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nab", 4),
        st(S, b"cde", 5),
    ];
    let want = vec![ex(
        HttpRequest { content_length: Some(10), ..req("POST", "/up") },
        Some(HttpResponse { content_length: Some(5), ..resp(201) }),
        [1, 3, 4, 5],
    )];
    assert_eq!(feed_all(&steps).out, want);
    assert_eq!(feed_all(&bytewise(&steps)).out, want);
}

#[test]
fn chunked_request_with_extensions_and_trailers() {
    let steps = [
        st(C, b"POST /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 1),
        st(C, b"4;name=v\r\nWiki\r\n", 2),
        st(C, b"5\r\npedia\r\n0\r\nX-Checksum: 1\r\n\r\n", 3),
        st(C, GET_B, 4),
        st(S, NF_0, 5),
        st(S, OK_2, 6),
    ];
    let want = vec![
        ex(HttpRequest { chunked: true, ..req("POST", "/c") }, Some(nf0()), [1, 3, 5, 5]),
        ex(host(req("GET", "/b")), Some(ok2()), [4, 4, 6, 6]),
    ];
    assert_eq!(feed_all(&steps).out, want);
    assert_eq!(feed_all(&bytewise(&steps)).out, want);
    for idx in 0..steps.len() {
        for at in 1..steps[idx].data.len() {
            assert_eq!(feed_all(&split_at(&steps, idx, at)).out, want, "step {idx} split at {at}");
        }
    }
}

#[test]
fn keep_alive_sequence() {
    let steps = [st(C, GET_A, 1), st(S, OK_2, 2), st(C, GET_B, 3), st(S, NF_0, 4), st(C, GET_C, 5), st(S, OK_2, 6)];
    let want = vec![
        ex(host(req("GET", "/a")), Some(ok2()), [1, 1, 2, 2]),
        ex(host(req("GET", "/b")), Some(nf0()), [3, 3, 4, 4]),
        ex(host(req("GET", "/c")), Some(ok2()), [5, 5, 6, 6]),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out, want);
    assert_eq!(r.conn.in_flight(), 0);
    assert_eq!(feed_all(&bytewise(&steps)).out, want);
}

#[test]
fn exchanges_are_emitted_as_soon_as_complete() {
    let mut conn = Http1Conn::new();
    let mut out = Vec::new();
    conn.feed(Chunk { dir: C, data: GET_A, total: GET_A.len(), ts_ns: 1 }, &mut out);
    assert_eq!(conn.in_flight(), 1);
    conn.feed(Chunk { dir: S, data: &OK_2[..OK_2.len() - 1], total: OK_2.len() - 1, ts_ns: 2 }, &mut out);
    assert!(out.is_empty());
    conn.feed(Chunk { dir: S, data: b"k", total: 1, ts_ns: 3 }, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(conn.in_flight(), 0);
}

#[test]
fn pipelining() {
    let mut reqs = GET_A.to_vec();
    reqs.extend_from_slice(b"HEAD /b HTTP/1.1\r\n\r\nPOST /c HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz");
    let mut resps = OK_2.to_vec();
    resps.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
    resps.extend_from_slice(NF_0);
    let steps = [st(C, &reqs, 1), st(S, &resps, 2)];
    let want = vec![
        ex(host(req("GET", "/a")), Some(ok2()), [1, 1, 2, 2]),
        ex(req("HEAD", "/b"), Some(HttpResponse { content_length: Some(1000), ..resp(200) }), [1, 1, 2, 2]),
        ex(HttpRequest { content_length: Some(3), ..req("POST", "/c") }, Some(nf0()), [1, 1, 2, 2]),
    ];
    assert_eq!(feed_all(&steps).out, want);
    for idx in 0..2 {
        for at in 1..steps[idx].data.len() {
            assert_eq!(feed_all(&split_at(&steps, idx, at)).out, want, "step {idx} split at {at}");
        }
    }
    // Responses interleaved with later requests.
    let steps2 = [st(C, &reqs, 1), st(S, OK_2, 2), st(S, &resps[OK_2.len()..], 3)];
    let got = feed_all(&steps2).out;
    assert_eq!(got.len(), 3);
    assert_eq!((got[0].response_end_ns, got[1].response_start_ns), (2, 3));
}

#[test]
fn request_body_larger_than_capture() {
    let head = b"POST /big HTTP/1.1\r\nContent-Length: 100000\r\n\r\n";
    let mut first = head.to_vec();
    first.extend_from_slice(&[b'x'; 100]);
    let steps = [
        tr(C, &first, head.len() + 60_000, 1),
        tr(C, b"", 39_000, 2),
        tr(C, &[b'y'; 10], 1_000, 3),
        st(C, GET_B, 4),
        st(S, b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\n", 5),
        tr(S, b"to", 4, 5),
        st(S, OK_2, 6),
    ];
    let want = vec![
        ex(
            HttpRequest { content_length: Some(100_000), ..req("POST", "/big") },
            Some(HttpResponse { content_length: Some(4), ..resp(413) }),
            [1, 3, 5, 5],
        ),
        ex(host(req("GET", "/b")), Some(ok2()), [4, 4, 6, 6]),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out, want);
    assert_eq!(r.conn.stats(), Http1Stats::default());
}

#[test]
fn response_body_larger_than_capture() {
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n";
    let mut first = head.to_vec();
    first.extend_from_slice(&[0u8; 4000]);
    let steps = [
        st(C, GET_A, 1),
        tr(S, &first, 65_536, 2),
        tr(S, &[0u8; 4096], 65_536 * 14, 3),
        tr(S, &[0u8; 4096], 65_536 + head.len(), 4),
        st(C, GET_B, 5),
        st(S, OK_2, 6),
    ];
    let want = vec![
        ex(host(req("GET", "/a")), Some(HttpResponse { content_length: Some(1_048_576), ..resp(200) }), [1, 1, 2, 4]),
        ex(host(req("GET", "/b")), Some(ok2()), [5, 5, 6, 6]),
    ];
    assert_eq!(feed_all(&steps).out, want);
}

#[test]
fn huge_total_is_only_arithmetic() {
    let steps = [
        st(C, GET_A, 1),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n", 2),
        tr(S, b"abc", 1 << 39, 3),
        tr(S, b"", 1 << 39, 4),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 1);
    assert_eq!(r.out[0].response_end_ns, 4);
    // An absurd chunk size in a chunked body is only a counter too.
    let steps = [
        st(C, GET_A, 1),
        st(S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffff\r\n", 2),
        tr(S, b"", usize::MAX / 2, 3),
    ];
    let r = feed_all(&steps);
    assert!(r.out.is_empty());
    assert_eq!(r.conn.in_flight(), 1);
}

#[test]
fn interim_responses_are_skipped() {
    let steps = [
        st(C, b"PUT /f HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n", 1),
        st(S, b"HTTP/1.1 100 Continue\r\n\r\n", 2),
        st(C, b"data", 3),
        st(S, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n", 4),
        st(S, b"HTTP/1.1 204 No Content\r\n\r\n", 5),
        st(C, GET_B, 6),
        st(S, OK_2, 7),
    ];
    let want = vec![
        ex(
            HttpRequest { content_length: Some(4), expect_continue: true, ..req("PUT", "/f") },
            Some(resp(204)),
            [1, 3, 5, 5],
        ),
        ex(host(req("GET", "/b")), Some(ok2()), [6, 6, 7, 7]),
    ];
    assert_eq!(feed_all(&steps).out, want);
    assert_eq!(feed_all(&bytewise(&steps)).out, want);
}

#[test]
fn bodiless_responses() {
    // HEAD, 204 and 304 carry no body even with Content-Length / Transfer-Encoding.
    let steps = [
        st(C, b"HEAD /a HTTP/1.1\r\n\r\n", 1),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", 2),
        st(C, b"GET /b HTTP/1.1\r\nIf-None-Match: \"x\"\r\n\r\n", 3),
        st(S, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 500\r\n\r\n", 4),
        st(C, b"DELETE /c HTTP/1.1\r\n\r\n", 5),
        st(S, b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", 6),
        st(C, GET_A, 7),
        st(S, OK_2, 8),
    ];
    let want = vec![
        ex(req("HEAD", "/a"), Some(HttpResponse { content_length: Some(500), ..resp(200) }), [1, 1, 2, 2]),
        ex(req("GET", "/b"), Some(HttpResponse { content_length: Some(500), ..resp(304) }), [3, 3, 4, 4]),
        ex(req("DELETE", "/c"), Some(HttpResponse { chunked: true, ..resp(204) }), [5, 5, 6, 6]),
        ex(host(req("GET", "/a")), Some(ok2()), [7, 7, 8, 8]),
    ];
    assert_eq!(feed_all(&steps).out, want);
}

#[test]
fn close_delimited_response() {
    let steps = [
        st(C, b"GET /old HTTP/1.0\r\n\r\n", 1),
        st(S, b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nhello ", 2),
        tr(S, b"wor", 5000, 3),
    ];
    let r = feed_all(&steps);
    assert!(r.out.is_empty());
    assert_eq!(r.conn.in_flight(), 1);
    let r = run_closed(&steps, 9);
    let want = vec![ex(
        HttpRequest { version_minor: 0, ..req("GET", "/old") },
        Some(HttpResponse { version_minor: 0, ..resp(200) }),
        [1, 1, 2, 3],
    )];
    assert_eq!(r.out, want);
    // Transfer-Encoding without chunked on a response also means "until close".
    let steps = [st(C, GET_A, 1), st(S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz", 2)];
    let r = run_closed(&steps, 3);
    assert_eq!(r.out[0].response_end_ns, 2);
    assert!(!r.out[0].approximate);
}

const CHUNKED_RESP: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nMozilla\r\n9;x=y\r\nDeveloper\r\n7\r\nNetwork\r\n0\r\nExpires: never\r\n\r\n";

fn chunked_resp() -> HttpResponse {
    HttpResponse { chunked: true, ..resp(200) }
}

#[test]
fn chunked_response_every_split() {
    let steps = [st(C, GET_A, 1), st(S, CHUNKED_RESP, 2), st(C, GET_B, 3), st(S, OK_2, 4)];
    let want = vec![
        ex(host(req("GET", "/a")), Some(chunked_resp()), [1, 1, 2, 2]),
        ex(host(req("GET", "/b")), Some(ok2()), [3, 3, 4, 4]),
    ];
    assert_eq!(feed_all(&steps).out, want);
    assert_eq!(feed_all(&bytewise(&steps)).out, want);
    for at in 1..CHUNKED_RESP.len() {
        let split = split_at(&steps, 1, at);
        assert_eq!(feed_all(&split).out, want, "split at {at}");
    }
    // Last chunk split from the rest with a later ts: the response ends there.
    let mut split = split_at(&steps, 1, CHUNKED_RESP.len() - 5);
    split[2].ts = 2;
    split[2].ts += 1;
    let r = feed_all(&split[..3]);
    assert_eq!(r.out[0].response_end_ns, 3);
}

#[test]
fn lost_chunked_framing_resyncs_on_status_line() {
    // The first chunk claims 0x4000 bytes, but the syscall carried several chunks: framing lost.
    let mut first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n".to_vec();
    first.extend_from_slice(&[b'a'; 200]);
    let steps = [
        st(C, GET_A, 1),
        st(C, GET_B, 2), // pipelined
        tr(S, &first, 20_000, 3),
        tr(S, b"garbage", 9_000, 4),
        st(S, OK_2, 5),
    ];
    let r = feed_all(&steps);
    let want = vec![
        approx(ex(host(req("GET", "/a")), Some(chunked_resp()), [1, 1, 3, 4])),
        ex(host(req("GET", "/b")), Some(ok2()), [2, 2, 5, 5]),
    ];
    assert_eq!(r.out, want);
    assert_eq!(r.conn.stats().resyncs, 1);
    assert_eq!(r.conn.stats().parse_errors, 0);
}

#[test]
fn lost_chunked_framing_ends_on_last_chunk() {
    let mut first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n".to_vec();
    first.extend_from_slice(&[b'a'; 16]);
    let steps =
        [st(C, GET_A, 1), tr(S, &first, 70_000, 2), tr(S, b"zzzz", 5_000, 3), st(S, b"tail of data\r\n0\r\n\r\n", 4)];
    let r = feed_all(&steps);
    assert_eq!(r.out, vec![approx(ex(host(req("GET", "/a")), Some(chunked_resp()), [1, 1, 2, 4]))]);
    // The stream is at a boundary again.
    let mut steps = steps.to_vec();
    steps.push(st(C, GET_B, 5));
    steps.push(st(S, OK_2, 6));
    assert_eq!(feed_all(&steps).out[1], ex(host(req("GET", "/b")), Some(ok2()), [5, 5, 6, 6]));
}

#[test]
fn lost_response_ends_when_client_sends_next_request() {
    let first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789";
    let steps = [st(C, GET_A, 1), tr(S, first, 50_000, 2), tr(S, b"more", 10_000, 3), st(C, GET_B, 4)];
    let r = feed_all(&steps);
    assert_eq!(r.out, vec![approx(ex(host(req("GET", "/a")), Some(chunked_resp()), [1, 1, 2, 3]))]);
    // The rest of that body is skipped; the next status line answers /b.
    let mut steps = steps.to_vec();
    steps.push(tr(S, b"rest of body", 3_000, 5));
    steps.push(st(S, NF_0, 6));
    let r = feed_all(&steps);
    assert_eq!(r.out[1], ex(host(req("GET", "/b")), Some(nf0()), [4, 4, 6, 6]));
}

#[test]
fn lost_chunked_request_framing() {
    let mut first = b"POST /stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n".to_vec();
    first.extend_from_slice(&[b'q'; 100]);
    let steps = [tr(C, &first, 40_000, 1), tr(C, b"qqqq", 4_000, 2), st(S, NF_0, 3), st(C, GET_B, 4), st(S, OK_2, 5)];
    let want = vec![
        approx(ex(HttpRequest { chunked: true, ..req("POST", "/stream") }, Some(nf0()), [1, 2, 3, 3])),
        ex(host(req("GET", "/b")), Some(ok2()), [4, 4, 5, 5]),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out, want);
}

#[test]
fn stream_joined_mid_message() {
    // The agent attached while a body was flowing in both directions.
    let steps = [
        st(C, b"y\": 1}", 1),
        st(C, b"\r\n", 2),
        st(S, b"tail of an old response", 3),
        st(S, OK_2, 4), // answers a request we never saw
        st(C, GET_A, 5),
        st(S, NF_0, 6),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out, vec![ex(host(req("GET", "/a")), Some(nf0()), [5, 5, 6, 6])]);
    let stats = r.conn.stats();
    assert_eq!(stats.parse_errors, 0);
    assert_eq!(stats.orphan_responses, 1);
    assert_eq!(stats.resyncs, 2);
}

#[test]
fn first_chunk_may_be_a_prefix_of_a_start_line() {
    let steps = [st(C, b"G", 1), st(C, &GET_A[1..], 2), st(S, b"HTT", 3), st(S, &OK_2[3..], 4)];
    let r = feed_all(&steps);
    assert_eq!(r.out, vec![ex(host(req("GET", "/a")), Some(ok2()), [1, 2, 3, 4])]);
    // …but a prefix that turns out not to be one is skipped quietly.
    let steps = [st(C, b"GE", 1), st(C, b"NERAL KENOBI\r\n\r\n", 2), st(C, GET_A, 3), st(S, OK_2, 4)];
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 1);
    assert_eq!(r.conn.stats().parse_errors, 0);
}

#[test]
fn long_garbage_without_newline_is_rejected_early() {
    let blob = vec![b'x'; 10_000];
    // Tentative start ("P" could begin POST), then a long line that is no request line.
    let steps = [st(C, b"P", 1), st(C, &blob, 2), st(C, GET_A, 3), st(S, OK_2, 4)];
    let r = feed_all(&steps);
    assert_eq!(r.out, vec![ex(host(req("GET", "/a")), Some(ok2()), [3, 3, 4, 4])]);
    assert_eq!(r.conn.stats().parse_errors, 0);
    // At a known boundary: one parse error, and the blob is not buffered as a head.
    let mut long = b"GET /".to_vec();
    long.extend_from_slice(&blob);
    let steps = [st(C, GET_A, 1), st(S, OK_2, 2), st(C, b"GE", 3), st(C, b"Tx", 4), st(C, &blob, 5), st(C, &long, 6)];
    let r = run_closed(&steps, 7);
    assert_eq!(r.conn.stats().parse_errors, 1);
    assert_eq!(r.conn.stats().resyncs, 1);
    // The last chunk does start a request; cut off by the close, it is flushed as truncated.
    assert_eq!(r.out.len(), 2);
    assert!(r.out[1].request.head_truncated && r.out[1].response.is_none());
    // A 10 kB request line is fine though (cut to what a field may hold).
    let mut line = b"GET /".to_vec();
    line.extend_from_slice(&blob);
    line.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let r = feed_all(&[st(C, &line, 1), st(S, OK_2, 2)]);
    assert_eq!(r.out.len(), 1);
    assert_eq!(r.out[0].request.path.len(), MAX_FIELD_BYTES);
    assert_eq!(r.out[0].request.version_minor, 1);
}

#[test]
fn garbage_at_boundary_is_a_parse_error() {
    let steps = [
        st(C, GET_A, 1),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK JUNK\r\n\r\n", 2),
        st(S, b"more junk", 3),
        st(C, GET_B, 4),
        st(S, OK_2, 5),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 2);
    assert_eq!(r.out[1].request.path, "/b");
    assert_eq!(r.conn.stats().parse_errors, 1);
    assert_eq!(r.conn.stats().resyncs, 1);
}

#[test]
fn garbage_never_makes_exchanges() {
    let junk: [&[u8]; 8] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\nb\r\n",
        b"\0\0\0\x08\x04\xd2\x16\x2f",
        b"\r\n\r\n\r\n",
        b"GET\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"hello world",
    ];
    for j in junk {
        for dir in [C, S] {
            let r = run_closed(&[st(dir, j, 1), st(C, j, 2), st(S, j, 3)], 4);
            assert!(r.out.is_empty(), "{:?}", String::from_utf8_lossy(j));
        }
    }
}

/// Deterministic xorshift for the no-panic sweep.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutated_streams_never_panic() {
    let base: Vec<Step> = vec![
        st(C, b"POST /c?x=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n", 1),
        st(S, b"HTTP/1.1 100 Continue\r\n\r\n", 2),
        st(C, b"4\r\nWiki\r\n0\r\n\r\nHEAD / HTTP/1.1\r\n\r\n", 3),
        st(S, CHUNKED_RESP, 4),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 5),
        st(C, b"CONNECT a:1 HTTP/1.1\r\n\r\n", 6),
        st(S, b"HTTP/1.0 200 OK\r\n\r\n", 7),
    ];
    // WAYBILL_MUTATION_ITERS / WAYBILL_MUTATION_SEED widen the sweep when run by hand.
    let iters = std::env::var("WAYBILL_MUTATION_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let seed =
        std::env::var("WAYBILL_MUTATION_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut rng = Rng(seed);
    for _ in 0..iters {
        let mut steps = base.clone();
        for _ in 0..1 + rng.below(6) {
            let i = rng.below(steps.len());
            let op = rng.below(5);
            if op == 3 {
                let j = rng.below(steps.len());
                steps.swap(i, j);
                continue;
            }
            let s = &mut steps[i];
            match op {
                0 if !s.data.is_empty() => {
                    let p = rng.below(s.data.len());
                    s.data[p] = rng.next() as u8;
                }
                1 => {
                    let keep = rng.below(s.data.len() + 1);
                    s.data.truncate(keep);
                }
                2 => s.total += rng.below(100_000),
                _ => {
                    let n = rng.below(40);
                    let bytes: Vec<u8> = (0..n).map(|_| b"\r\n0123456789abcdefHTTP/1. GET;:"[rng.below(30)]).collect();
                    s.data.extend_from_slice(&bytes);
                    s.total = s.total.max(s.data.len());
                }
            }
            s.total = s.total.max(s.data.len());
        }
        for (k, s) in steps.iter_mut().enumerate() {
            s.ts = k as u64 + 1;
        }
        // Mutations may well write new request lines; count what could be one.
        let gets: usize = steps.iter().map(|s| s.data.windows(5).filter(|w| w == b"GET /").count()).sum();
        for r in [run_closed(&steps, 99), run_closed(&bytewise(&steps), 99)] {
            let dump = || {
                steps
                    .iter()
                    .map(|s| format!("{:?} {} {:?}\n", s.dir, s.total, String::from_utf8_lossy(&s.data)))
                    .collect::<String>()
            };
            assert!(r.out.len() <= 3 + gets, "{}{:#?}", dump(), r.out);
            assert_eq!(r.conn.in_flight(), 0);
            for e in &r.out {
                // Any method token is taken at a known boundary (a mutation may make `CONNEAT`).
                let m = &e.request.method;
                assert!(
                    !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_'),
                    "{}{e:#?}",
                    dump()
                );
                assert!(e.request_start_ns <= e.request_end_ns, "{}{e:#?}", dump());
                if e.response.is_some() {
                    assert!(e.request_start_ns <= e.response_start_ns, "{}{e:#?}", dump());
                    assert!(e.response_start_ns <= e.response_end_ns, "{}{e:#?}", dump());
                }
            }
        }
    }
}

#[test]
fn in_flight_is_bounded_and_pairing_survives_drops() {
    let mut steps = Vec::new();
    for i in 0..70u64 {
        steps.push(st(C, format!("GET /r{i} HTTP/1.1\r\n\r\n").as_bytes(), i + 1));
    }
    let r = feed_all(&steps);
    assert_eq!(r.conn.in_flight(), MAX_IN_FLIGHT);
    assert_eq!(r.conn.stats().dropped_requests, 6);
    // Responses for all 70 arrive; the 6 for dropped requests are discarded.
    for i in 0..70u64 {
        steps.push(st(
            S,
            format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-I: {i}\r\n\r\n{}", i % 10).as_bytes(),
            100 + i,
        ));
    }
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 64);
    for (k, e) in r.out.iter().enumerate() {
        let i = k as u64 + 6;
        assert_eq!(e.request.path, format!("/r{i}"));
        assert_eq!(e.response_start_ns, 100 + i);
    }
    assert_eq!(r.conn.in_flight(), 0);
}

#[test]
fn oversized_head_is_truncated_but_framed() {
    let mut head = b"POST /big-head HTTP/1.1\r\nContent-Length: 3\r\nUser-Agent: ua\r\n".to_vec();
    for i in 0..600 {
        head.extend_from_slice(format!("X-Filler-{i:04}: {}\r\n", "v".repeat(20)).as_bytes());
    }
    assert!(head.len() > MAX_HEAD_BYTES);
    head.extend_from_slice(b"\r\nabc");
    head.extend_from_slice(GET_B);
    let steps = [st(C, &head, 1), st(S, NF_0, 2), st(S, OK_2, 3)];
    let want = vec![
        ex(
            HttpRequest {
                content_length: Some(3),
                user_agent: Some("ua".into()),
                head_truncated: true,
                ..req("POST", "/big-head")
            },
            Some(nf0()),
            [1, 1, 2, 2],
        ),
        ex(host(req("GET", "/b")), Some(ok2()), [1, 1, 3, 3]),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out, want);
    assert_eq!(r.conn.stats(), Http1Stats::default());
    // Same, split in 1000-byte syscalls.
    let mut split = Vec::new();
    for piece in head.chunks(1000) {
        split.push(st(C, piece, 1));
    }
    split.push(st(S, NF_0, 2));
    split.push(st(S, OK_2, 3));
    assert_eq!(feed_all(&split).out, want);
}

#[test]
fn head_cut_by_capture_window() {
    // The client wrote 9000 bytes of head (big cookie), only 60 were captured.
    let captured = b"GET /profile?session=abc HTTP/1.1\r\nHost: app\r\nCookie: aaaa";
    let steps = [tr(C, captured, 9_000, 1), st(S, OK_2, 2), st(C, GET_B, 3), st(S, NF_0, 4)];
    let want = vec![
        ex(
            HttpRequest {
                query: Some("session=REDACTED".into()),
                host: Some("app".into()),
                head_truncated: true,
                ..req("GET", "/profile")
            },
            Some(ok2()),
            [1, 1, 2, 2],
        ),
        ex(host(req("GET", "/b")), Some(nf0()), [3, 3, 4, 4]),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out, want);
    assert_eq!(r.conn.stats().parse_errors, 0);

    // Cut inside the request line: method and the captured part of the path survive.
    let steps = [
        tr(C, b"POST /upload/fi", 70_000, 1),
        tr(C, b"body", 30_000, 2),
        st(C, GET_B, 3),
        st(S, NF_0, 4),
        st(S, OK_2, 5),
    ];
    let r = feed_all(&steps);
    let want = vec![
        approx(ex(HttpRequest { head_truncated: true, ..req("POST", "/upload/fi") }, Some(nf0()), [1, 2, 4, 4])),
        ex(host(req("GET", "/b")), Some(ok2()), [3, 3, 5, 5]),
    ];
    assert_eq!(r.out, want);

    // A response head cut by the window.
    let steps = [
        st(C, GET_A, 1),
        tr(S, b"HTTP/1.1 302 Found\r\nLocation: /x\r\nSet-Cookie: aaa", 20_000, 2),
        st(C, GET_B, 3),
        st(S, OK_2, 4),
    ];
    let r = feed_all(&steps);
    let want = vec![
        approx(ex(host(req("GET", "/a")), Some(HttpResponse { head_truncated: true, ..resp(302) }), [1, 1, 2, 2])),
        ex(host(req("GET", "/b")), Some(ok2()), [3, 3, 4, 4]),
    ];
    assert_eq!(r.out, want);
}

#[test]
fn close_flushes_unanswered_requests() {
    let steps = [
        st(C, GET_A, 1),
        st(C, b"POST /p HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345", 2),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", 3),
    ];
    let r = run_closed(&steps, 50);
    let want = vec![
        approx(ex(host(req("GET", "/a")), Some(HttpResponse { content_length: Some(9), ..resp(200) }), [1, 1, 3, 3])),
        approx(ex(HttpRequest { content_length: Some(10), ..req("POST", "/p") }, None, [2, 2, 0, 0])),
    ];
    assert_eq!(r.out, want);
    assert_eq!(r.conn.in_flight(), 0);
    // A head still being received at close is flushed as truncated.
    let r = run_closed(&[st(C, b"GET /half HTTP/1.1\r\nHost: h\r\nAcc", 7)], 8);
    assert_eq!(r.out, vec![ex(HttpRequest { head_truncated: true, ..host(req("GET", "/half")) }, None, [7, 7, 0, 0])]);
    // Nothing at all: nothing out.
    let r = run_closed(&[], 1);
    assert!(r.out.is_empty());
}

#[test]
fn close_resets_for_reuse() {
    let mut conn = Http1Conn::new();
    let mut out = Vec::new();
    conn.feed(Chunk { dir: C, data: b"junk junk", total: 9, ts_ns: 1 }, &mut out);
    conn.close(2, &mut out);
    conn.feed(Chunk { dir: C, data: GET_A, total: GET_A.len(), ts_ns: 3 }, &mut out);
    conn.feed(Chunk { dir: S, data: OK_2, total: OK_2.len(), ts_ns: 4 }, &mut out);
    assert_eq!(out.len(), 1);
}

#[test]
fn upgrade_and_connect_tunnel() {
    let steps = [
        st(C, b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1),
        st(S, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello", 2),
        st(C, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58", 3),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 4),
    ];
    let r = run_closed(&steps, 5);
    assert_eq!(r.out, vec![ex(host(req("GET", "/ws")), Some(resp(101)), [1, 1, 2, 2])]);
    assert_eq!(r.conn.stats(), Http1Stats::default());

    // CONNECT refused with 407 keeps HTTP going; accepted with 200 starts a tunnel.
    let steps = [
        st(C, b"CONNECT h:443 HTTP/1.1\r\n\r\n", 1),
        st(S, b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n", 2),
        st(C, b"CONNECT h:443 HTTP/1.1\r\nProxy-Authorization: Basic eA==\r\n\r\n", 3),
        st(S, b"HTTP/1.1 200 Connection established\r\n\r\n", 4),
        st(C, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 5),
        st(S, b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03", 6),
    ];
    let r = run_closed(&steps, 7);
    let connect = HttpRequest { authority: Some("h:443".into()), ..req("CONNECT", "") };
    let want = vec![
        ex(connect.clone(), Some(HttpResponse { content_length: Some(0), ..resp(407) }), [1, 1, 2, 2]),
        ex(connect, Some(resp(200)), [3, 3, 4, 4]),
    ];
    assert_eq!(r.out, want);
    assert_eq!(r.conn.stats(), Http1Stats::default());
}

#[test]
fn overdue_body_sent_without_capture() {
    // nginx: headers by writev, body by sendfile (not reported); the next response starts clean.
    let steps = [
        st(C, GET_A, 1),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", 2),
        st(C, GET_B, 3),
        st(S, OK_2, 4),
    ];
    let r = feed_all(&steps);
    let want = vec![
        approx(ex(
            host(req("GET", "/a")),
            Some(HttpResponse { content_length: Some(5000), ..resp(200) }),
            [1, 1, 2, 2],
        )),
        ex(host(req("GET", "/b")), Some(ok2()), [3, 3, 4, 4]),
    ];
    assert_eq!(r.out, want);
    assert_eq!(r.conn.stats().resyncs, 1);
    // Reported as an empty chunk with a total, the same body stays exact.
    let steps = [
        st(C, GET_A, 1),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", 2),
        tr(S, b"", 5000, 3),
        st(C, GET_B, 4),
        st(S, OK_2, 5),
    ];
    let r = feed_all(&steps);
    assert!(!r.out[0].approximate);
    assert_eq!(r.out[0].response_end_ns, 3);
    // Without a next request, a body that begins like a status line is still body.
    let steps = [
        st(C, GET_A, 1),
        st(S, b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: 38\r\n\r\n", 2),
        st(S, NF_0, 3),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out[0].response_end_ns, 3);
    assert!(!r.out[0].approximate);
    // Request body abandoned after a final response (expect-continue refused).
    let steps = [
        st(C, b"PUT /f HTTP/1.1\r\nContent-Length: 99\r\nExpect: 100-continue\r\n\r\n", 1),
        st(S, b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n", 2),
        st(C, GET_B, 3),
        st(S, OK_2, 4),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 2);
    assert!(r.out[0].approximate);
    assert_eq!(r.out[1].request.path, "/b");
}

#[test]
fn early_response_waits_for_request_body() {
    let steps = [
        st(C, b"POST /p HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc", 1),
        st(S, b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n", 2),
        st(C, b"def", 3),
    ];
    let r = feed_all(&steps[..2]);
    assert!(r.out.is_empty());
    let r = feed_all(&steps);
    assert_eq!(
        r.out,
        vec![ex(
            HttpRequest { content_length: Some(6), ..req("POST", "/p") },
            Some(HttpResponse { content_length: Some(0), ..resp(401) }),
            [1, 3, 2, 2],
        )]
    );
}

#[test]
fn framing_errors() {
    // Invalid Content-Length: counted, the request ends at the next request line.
    let steps = [
        st(C, b"POST /x HTTP/1.1\r\nContent-Length: 12abc\r\n\r\nbody", 1),
        st(C, GET_B, 2),
        st(S, NF_0, 3),
        st(S, OK_2, 4),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 2);
    assert!(r.out[0].approximate);
    assert_eq!(r.out[1].request.path, "/b");
    assert_eq!(r.conn.stats().parse_errors, 1);
    // Bad chunk size inside a chunked response.
    let steps = [
        st(C, GET_A, 1),
        st(S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nXYZ\r\n", 2),
        st(S, b"whatever", 3),
        st(C, GET_B, 4),
        st(S, OK_2, 5),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 2);
    assert_eq!((r.out[0].response_end_ns, r.out[0].approximate), (3, true));
    assert_eq!(r.conn.stats().parse_errors, 1);
    // A header line without a colon is counted but the request survives (its response pairs).
    let steps = [st(C, b"GET /h HTTP/1.1\r\nbogus line\r\n\r\n", 1), st(S, OK_2, 2)];
    let r = feed_all(&steps);
    assert_eq!(r.out, vec![ex(req("GET", "/h"), Some(ok2()), [1, 1, 2, 2])]);
    assert_eq!(r.conn.stats().parse_errors, 1);
}

#[test]
fn crlf_between_requests_is_tolerated() {
    let steps = [
        st(C, b"POST /a HTTP/1.1\r\nContent-Length: 1\r\n\r\nx\r\n", 1),
        st(C, b"\r\nGET /b HTTP/1.1\r\n\r\n", 2),
        st(S, NF_0, 3),
        st(S, OK_2, 4),
    ];
    let r = feed_all(&steps);
    assert_eq!(r.out.len(), 2);
    assert_eq!(r.conn.stats(), Http1Stats::default());
}

#[test]
fn detection() {
    let cases: &[(&[u8], bool, bool)] = &[
        (b"GET / HTTP/1.1\r\n", true, false),
        (b"GET /index.ht", true, false),
        (b"POST /api/v1/items HTTP/1.1\r\nHost: x\r\n\r\n", true, false),
        (b"OPTIONS * HTTP/1.1\r\n", true, false),
        (b"DELETE http://a/b HTTP/1.0\r\n", true, false),
        (b"GE", false, false),
        (b"GET ", false, false),
        (b"GET  /", false, false),
        (b"FOO / HTTP/1.1\r\n", false, false),
        (b"GET / HTTP/2.0\r\n", false, false),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false, false),
        (b"HTTP/1.1 200 OK\r\n", false, true),
        (b"HTTP/1.0 404", false, true),
        (b"HTTP/1.1 20", false, false),
        (b"HTTP/2 200", false, false),
        (b"HTTP/1.1 200 OK\r\n\r\n", false, true),
        (b"\x16\x03\x01", false, false),
        (b"", false, false),
    ];
    for (d, rq, rs) in cases {
        assert_eq!(looks_like_request(d), *rq, "request? {:?}", String::from_utf8_lossy(d));
        assert_eq!(looks_like_response(d), *rs, "response? {:?}", String::from_utf8_lossy(d));
    }
}

#[test]
fn route_templates() {
    let cases = [
        ("", "/"),
        ("/", "/"),
        ("*", "*"),
        ("/users/123", "/users/{id}"),
        ("/users/123/", "/users/{id}/"),
        ("/users/123?x=1", "/users/{id}"),
        ("/api/v1/orders/550e8400-e29b-41d4-a716-446655440000/items", "/api/v1/orders/{id}/items"),
        ("/blob/3f786850e387550fdab836ed7e6dc881de23001b", "/blob/{id}"),
        ("/commit/a1b2c3d4", "/commit/{id}"),
        ("/deadbeef", "/deadbeef"),
        ("/static/app.css", "/static/app.css"),
        ("/healthz", "/healthz"),
        ("/v2/", "/v2/"),
        ("/oauth2/callback", "/oauth2/callback"),
        ("/reports/2024-01-05", "/reports/{id}"),
        ("/t/01ARZ3NDEKTSV4RRFFQ69G5FAV", "/t/{id}"),
        ("/s/Ab3dEf7hIj9kLm1n", "/s/{id}"),
        ("/users/bob@example.com", "/users/{id}"),
        ("/app;jsessionid=ABC123/page", "/app/page"),
        ("/a//b", "/a//b"),
        ("/items/12/reviews/34", "/items/{id}/reviews/{id}"),
        ("/p#frag", "/p"),
    ];
    for (p, want) in cases {
        assert_eq!(path_template(p), want, "{p:?}");
    }
    let long = "/x".repeat(100);
    assert_eq!(path_template(&long).matches('/').count(), 32);
}

#[test]
fn known_methods_are_found_by_bytes() {
    for m in KNOWN_METHODS {
        assert_eq!(known_method(m.as_bytes()), Some(*m));
    }
    for m in [&b""[..], b"get", b"GETX", b"GE", b"BREW", b"PROPFINDX"] {
        assert_eq!(known_method(m), None, "{:?}", String::from_utf8_lossy(m));
    }
}

#[test]
fn strict_query_mode() {
    assert_eq!(redact_all_query_values("q=rust&page=2"), "q=?&page=?");
    assert_eq!(redact_query("q=rust&password=x"), "q=rust&password=REDACTED");
}
