//! The agent's user-space cost per HTTP request, without a kernel, a network or a timer in the
//! way: ring-buffer records of keep-alive HTTP/1.1 exchanges, laid out byte for byte as the
//! kernel side writes them (nginx serving a 615-byte page, as in `cargo xtask bench`), go
//! through the same code the event loop and the exporter run — decode, connection table and
//! HTTP parser, span building, RED histograms, OTLP protobuf encoding — in batches of 1024
//! requests (a drain's worth at a few thousand requests per second). A second kind of traffic,
//! a browser calling a JSON API (a 600-byte head with an incoming `traceparent`, a 2 KiB
//! response), shows how the cost grows with the heads ([`MIXES`]).
//!
//! Reports per request, for each stage: CPU time (thread CPU clock, median of the rounds) and
//! heap allocations (a counting wrapper around the agent's allocator, mimalloc). It is the floor
//! of what the live agent costs per request (which adds the ring-buffer reads, the wake-ups and
//! the gRPC send), and the number to watch when changing the hot path: it moves by a few
//! nanoseconds from run to run, where the live measurements of `cargo xtask bench` move by
//! hundreds on a noisy 2-CPU machine.
//!
//! Two conditions, rounds alternated: *warm*, batches of 1024 requests handled back to back; and
//! *cold*, the same work in steps of 16 requests with 8 MiB of other memory walked before each
//! step, as the traced server, the kernel and the load generator evict the agent's lines from
//! its CPU's caches between two of its time slices at a few thousand requests per second. The
//! live agent at such rates lies nearer the cold figure; at saturation nearer the warm one.
//!
//! Run: `cargo bench -p waybill --bench pipeline` (or `cargo xtask bench --only pipeline`, which
//! puts it in the report as table 7). `WAYBILL_PIPELINE_REQUESTS` sets the requests per round
//! (default 200 000), `WAYBILL_PIPELINE_MIX=nginx` runs one traffic kind (names by prefix), and
//! `WAYBILL_PIPELINE_WARM_ONLY=1` runs warm rounds in place of the cold ones. The last two make a
//! short, deterministic run for counting instructions, which this noisy machine's clocks cannot
//! compare to a few per cent (docs/performance.md, "Instructions per request"):
//! `WAYBILL_PIPELINE_MIX=nginx WAYBILL_PIPELINE_WARM_ONLY=1 WAYBILL_PIPELINE_REQUESTS=5000
//! valgrind --tool=callgrind target/release/deps/pipeline-*`.

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    sync::Arc,
};

use waybill::{
    clock::Clock,
    conn::{ConnTable, Finished},
    events::{Record, decode},
    export::{
        encode::Encoder,
        red::{DEFAULT_SERIES_LIMIT, Red, Tee},
    },
    metrics::Metrics,
    stitch::{Stitcher, span::SpanRecord},
};
use waybill_common::{
    AF_INET, ConnEvent, DIR_READ, DIR_WRITE, DataHeader, EventHeader, KIND_CONN, KIND_DATA, ROLE_SERVER, SYS_RECVFROM,
    SYS_WRITEV, Tuple,
};

/// Counts allocations (and reallocations) made through the agent's allocator, per thread (the
/// pipeline runs on one; a thread-local add costs less than an atomic one, so the counting
/// hardly shows in the times).
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static ALLOC_BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    ALLOCS.with(|c| c.set(c.get() + 1));
    ALLOC_BYTES.with(|c| c.set(c.get() + bytes as u64));
}

// SAFETY: forwards every call unchanged to mimalloc; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size());
        // SAFETY: the caller's contract is passed on.
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size());
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Connections the requests are spread over (round robin), like the bench's load generator.
const CONNS: u32 = 4;
/// Requests per batch: one drain's records, one `ship()`, one encoded request body.
const BATCH: usize = 1024;
/// One kind of traffic: what the server reads and writes for each request.
struct Mix {
    name: &'static str,
    /// The request head of request `n`.
    request: fn(u64) -> Vec<u8>,
    /// The response head; a body of `body` bytes follows it in the same `writev`.
    response_head: &'static str,
    body: usize,
}

/// The two kinds of traffic measured: what `cargo xtask bench` sends nginx (wrk's bare request,
/// nginx's 615-byte index page), and a browser calling a JSON API through a traced server: a
/// 600-byte head with cookies and an incoming `traceparent` (a new trace id per request), an id
/// in the path, a query, and a 2 KiB JSON response.
const MIXES: [Mix; 2] = [
    Mix {
        name: "nginx page",
        request: |_| b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n".to_vec(),
        response_head: "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 07:00:00 GMT\r\n\
            Content-Type: text/html\r\nContent-Length: 615\r\nLast-Modified: Fri, 04 Dec 2026 10:00:00 GMT\r\n\
            Connection: keep-alive\r\nETag: \"6751a4f0-267\"\r\nAccept-Ranges: bytes\r\n\r\n",
        body: 615,
    },
    Mix {
        name: "browser to JSON API",
        request: |n| {
            format!(
                "GET /api/orders/{n}?expand=items&page=2 HTTP/1.1\r\nHost: shop.example.com\r\n\
                 User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                 Chrome/131.0.0.0 Safari/537.36\r\nAccept: application/json, text/plain, */*\r\n\
                 Accept-Language: en-US,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\n\
                 Referer: https://shop.example.com/orders\r\nCookie: session=3f9a1c0e8b7d4a2f; theme=dark\r\n\
                 traceparent: 00-{:032x}-00f067aa0ba902b7-01\r\nConnection: keep-alive\r\n\r\n",
                0x4bf9_2f35_77b3_4da6_u128 << 64 | u128::from(n + 1)
            )
            .into_bytes()
        },
        response_head: "HTTP/1.1 200 OK\r\nDate: Sat, 05 Dec 2026 07:00:00 GMT\r\n\
            Content-Type: application/json; charset=utf-8\r\nContent-Length: 2048\r\nCache-Control: no-store\r\n\
            Vary: Accept-Encoding\r\nX-Request-Id: 7f3c2a90-5b1e-4c7d-9a2f-1e0d3c4b5a69\r\n\
            Strict-Transport-Security: max-age=31536000\r\nConnection: keep-alive\r\n\r\n",
        body: 2048,
    },
];

fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain #[repr(C)] record of integers, read as bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// A ring-buffer item: the record, padded to the 8-byte alignment the ring buffer gives it.
fn item(parts: &[&[u8]]) -> Vec<u8> {
    let mut v: Vec<u8> = parts.concat();
    v.resize(v.len().next_multiple_of(8), 0);
    v
}

fn header(kind: u32, pid: u32, ts_ns: u64) -> EventHeader {
    EventHeader { kind, tgid: pid, tid: pid, _pad: 0, ts_ns }
}

fn conn_record(pid: u32, fd: u32) -> Vec<u8> {
    let mut t = Tuple { family: AF_INET, lport: 18080, rport: 40000 + fd as u16, ..Default::default() };
    t.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    t.raddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    let ev = ConnEvent { hdr: header(KIND_CONN, pid, 1), fd, role: ROLE_SERVER, sk: 0xffff_0000 + fd as u64, tuple: t };
    item(&[bytes_of(&ev)])
}

fn data_record(pid: u32, fd: u32, dir: u32, syscall: u32, ts_ns: u64, payload: &[u8]) -> Vec<u8> {
    let head = DataHeader {
        hdr: header(KIND_DATA, pid, ts_ns),
        fd,
        dir,
        total: payload.len() as u64,
        captured: payload.len() as u32,
        syscall,
        sk: 0xffff_0000 + fd as u64,
    };
    item(&[bytes_of(&head), payload])
}

/// The records of `requests` requests of `mix` from request `first` on: for each request, the
/// server's read of the request and its `writev` of head and body, connections taken in turn.
/// Timestamps move on 50 µs per request.
fn batch_records(mix: &Mix, pid: u32, first: u64, requests: usize) -> Vec<Vec<u8>> {
    let response = [mix.response_head.as_bytes(), &vec![b'x'; mix.body]].concat();
    let mut out = Vec::with_capacity(2 * requests);
    for i in 0..requests as u64 {
        let n = first + i;
        let fd = 10 + (n % CONNS as u64) as u32;
        let ts = 1_000_000_000 + n * 50_000;
        out.push(data_record(pid, fd, DIR_READ, SYS_RECVFROM, ts, &(mix.request)(n)));
        out.push(data_record(pid, fd, DIR_WRITE, SYS_WRITEV, ts + 20_000, &response));
    }
    out
}

/// Thread CPU time in nanoseconds.
fn cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer for the calling thread's CPU clock.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time and allocations of one stage, summed over a round.
#[derive(Default, Clone, Copy)]
struct Cost {
    ns: u64,
    allocs: u64,
    bytes: u64,
}

fn measure<R>(cost: &mut Cost, f: impl FnOnce() -> R) -> R {
    let (a0, b0, t0) = (ALLOCS.with(Cell::get), ALLOC_BYTES.with(Cell::get), cpu_ns());
    let r = f();
    cost.ns += cpu_ns() - t0;
    cost.allocs += ALLOCS.with(Cell::get) - a0;
    cost.bytes += ALLOC_BYTES.with(Cell::get) - b0;
    r
}

const STAGES: [&str; 4] =
    ["decode + connection table + HTTP parse", "span building (stitcher)", "RED histograms", "OTLP protobuf encoding"];

/// The agent's state that lives from record to record.
struct Agent {
    pid: u32,
    metrics: Metrics,
    conns: ConnTable,
    stitcher: Stitcher,
    tee: Tee,
    encoder: Encoder,
    finished: Vec<Finished>,
    /// Requests fed so far (their records' timestamps follow from it).
    next: u64,
    body_bytes: usize,
}

impl Agent {
    fn new() -> Agent {
        let mut a = Agent {
            pid: std::process::id(),
            metrics: Metrics::default(),
            conns: ConnTable::new(65_536, u64::MAX),
            stitcher: Stitcher::new(Clock::new()),
            tee: Tee { red: Arc::new(Red::new(DEFAULT_SERIES_LIMIT, Arc::default())), ratio: None },
            encoder: Encoder::new(Some("bench-host".into())),
            finished: Vec::new(),
            next: 0,
            body_bytes: 0,
        };
        for fd in 10..10 + CONNS {
            if let Some(Record::Conn(ev)) = decode(&conn_record(a.pid, fd)) {
                a.conns.on_conn(&ev, &a.metrics, &mut a.finished);
            }
        }
        a
    }

    /// Stages 0 and 1 for `records`: spans appended to `spans`.
    fn parse(&mut self, records: &[Vec<u8>], spans: &mut Vec<SpanRecord>, cost: &mut [Cost; 4]) {
        // The event loop hands each record's finished exchanges to the stitcher at once; here
        // a batch's go together, so the clock is read per stage, not per record.
        measure(&mut cost[0], || {
            for rec in records {
                match decode(rec) {
                    Some(Record::Data { head, payload, .. }) => {
                        self.conns.on_data(&head, payload, &self.metrics, &mut self.finished)
                    }
                    _ => panic!("bench record did not decode"),
                }
            }
        });
        measure(&mut cost[1], || {
            for f in self.finished.drain(..) {
                if let Some(s) = self.stitcher.span(f, &self.metrics) {
                    spans.push(s);
                }
            }
        });
    }

    /// Stages 2 and 3: what `ship()` and the exporter do with a batch of spans.
    fn ship(&mut self, spans: &mut Vec<SpanRecord>, cost: &mut [Cost; 4]) {
        measure(&mut cost[2], || self.tee.pass(spans));
        let body = measure(&mut cost[3], || self.encoder.encode(spans));
        self.body_bytes = body.len();
        assert_eq!(spans.len(), BATCH, "every request must make one span");
        // As the exporter does once a batch is encoded.
        waybill::stitch::span::recycle(spans);
    }

    /// The event loop's housekeeping tick (once a second of the records' time), which expires
    /// request contexts; not part of the per-request cost.
    fn tick(&mut self) {
        if self.next.is_multiple_of(20 * BATCH as u64) {
            let now = 1_000_000_000 + self.next * 50_000;
            self.conns.sweep(now, &self.metrics, &mut self.finished);
            self.stitcher.sweep(now, &self.metrics);
        }
    }

    /// One warm batch: a drain's worth of records handled back to back.
    fn warm_batch(&mut self, mix: &Mix, cost: &mut [Cost; 4]) {
        let records = batch_records(mix, self.pid, self.next, BATCH);
        self.next += BATCH as u64;
        let mut spans = Vec::with_capacity(BATCH);
        self.parse(&records, &mut spans, cost);
        self.ship(&mut spans, cost);
        self.tick();
    }

    /// One cold batch: the same work in steps of [`COLD_STEP`] requests, with [`THRASH_BYTES`]
    /// of other memory walked before each step (and before the ship), as the traced server, the
    /// kernel and the load generator do to the agent's CPU between two of its time slices.
    fn cold_batch(&mut self, mix: &Mix, cost: &mut [Cost; 4], thrash: &mut [u8]) {
        let mut spans = Vec::with_capacity(BATCH);
        for _ in 0..BATCH / COLD_STEP {
            let records = batch_records(mix, self.pid, self.next, COLD_STEP);
            self.next += COLD_STEP as u64;
            walk(thrash);
            self.parse(&records, &mut spans, cost);
        }
        walk(thrash);
        self.ship(&mut spans, cost);
        self.tick();
    }
}

/// Requests per step of the cold batches.
const COLD_STEP: usize = 16;
/// Memory walked between cold steps: twice this machine class's L2 (2 MiB per core).
const THRASH_BYTES: usize = 8 << 20;

/// Writes one byte per cache line of `buf`: its lines replace the agent's in the CPU's caches.
fn walk(buf: &mut [u8]) {
    for i in (0..buf.len()).step_by(64) {
        buf[i] = buf[i].wrapping_add(1);
    }
    std::hint::black_box(&buf);
}

/// Median, min and max of `v`.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let requests: u64 = std::env::var("WAYBILL_PIPELINE_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    // `WAYBILL_PIPELINE_TSV=1`: tab-separated rows for `cargo xtask bench` to read.
    let tsv = std::env::var_os("WAYBILL_PIPELINE_TSV").is_some();
    let rounds = 7;
    let batches = requests.div_ceil(BATCH as u64);
    let n = (batches * BATCH as u64) as f64;
    let mut agent = Agent::new();
    let mut thrash = vec![0u8; THRASH_BYTES];
    // What reading the clock costs, per reading pair (subtracted from the cold rounds, which
    // read it once per step and stage).
    let mut clock = Cost::default();
    for _ in 0..100_000 {
        measure(&mut clock, || ());
    }
    let clock_ns = clock.ns as f64 / 100_000.0;
    let cold_readings = (batches as usize * (2 * BATCH / COLD_STEP + 2)) as f64;
    if tsv {
        println!("params\t{}\t{BATCH}\t{COLD_STEP}\t{}\t{clock_ns:.0}", n as u64, THRASH_BYTES >> 20);
    } else {
        println!(
            "user-space pipeline per HTTP request: {rounds} rounds of {} requests each, warm and cold alternated; \
             median (min–max)",
            n as u64
        );
    }

    let only = std::env::var("WAYBILL_PIPELINE_MIX").ok();
    let warm_only = std::env::var_os("WAYBILL_PIPELINE_WARM_ONLY").is_some();
    for mix in MIXES.iter().filter(|m| only.as_deref().is_none_or(|o| m.name.starts_with(o))) {
        // Round 0 of each kind warms up (process resource, RED series, encoder cache, interned
        // texts) and is not reported. Warm and cold rounds alternate.
        let mut warm: Vec<[Cost; 4]> = Vec::new();
        let mut cold: Vec<[Cost; 4]> = Vec::new();
        for round in 0..=rounds {
            let mut cost = [Cost::default(); 4];
            for _ in 0..batches {
                agent.warm_batch(mix, &mut cost);
            }
            if round > 0 {
                warm.push(cost);
            }
            let mut cost = [Cost::default(); 4];
            for _ in 0..batches {
                if warm_only {
                    agent.warm_batch(mix, &mut cost);
                } else {
                    agent.cold_batch(mix, &mut cost, &mut thrash);
                }
            }
            if round > 0 {
                cold.push(cost);
            }
        }
        let name = mix.name;
        if !tsv {
            println!(
                "\n{name}:\n{:<40} {:>19} {:>19} {:>10} {:>9}",
                "stage", "warm CPU ns/req", "cold CPU ns/req", "allocs/req", "bytes/req"
            );
        }
        let mut totals = [0f64; 4];
        for (i, stage) in STAGES.iter().enumerate() {
            let (w, wmin, wmax) = spread(warm.iter().map(|c| c[i].ns as f64 / n).collect());
            let readings = if i < 2 { cold_readings - 2.0 * batches as f64 } else { 2.0 * batches as f64 } / 2.0;
            let (c, cmin, cmax) =
                spread(cold.iter().map(|c| (c[i].ns as f64 - readings * clock_ns).max(0.0) / n).collect());
            let allocs = warm[0][i].allocs as f64 / n;
            let bytes = warm[0][i].bytes as f64 / n;
            totals[0] += w;
            totals[1] += c;
            totals[2] += allocs;
            totals[3] += bytes;
            if tsv {
                println!(
                    "stage\t{name}\t{stage}\t{w:.0}\t{wmin:.0}\t{wmax:.0}\t{c:.0}\t{cmin:.0}\t{cmax:.0}\t{allocs:.2}\t{bytes:.0}"
                );
            } else {
                println!(
                    "{stage:<40} {w:>6.0} ({wmin:>4.0}–{wmax:<4.0}) {c:>6.0} ({cmin:>4.0}–{cmax:<4.0}) {allocs:>10.2} \
                     {bytes:>9.0}"
                );
            }
        }
        if tsv {
            println!("total\t{name}\t{:.0}\t{:.0}\t{:.2}\t{:.0}", totals[0], totals[1], totals[2], totals[3]);
        } else {
            println!("{:<40} {:>6.0} {:>18.0} {:>23.2} {:>9.0}", "total", totals[0], totals[1], totals[2], totals[3]);
            println!("(encoded request body of {BATCH} spans: {} bytes)", agent.body_bytes);
        }
    }
    if !tsv {
        println!(
            "\nwarm: batches of {BATCH} requests back to back. cold: steps of {COLD_STEP} requests, {} MiB of other \
             memory walked before each step and before each batch's RED and encoding (clock reading, {clock_ns:.0} \
             ns, subtracted). Spans created: {}.",
            THRASH_BYTES >> 20,
            agent.metrics.spans_created.get()
        );
    }
}
