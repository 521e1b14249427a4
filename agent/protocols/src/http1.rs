//! HTTP/1.0 and HTTP/1.1 parser: one [`Http1Conn`] per TCP connection, fed both directions.
//!
//! # What it handles
//! - Request line (origin-, absolute-, authority- and asterisk-form targets) and headers (names are
//!   case-insensitive; obs-fold is not supported). Only the headers Waybill needs are kept (`Host`,
//!   `User-Agent`, `traceparent`, `tracestate`, `Content-Length`, `Transfer-Encoding`, `Expect`).
//! - Bodies framed by `Content-Length` or `Transfer-Encoding: chunked` (chunk extensions, trailers),
//!   and, for responses only, by connection close (finished by [`Http1Conn::close`]).
//! - Keep-alive and pipelining: several requests in one chunk, responses paired with requests FIFO.
//! - Messages split across any number of chunks (down to one byte per chunk).
//! - Bodies larger than what was captured: a chunk with `data.len() < total` accounts for the
//!   `total - data.len()` uncaptured bytes without allocating for them.
//! - Responses: 1xx interim responses (100, 103, …) are skipped and do not consume the request;
//!   responses to `HEAD`, 204 and 304 have no body; `101 Switching Protocols` and a 2xx answer to
//!   `CONNECT` end HTTP on the connection (both directions are ignored afterwards).
//!
//! # Resynchronisation
//! Boundaries are exact while every byte of the framing was captured. When they are not:
//! - **Lost framing** (uncaptured bytes inside chunked framing, a head cut by the capture window, an
//!   invalid `Content-Length`/`Transfer-Encoding`): the message is taken to end just before the next
//!   chunk that *begins* with a request line (request stream) / status line (response stream). A
//!   response is also ended by a new request from the client, a request by the end of its response,
//!   and a chunked message by a fully captured chunk ending in the last-chunk `0\r\n\r\n`. The
//!   exchange gets `approximate = true` once any byte past the point of loss was attributed by guess.
//! - **Overdue body** (bytes sent with e.g. `sendfile` that were never reported): while a body still
//!   expects bytes, a chunk that begins with a start line ends it early (`approximate`) when the
//!   other side shows the message must be over (the client already sent its next request; the server
//!   already answered the request).
//! - **Desync** (first chunk of a stream starting mid-message because the connection predates the
//!   agent, garbage at a message boundary, a message whose head lies in uncaptured bytes): bytes are
//!   skipped until a chunk that begins with a request/status line. Each recovery counts one
//!   `resyncs`; garbage seen at a known message boundary counts one `parse_errors`. Garbage never
//!   produces an exchange, and no input panics.
//!
//! # Limits
//! - At most [`MAX_IN_FLIGHT`] requests waiting for their response per connection; beyond that the
//!   oldest is dropped (`dropped_requests`), and its response, if it comes, is discarded so FIFO
//!   pairing stays right.
//! - At most [`MAX_HEAD_BYTES`] of a head are buffered per direction; a longer head is parsed from
//!   what was buffered (`head_truncated = true`) and its end is still found by scanning.
//! - Memory is proportional to captured bytes only (never to `total`); stored strings are capped at
//!   [`MAX_FIELD_BYTES`].
//!
//! # Timestamps
//! Every boundary is the `ts_ns` of the chunk holding the byte: a request starts at the chunk of its
//! first byte and ends at the chunk of its last (body included); a response likewise, 1xx excluded.
//! A close-delimited response ends at its last data chunk, not at the close. An exchange is emitted
//! once both its request and its final response are complete (an early response waits for the
//! request body), in request order.
//!
//! # Integration notes
//! Chunks of both directions must be fed in the order the bytes travelled (by timestamp): a final
//! response is paired, when its head ends, with the oldest unanswered request that began before it,
//! and needs that request's method to be framed (`HEAD` responses have no body, `CONNECT` 2xx
//! starts a tunnel). A response with no such request is an orphan (counted, framed as if for `GET`,
//! discarded). Bytes moved without being captured (`sendfile`, `splice`) keep framing exact when
//! reported as a chunk with empty `data` and the right `total`.

use std::{borrow::Cow, collections::VecDeque, sync::Arc};

use crate::{Chunk, FlowDir};

pub use crate::redact::{redact_all_query_values, redact_query};

/// Requests kept waiting for their response per connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes of a message head buffered per direction.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Cap on each string kept from a head (path, query, header values).
pub const MAX_FIELD_BYTES: usize = 4096;
/// Longest method token accepted.
const MAX_METHOD_LEN: usize = 24;
/// Bytes of an unfinished start line checked as a prefix.
const PREFIX_CHECK: usize = 64;
/// Longest chunk extension / trailer section skipped inside a chunked body.
const MAX_CHUNK_META: usize = 16 * 1024;

/// Methods recognised when guessing where a request starts (first chunk, resync, detection).
/// At a known message boundary any method token is accepted.
pub const KNOWN_METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    "MKCALENDAR",
    "PURGE",
    "QUERY",
];

/// The [`KNOWN_METHODS`] constant equal to `m`, if any: one comparison of lengths and words, not
/// a string comparison per known method (every request head looks its method up).
pub fn known_method(m: &[u8]) -> Option<&'static str> {
    Some(match m {
        b"GET" => "GET",
        b"HEAD" => "HEAD",
        b"POST" => "POST",
        b"PUT" => "PUT",
        b"DELETE" => "DELETE",
        b"CONNECT" => "CONNECT",
        b"OPTIONS" => "OPTIONS",
        b"TRACE" => "TRACE",
        b"PATCH" => "PATCH",
        b"PROPFIND" => "PROPFIND",
        b"PROPPATCH" => "PROPPATCH",
        b"MKCOL" => "MKCOL",
        b"COPY" => "COPY",
        b"MOVE" => "MOVE",
        b"LOCK" => "LOCK",
        b"UNLOCK" => "UNLOCK",
        b"REPORT" => "REPORT",
        b"SEARCH" => "SEARCH",
        b"MKCALENDAR" => "MKCALENDAR",
        b"PURGE" => "PURGE",
        b"QUERY" => "QUERY",
        _ => return None,
    })
}

/// A parsed request head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// A method of [`KNOWN_METHODS`] borrows the constant (no allocation per request).
    pub method: Cow<'static, str>,
    /// Path of an origin-form or absolute-form target (`/` if the latter has none); `*` for
    /// `OPTIONS *`; empty for `CONNECT host:port` (see `authority`).
    pub path: String,
    /// Query string without `?`, values redacted by [`redact_query`]; `None` if absent or empty.
    pub query: Option<String>,
    /// `host[:port]` of an absolute-form target (userinfo stripped) or of a `CONNECT` target.
    pub authority: Option<String>,
    /// 0 or 1 (HTTP/1.0 or HTTP/1.1); 1 when the version was not captured.
    pub version_minor: u8,
    /// Shared with the connection's previous request when it sent the same `Host` (keep-alive
    /// clients always do): no allocation per request for it.
    pub host: Option<Arc<str>>,
    /// Shared like `host` (a client sends the same `User-Agent` with every request).
    pub user_agent: Option<Arc<str>>,
    pub traceparent: Option<Arc<str>>,
    /// All `tracestate` lines joined with `,`.
    pub tracestate: Option<Arc<str>>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub expect_continue: bool,
    /// The head was not completely captured (cut by the capture window or over [`MAX_HEAD_BYTES`]).
    pub head_truncated: bool,
}

/// A parsed (final) response head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub version_minor: u8,
    pub content_length: Option<u64>,
    pub chunked: bool,
    pub head_truncated: bool,
}

/// A request and its final response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    pub request: HttpRequest,
    /// `None` when the connection closed (or was flushed) before a final response.
    pub response: Option<HttpResponse>,
    /// ts of the chunk holding the first request byte.
    pub request_start_ns: u64,
    /// ts of the chunk holding the last request byte.
    pub request_end_ns: u64,
    /// ts of the chunk holding the first byte of the final (non-1xx) response; 0 if none.
    pub response_start_ns: u64,
    /// ts of the chunk holding the last byte of the final response; 0 if none.
    pub response_end_ns: u64,
    /// A message boundary was inferred after framing was lost.
    pub approximate: bool,
}

/// Self-metrics of one connection's parser.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Http1Stats {
    /// Bytes at a known message boundary that were not a valid message, bad header lines, bad
    /// chunked framing, invalid `Content-Length`.
    pub parse_errors: u64,
    /// Times a stream found a start line again after losing its framing.
    pub resyncs: u64,
    /// Requests dropped because [`MAX_IN_FLIGHT`] were already waiting.
    pub dropped_requests: u64,
    /// Final responses with no unanswered request to pair with (discarded).
    pub orphan_responses: u64,
}

/// Per-connection HTTP/1.x state, both directions.
#[derive(Debug)]
pub struct Http1Conn {
    req: Side,
    resp: Side,
    pending: VecDeque<Pending>,
    /// Sequence number of the next request head.
    next_req_seq: u64,
    /// Sequence number of the request the next final response answers.
    next_resp_seq: u64,
    /// The `Host` and `User-Agent` of the last request (shared with the next one when the same).
    last_host: Option<Arc<str>>,
    last_user_agent: Option<Arc<str>>,
    stats: Http1Stats,
}

impl Default for Http1Conn {
    fn default() -> Self {
        Self::new()
    }
}

impl Http1Conn {
    pub fn new() -> Self {
        Http1Conn {
            req: Side::new(),
            resp: Side::new(),
            pending: VecDeque::new(),
            next_req_seq: 0,
            next_resp_seq: 0,
            last_host: None,
            last_user_agent: None,
            stats: Http1Stats::default(),
        }
    }

    /// Feed one chunk. [`FlowDir::ToServer`] chunks carry requests, [`FlowDir::ToClient`] chunks
    /// carry responses. Completed exchanges are pushed to `out` in request order.
    pub fn feed(&mut self, chunk: Chunk<'_>, out: &mut Vec<HttpExchange>) {
        self.feed_seq(chunk, &mut |_, e| out.push(e));
    }

    /// Like [`Http1Conn::feed`], but each exchange comes with its request's sequence number on
    /// this connection (0, 1, 2 …, the numbers [`Http1Conn::requests_from`] reports), so callers
    /// can attach their own state to a request when its head arrives and find it again here.
    pub fn feed_seq(&mut self, chunk: Chunk<'_>, sink: &mut impl FnMut(u64, HttpExchange)) {
        let total = chunk.total.max(chunk.data.len());
        if total == 0 {
            return;
        }
        self.feed_side(chunk.dir, chunk.data, total, chunk.ts_ns);
        self.emit_ready(sink);
    }

    /// Requests whose head has been parsed and whose exchange is not finished, with sequence
    /// number ≥ `seq`: (sequence number, request, ts of its first byte).
    pub fn requests_from(&self, seq: u64) -> impl Iterator<Item = (u64, &HttpRequest, u64)> {
        self.pending.iter().filter(move |p| p.seq >= seq).map(|p| (p.seq, &p.request, p.req_start))
    }

    /// The sequence number the next request head will get.
    pub fn next_request_seq(&self) -> u64 {
        self.next_req_seq
    }

    /// The connection closed: finish a response delimited by close (its end is the ts of its last
    /// chunk), end messages cut short (`approximate`), and flush every request still waiting, with
    /// `response = None` when no final response head was seen. The parser is then reset (stats kept).
    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<HttpExchange>) {
        self.close_seq(ts_ns, &mut |_, e| out.push(e));
    }

    /// [`Http1Conn::close`] with request sequence numbers (see [`Http1Conn::feed_seq`]).
    pub fn close_seq(&mut self, ts_ns: u64, sink: &mut impl FnMut(u64, HttpExchange)) {
        // Boundaries come from chunk timestamps; `ts_ns` only ends what has no last byte.
        for dir in [FlowDir::ToServer, FlowDir::ToClient] {
            let phase = std::mem::replace(&mut self.side_mut(dir).phase, Phase::Desync);
            let phase = match phase {
                Phase::Head(mut hb) if !hb.buf.is_empty() => {
                    let last = hb.last_ts;
                    let buf = std::mem::take(&mut hb.buf);
                    match self.on_head(dir, hb, &buf, HeadEnd::Truncated, last) {
                        // A complete framing cannot come out of a truncated head.
                        Phase::Start => Phase::Desync,
                        p => p,
                    }
                }
                p => p,
            };
            match phase {
                Phase::HeadTail { msg, .. } => self.finish_msg(dir, msg, msg.last_ts, true),
                Phase::Body { msg, body } => {
                    let cut = !matches!(body, Body::UntilClose);
                    self.finish_msg(dir, msg, msg.last_ts, cut);
                }
                Phase::Lost { msg, approx, .. } => self.finish_msg(dir, msg, msg.last_ts, approx),
                _ => {}
            }
        }
        for p in self.pending.drain(..) {
            let seq = p.seq;
            sink(seq, p.into_exchange(ts_ns));
        }
        self.req = Side::new();
        self.resp = Side::new();
        self.next_req_seq = 0;
        self.next_resp_seq = 0;
    }

    /// Requests seen whose exchange is not complete yet (at most [`MAX_IN_FLIGHT`]).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn stats(&self) -> Http1Stats {
        self.stats
    }

    fn side_mut(&mut self, dir: FlowDir) -> &mut Side {
        match dir {
            FlowDir::ToServer => &mut self.req,
            FlowDir::ToClient => &mut self.resp,
        }
    }

    fn pending_mut(&mut self, seq: u64) -> Option<&mut Pending> {
        self.pending.iter_mut().find(|p| p.seq == seq)
    }

    fn emit_ready(&mut self, sink: &mut impl FnMut(u64, HttpExchange)) {
        while self.pending.front().is_some_and(|p| p.req_done && p.resp_done) {
            if let Some(p) = self.pending.pop_front() {
                let seq = p.seq;
                sink(seq, p.into_exchange(0));
            }
        }
    }

    /// Body bytes are still expected, but the other direction shows the message must be over.
    fn overdue(&self, dir: FlowDir, msg: &Msg) -> bool {
        match dir {
            // The server has already started answering this request.
            FlowDir::ToServer => msg.seq.is_some_and(|s| self.next_resp_seq > s),
            // The client has already sent a request this response does not answer.
            FlowDir::ToClient => self.next_resp_seq < self.next_req_seq,
        }
    }

    fn feed_side(&mut self, dir: FlowDir, data: &[u8], total: usize, ts: u64) {
        let truncated = total > data.len();
        let first = !self.side_mut(dir).started;
        self.side_mut(dir).started = true;
        let mut phase = std::mem::replace(&mut self.side_mut(dir).phase, Phase::Desync);
        let mut pos = 0;

        // Decisions taken on where the chunk begins.
        phase = match phase {
            Phase::Tunnel => Phase::Tunnel,
            Phase::Desync => {
                if start_check(dir, data, true) == LineCheck::Valid {
                    self.stats.resyncs += 1;
                    Phase::Start
                } else {
                    Phase::Desync
                }
            }
            Phase::Lost { msg, chunked, approx } => {
                if start_check(dir, data, true) == LineCheck::Valid {
                    self.finish_msg(dir, msg, msg.last_ts, approx);
                    self.stats.resyncs += 1;
                    Phase::Start
                } else {
                    let msg = Msg { last_ts: ts, ..msg };
                    Phase::Lost { msg, chunked, approx: true }
                }
            }
            Phase::Body { msg, body }
                if !matches!(body, Body::UntilClose)
                    && self.overdue(dir, &msg)
                    && start_check(dir, data, true) == LineCheck::Valid =>
            {
                self.finish_msg(dir, msg, msg.last_ts, true);
                self.stats.resyncs += 1;
                Phase::Start
            }
            // The connection may predate the agent: only start on something that looks like a
            // message start (a prefix of one is fine: the next chunks confirm or refute it).
            Phase::Start if first => {
                if start_check(dir, data, true) == LineCheck::Invalid {
                    Phase::Desync
                } else {
                    Phase::Start
                }
            }
            p => p,
        };
        if matches!(phase, Phase::Tunnel | Phase::Desync | Phase::Lost { .. }) {
            pos = data.len();
        }

        let mut tentative = first;
        while pos < data.len() {
            phase = match phase {
                Phase::Start => {
                    while pos < data.len() && matches!(data[pos], b'\r' | b'\n') {
                        pos += 1;
                    }
                    if pos == data.len() {
                        Phase::Start
                    } else {
                        let hb = HeadBuf::new(ts, tentative);
                        tentative = false;
                        self.side_mut(dir).ends = LineEnds::default();
                        Phase::Head(hb)
                    }
                }
                Phase::Head(mut hb) => {
                    let from = pos;
                    let (n, done) = hb.push(&data[pos..], ts, &mut self.side_mut(dir).ends);
                    pos += n;
                    // A head that starts and ends in this chunk is parsed where it lies.
                    let buf = std::mem::take(&mut hb.buf);
                    let bytes = if buf.is_empty() { &data[from..pos] } else { &buf[..] };
                    if hb.check_start(dir, bytes) == LineCheck::Invalid {
                        if !hb.tentative {
                            self.stats.parse_errors += 1;
                        }
                        pos = data.len();
                        Phase::Desync
                    } else if done {
                        self.on_head(dir, hb, bytes, HeadEnd::Complete, ts)
                    } else if bytes.len() >= MAX_HEAD_BYTES {
                        self.on_head(dir, hb, bytes, HeadEnd::Overflow, ts)
                    } else {
                        hb.buf = buf;
                        Phase::Head(hb)
                    }
                }
                Phase::HeadTail { msg, mut at_line_start, framing } => {
                    let msg = Msg { last_ts: ts, ..msg };
                    match scan_head_end(&data[pos..], &mut at_line_start) {
                        Some(n) => {
                            pos += n;
                            self.enter_body(dir, msg, framing, ts)
                        }
                        None => {
                            pos = data.len();
                            Phase::HeadTail { msg, at_line_start, framing }
                        }
                    }
                }
                Phase::Body { msg, body } => {
                    let msg = Msg { last_ts: ts, ..msg };
                    match body {
                        Body::Length(rem) => {
                            let n = rem.min((data.len() - pos) as u64);
                            pos += n as usize;
                            if rem == n {
                                self.finish_msg(dir, msg, ts, false);
                                Phase::Start
                            } else {
                                Phase::Body { msg, body: Body::Length(rem - n) }
                            }
                        }
                        Body::Chunked(mut dec) => match dec.feed(&data[pos..]) {
                            Ok(Some(n)) => {
                                pos += n;
                                self.finish_msg(dir, msg, ts, false);
                                Phase::Start
                            }
                            Ok(None) => {
                                pos = data.len();
                                Phase::Body { msg, body: Body::Chunked(dec) }
                            }
                            Err(()) => {
                                self.stats.parse_errors += 1;
                                pos = data.len();
                                Phase::Lost { msg, chunked: true, approx: true }
                            }
                        },
                        Body::UntilClose => {
                            pos = data.len();
                            Phase::Body { msg, body: Body::UntilClose }
                        }
                    }
                }
                p @ (Phase::Lost { .. } | Phase::Desync | Phase::Tunnel) => {
                    pos = data.len();
                    p
                }
            };
        }

        if truncated {
            phase = self.skip_uncaptured(dir, phase, (total - data.len()) as u64, ts);
        }
        // A fully captured chunk ending with the last chunk closes a chunked body whose framing
        // was lost.
        if let Phase::Lost { msg, chunked: true, .. } = phase {
            if !truncated && ends_with_last_chunk(data) {
                self.finish_msg(dir, msg, ts, true);
                phase = Phase::Start;
            }
        }
        // `finish_msg`/`enter_body` may have switched this side to Tunnel meanwhile.
        let side = self.side_mut(dir);
        if !matches!(side.phase, Phase::Tunnel) {
            side.phase = phase;
        }
    }

    /// Account for `n` bytes at the end of a chunk that were transferred but not captured.
    fn skip_uncaptured(&mut self, dir: FlowDir, phase: Phase, n: u64, ts: u64) -> Phase {
        match phase {
            // The next message starts in bytes we did not see.
            Phase::Start => Phase::Desync,
            Phase::Head(mut hb) => {
                let buf = std::mem::take(&mut hb.buf);
                self.on_head(dir, hb, &buf, HeadEnd::Truncated, ts)
            }
            Phase::HeadTail { msg, framing, .. } => {
                Phase::Lost { msg: Msg { last_ts: ts, ..msg }, chunked: framing == Framing::Chunked, approx: false }
            }
            Phase::Body { msg, body } => {
                let msg = Msg { last_ts: ts, ..msg };
                match body {
                    Body::Length(rem) if n < rem => Phase::Body { msg, body: Body::Length(rem - n) },
                    Body::Length(rem) => {
                        self.finish_msg(dir, msg, ts, false);
                        // Bytes past the body belong to a message whose head we did not see.
                        if n == rem { Phase::Start } else { Phase::Desync }
                    }
                    Body::Chunked(mut dec) => {
                        if dec.skip_uncaptured(n) {
                            Phase::Body { msg, body: Body::Chunked(dec) }
                        } else {
                            Phase::Lost { msg, chunked: true, approx: true }
                        }
                    }
                    Body::UntilClose => Phase::Body { msg, body: Body::UntilClose },
                }
            }
            Phase::Lost { msg, chunked, approx } => Phase::Lost { msg: Msg { last_ts: ts, ..msg }, chunked, approx },
            p @ (Phase::Desync | Phase::Tunnel) => p,
        }
    }

    /// A head ended (or was cut). Parse it (`buf`: its bytes, buffered in `hb` or still in the
    /// chunk), register/pair the message, and pick the next phase.
    fn on_head(&mut self, dir: FlowDir, hb: HeadBuf, buf: &[u8], end: HeadEnd, ts: u64) -> Phase {
        let complete = end == HeadEnd::Complete;
        let ends = self.side_mut(dir).ends;
        let Some(head) = parse_head(dir, buf, ends.as_slice()) else {
            if !hb.tentative {
                self.stats.parse_errors += 1;
            }
            return Phase::Desync;
        };
        self.stats.parse_errors += u64::from(head.bad_lines);
        if head.bad_framing {
            self.stats.parse_errors += 1;
        }
        let truncated = !complete;
        let (seq, framing) = match dir {
            FlowDir::ToServer => {
                let framing = head.request_framing();
                let req = head.into_request(truncated, &mut self.last_host, &mut self.last_user_agent);
                let seq = self.register_request(req, hb.start_ts);
                // A new request means the client saw the end of an unframed response.
                if let Phase::Lost { msg, .. } = self.resp.phase {
                    if msg.seq.is_some() {
                        self.resp.phase = Phase::Desync;
                        self.finish_msg(FlowDir::ToClient, msg, msg.last_ts, true);
                    }
                }
                (Some(seq), framing)
            }
            FlowDir::ToClient => {
                let status = head.status;
                if (100..200).contains(&status) && status != 101 {
                    // Interim response: skipped, does not answer the request.
                    let msg = Msg { seq: None, last_ts: ts };
                    return match end {
                        HeadEnd::Complete => Phase::Start,
                        HeadEnd::Overflow => {
                            Phase::HeadTail { msg, at_line_start: hb.at_line_start, framing: Framing::None }
                        }
                        HeadEnd::Truncated => Phase::Lost { msg, chunked: false, approx: false },
                    };
                }
                // A response answers the oldest unanswered request, which must have begun before it.
                let next = self.next_resp_seq;
                let answerable = next < self.next_req_seq
                    && self.pending.iter().find(|p| p.seq == next).is_none_or(|p| p.req_start <= hb.start_ts);
                let seq = if answerable {
                    self.next_resp_seq += 1;
                    Some(next)
                } else {
                    self.stats.orphan_responses += 1;
                    None
                };
                let (is_head, is_connect) = match seq.and_then(|s| self.pending.iter().find(|p| p.seq == s)) {
                    Some(p) => (p.is_head, p.is_connect),
                    None => (false, false),
                };
                let framing = head.response_framing(is_head, is_connect);
                let resp = head.into_response(truncated);
                let seq = seq.filter(|&s| {
                    self.pending_mut(s)
                        .map(|p| {
                            p.response = Some(resp);
                            p.resp_start = hb.start_ts;
                        })
                        .is_some()
                });
                (seq, framing)
            }
        };
        let msg = Msg { seq, last_ts: ts };
        match end {
            HeadEnd::Complete => self.enter_body(dir, msg, framing, ts),
            HeadEnd::Overflow => Phase::HeadTail { msg, at_line_start: hb.at_line_start, framing },
            HeadEnd::Truncated => Phase::Lost { msg, chunked: framing == Framing::Chunked, approx: false },
        }
    }

    fn enter_body(&mut self, dir: FlowDir, msg: Msg, framing: Framing, ts: u64) -> Phase {
        match framing {
            Framing::None | Framing::Length(0) => {
                self.finish_msg(dir, msg, ts, false);
                Phase::Start
            }
            Framing::Length(n) => Phase::Body { msg, body: Body::Length(n) },
            Framing::Chunked => Phase::Body { msg, body: Body::Chunked(ChunkedDecoder::default()) },
            Framing::UntilClose => Phase::Body { msg, body: Body::UntilClose },
            Framing::Unknown => Phase::Lost { msg, chunked: false, approx: true },
            Framing::Tunnel => {
                self.finish_msg(dir, msg, ts, false);
                self.req.phase = Phase::Tunnel;
                self.resp.phase = Phase::Tunnel;
                Phase::Tunnel
            }
        }
    }

    fn register_request(&mut self, request: HttpRequest, start_ts: u64) -> u64 {
        if self.pending.len() >= MAX_IN_FLIGHT {
            self.pending.pop_front();
            self.stats.dropped_requests += 1;
        }
        let seq = self.next_req_seq;
        self.next_req_seq += 1;
        self.pending.push_back(Pending {
            seq,
            is_head: request.method == "HEAD",
            is_connect: request.method == "CONNECT",
            request,
            req_start: start_ts,
            req_end: start_ts,
            req_done: false,
            response: None,
            resp_start: 0,
            resp_end: 0,
            resp_done: false,
            approximate: false,
        });
        seq
    }

    /// The message `msg` ended with a byte in the chunk at `end_ts`.
    fn finish_msg(&mut self, dir: FlowDir, msg: Msg, end_ts: u64, approx: bool) {
        let Some(seq) = msg.seq else { return };
        match dir {
            FlowDir::ToServer => {
                if let Some(p) = self.pending_mut(seq) {
                    p.req_done = true;
                    p.req_end = end_ts;
                    p.approximate |= approx;
                }
            }
            FlowDir::ToClient => {
                if let Some(p) = self.pending_mut(seq) {
                    p.resp_done = true;
                    p.resp_end = end_ts;
                    p.approximate |= approx;
                }
                // A request whose end could not be framed is over once it is answered.
                if let Phase::Lost { msg: rmsg, approx: rapprox, .. } = self.req.phase {
                    if rmsg.seq == Some(seq) {
                        self.req.phase = Phase::Desync;
                        if let Some(p) = self.pending_mut(seq) {
                            p.req_done = true;
                            p.req_end = rmsg.last_ts;
                            p.approximate |= rapprox;
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct Side {
    phase: Phase,
    /// A chunk was seen on this side (the first one may start mid-message).
    started: bool,
    /// Where the lines of the head being read end (kept here, not in the phase, which moves).
    ends: LineEnds,
}

impl Side {
    fn new() -> Self {
        Side { phase: Phase::Start, started: false, ends: LineEnds::default() }
    }
}

/// Lines kept in [`LineEnds`]; a head with more lines has the rest found again by the parser.
const LINE_ENDS: usize = 32;

/// The offsets of the `\n`s of the head being read (from its first byte), in order, as
/// [`HeadBuf::push`] finds them while it looks for the head's end: the parser then splits the
/// head into lines without searching it a second time.
#[derive(Clone, Copy, Debug, Default)]
struct LineEnds {
    at: [u16; LINE_ENDS],
    n: u8,
}

impl LineEnds {
    fn push(&mut self, offset: usize) {
        if (self.n as usize) < LINE_ENDS {
            // Heads are at most MAX_HEAD_BYTES (16 KiB) long.
            self.at[self.n as usize] = offset as u16;
            self.n += 1;
        }
    }

    fn as_slice(&self) -> &[u16] {
        &self.at[..self.n as usize]
    }
}

/// A message being transferred: which exchange it belongs to (None = discard) and the ts of the
/// last chunk that carried its bytes.
#[derive(Clone, Copy, Debug)]
struct Msg {
    seq: Option<u64>,
    last_ts: u64,
}

#[derive(Debug)]
enum Phase {
    /// At a message boundary.
    Start,
    /// Accumulating a head.
    Head(HeadBuf),
    /// The head overflowed [`MAX_HEAD_BYTES`]: the message exists; scanning for the end of its head.
    HeadTail {
        msg: Msg,
        at_line_start: bool,
        framing: Framing,
    },
    Body {
        msg: Msg,
        body: Body,
    },
    /// Framing lost: the message ends before the next chunk that begins with a start line.
    Lost {
        msg: Msg,
        chunked: bool,
        approx: bool,
    },
    /// Skipping until a chunk that begins with a start line.
    Desync,
    /// No longer HTTP (after 101 / CONNECT).
    Tunnel,
}

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
    Tunnel,
    /// Invalid framing headers: fall back to resync rules.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeadEnd {
    Complete,
    /// Over [`MAX_HEAD_BYTES`], the rest is still captured.
    Overflow,
    /// The rest of the head was not captured.
    Truncated,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    request: HttpRequest,
    is_head: bool,
    is_connect: bool,
    req_start: u64,
    req_end: u64,
    req_done: bool,
    response: Option<HttpResponse>,
    resp_start: u64,
    resp_end: u64,
    resp_done: bool,
    approximate: bool,
}

impl Pending {
    /// `fallback_ts`: end of a message that never finished (the close time).
    fn into_exchange(self, fallback_ts: u64) -> HttpExchange {
        let has_resp = self.response.is_some();
        HttpExchange {
            request: self.request,
            response: self.response,
            request_start_ns: self.req_start,
            request_end_ns: if self.req_done { self.req_end } else { fallback_ts.max(self.req_end) },
            response_start_ns: if has_resp { self.resp_start } else { 0 },
            response_end_ns: match (has_resp, self.resp_done) {
                (false, _) => 0,
                (true, true) => self.resp_end,
                (true, false) => fallback_ts.max(self.resp_start),
            },
            approximate: self.approximate || (has_resp && !self.resp_done) || !self.req_done,
        }
    }
}

/// Partial head of one message.
#[derive(Debug)]
struct HeadBuf {
    buf: Vec<u8>,
    start_ts: u64,
    last_ts: u64,
    /// The previous byte ended a line (an empty line next ends the head).
    at_line_start: bool,
    /// Index of the first '\n', once seen.
    first_line_end: Option<usize>,
    line_ok: bool,
    /// The first [`PREFIX_CHECK`] bytes of the start line passed the check.
    prefix_ok: bool,
    /// Started on the first chunk of a stream: may be mid-message, be strict and quiet.
    tentative: bool,
}

impl HeadBuf {
    fn new(ts: u64, tentative: bool) -> Self {
        HeadBuf {
            buf: Vec::new(),
            start_ts: ts,
            last_ts: ts,
            at_line_start: false,
            first_line_end: None,
            line_ok: false,
            prefix_ok: false,
            tentative,
        }
    }

    /// Append bytes up to the end of the head or the buffer limit. Returns (consumed, head ended).
    /// When the whole head is in `data` (nothing buffered yet), nothing is copied: the head is
    /// `data[..consumed]`.
    fn push(&mut self, data: &[u8], ts: u64, ends: &mut LineEnds) -> (usize, bool) {
        let lim = data.len().min(MAX_HEAD_BYTES.saturating_sub(self.buf.len()));
        let mut end = None;
        // Line by line (memchr finds each '\n'): the head ends at a '\n' whose line holds
        // nothing but '\r's; `at_line_start` carries that state across chunks.
        let mut pos = 0;
        while pos < lim {
            let rest = &data[pos..lim];
            let Some(k) = memchr::memchr(b'\n', rest) else {
                self.at_line_start = self.at_line_start && rest.iter().all(|&b| b == b'\r');
                break;
            };
            let i = pos + k;
            ends.push(self.buf.len() + i);
            if self.first_line_end.is_none() {
                self.first_line_end = Some(self.buf.len() + i);
            }
            if self.at_line_start && rest[..k].iter().all(|&b| b == b'\r') {
                end = Some(i + 1);
                break;
            }
            self.at_line_start = true;
            pos = i + 1;
        }
        let n = end.unwrap_or(lim);
        if n > 0 {
            // A whole head within `data` is not copied: the caller parses it in place.
            if end.is_none() || !self.buf.is_empty() {
                self.buf.extend_from_slice(&data[..n]);
            }
            self.last_ts = ts;
        }
        (n, end.is_some())
    }

    /// Check the start line as far as it is buffered (`buf`: the head's bytes so far, see
    /// [`HeadBuf::push`]). Cheap: the first [`PREFIX_CHECK`] bytes are checked until that many
    /// are buffered, and the whole line once, when it ends.
    fn check_start(&mut self, dir: FlowDir, buf: &[u8]) -> LineCheck {
        if self.line_ok {
            return LineCheck::Valid;
        }
        if let Some(e) = self.first_line_end {
            let r = check_line(dir, &buf[..e], true, self.tentative);
            self.line_ok = r == LineCheck::Valid;
            return r;
        }
        if self.prefix_ok {
            return LineCheck::Partial;
        }
        let n = buf.len().min(PREFIX_CHECK);
        let r = check_line(dir, &buf[..n], false, self.tentative);
        self.prefix_ok = r != LineCheck::Invalid && n == PREFIX_CHECK;
        r
    }
}

/// Scan for the empty line that ends a head. Returns bytes consumed up to and including it.
fn scan_head_end(data: &[u8], at_line_start: &mut bool) -> Option<usize> {
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'\n' => {
                if *at_line_start {
                    return Some(i + 1);
                }
                *at_line_start = true;
            }
            b'\r' => {}
            _ => *at_line_start = false,
        }
    }
    None
}

fn ends_with_last_chunk(data: &[u8]) -> bool {
    data.ends_with(b"0\r\n\r\n") && (data.len() == 5 || data[data.len() - 6] == b'\n')
}

/// Incremental decoder of a chunked body (only framing; data is skipped).
#[derive(Debug, Clone)]
enum ChunkedDecoder {
    /// Reading a chunk-size line; `meta` counts extension bytes.
    Size {
        value: u64,
        digits: u8,
        ext: bool,
        meta: usize,
    },
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// Reading trailer lines after the last chunk.
    Trailer {
        line_empty: bool,
        meta: usize,
    },
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder::Size { value: 0, digits: 0, ext: false, meta: 0 }
    }
}

impl ChunkedDecoder {
    /// Feed captured bytes. `Ok(Some(n))`: the body ended after `n` bytes of `data`.
    fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self {
                ChunkedDecoder::Size { value, digits, ext, meta } => {
                    match b {
                        b'\n' => {
                            if *digits == 0 {
                                return Err(());
                            }
                            *self = if *value == 0 {
                                ChunkedDecoder::Trailer { line_empty: true, meta: 0 }
                            } else {
                                ChunkedDecoder::Data(*value)
                            };
                        }
                        b'\r' => {}
                        _ if *ext => {
                            *meta += 1;
                            if *meta > MAX_CHUNK_META {
                                return Err(());
                            }
                        }
                        b';' | b' ' | b'\t' if *digits > 0 => *ext = true,
                        _ => {
                            let d = hex_digit(b).ok_or(())?;
                            if *digits >= 16 {
                                return Err(());
                            }
                            *value = *value << 4 | u64::from(d);
                            *digits += 1;
                        }
                    }
                    i += 1;
                }
                ChunkedDecoder::Data(rem) => {
                    let n = (*rem).min((data.len() - i) as u64);
                    *rem -= n;
                    i += n as usize;
                    if *rem == 0 {
                        *self = ChunkedDecoder::DataEnd;
                    }
                }
                ChunkedDecoder::DataEnd => {
                    match b {
                        b'\r' => {}
                        b'\n' => *self = ChunkedDecoder::default(),
                        _ => return Err(()),
                    }
                    i += 1;
                }
                ChunkedDecoder::Trailer { line_empty, meta } => {
                    i += 1;
                    match b {
                        b'\n' if *line_empty => return Ok(Some(i)),
                        b'\n' => *line_empty = true,
                        b'\r' => {}
                        _ => {
                            *line_empty = false;
                            *meta += 1;
                            if *meta > MAX_CHUNK_META {
                                return Err(());
                            }
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// Skip `n` uncaptured bytes; false when that loses the framing (they were not all chunk data).
    fn skip_uncaptured(&mut self, n: u64) -> bool {
        match self {
            ChunkedDecoder::Data(rem) if n <= *rem => {
                *rem -= n;
                if *rem == 0 {
                    *self = ChunkedDecoder::DataEnd;
                }
                true
            }
            _ => false,
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Start lines

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineCheck {
    /// Cannot be the start of a message.
    Invalid,
    /// Consistent so far, too short to tell.
    Partial,
    /// Looks like a start line (a complete one, or a long enough prefix).
    Valid,
}

/// Check how `data` begins (leading CR/LF skipped) against the start line of `dir`.
fn start_check(dir: FlowDir, data: &[u8], known_only: bool) -> LineCheck {
    let skip = data.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    let data = &data[skip..];
    match data.iter().position(|&b| b == b'\n') {
        Some(e) => check_line(dir, &data[..e], true, known_only),
        None => check_line(dir, data, false, known_only),
    }
}

fn check_line(dir: FlowDir, line: &[u8], complete: bool, known_only: bool) -> LineCheck {
    match dir {
        FlowDir::ToServer => check_request_line(line, complete, known_only),
        FlowDir::ToClient => check_status_line(line, complete),
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn is_tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// RFC 9110 `tchar`, as a table (checked for every byte of every header name).
static TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric();
        i += 1;
    }
    let extra = b"!#$%&'*+-.^_`|~";
    let mut j = 0;
    while j < extra.len() {
        t[extra[j] as usize] = true;
        j += 1;
    }
    t
};

/// Method tokens are case-sensitive and, in practice, upper-case words (`M-SEARCH`, `VERSION-CONTROL`).
fn is_method_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

/// `line`: the first line without its '\n' (`complete`) or all of it seen so far.
fn check_request_line(line: &[u8], complete: bool, known_only: bool) -> LineCheck {
    use LineCheck::*;
    let line = if complete { strip_cr(line) } else { line };
    let sp = line.iter().position(|&b| b == b' ');
    let method = &line[..sp.unwrap_or(line.len())];
    if method.len() > MAX_METHOD_LEN || !method.iter().all(|&b| is_method_char(b)) {
        return Invalid;
    }
    let Some(sp) = sp else {
        if complete {
            return Invalid;
        }
        let ok = !known_only || KNOWN_METHODS.iter().any(|m| m.as_bytes().starts_with(method));
        return if ok { Partial } else { Invalid };
    };
    if method.is_empty() || (known_only && known_method(method).is_none()) {
        return Invalid;
    }
    let rest = &line[sp + 1..];
    let Some(&first) = rest.first() else {
        return if complete { Invalid } else { Partial };
    };
    let tsp = rest.iter().position(|&b| b == b' ');
    let target = &rest[..tsp.unwrap_or(rest.len())];
    if !target.iter().all(|&b| b > b' ' && b != 0x7f) {
        return Invalid;
    }
    // origin-form, `*`, or absolute-/authority-form (`scheme:` / `host:port`, maybe not captured yet).
    let target_ok = match first {
        b'/' => true,
        b'*' => target.len() == 1,
        c if c.is_ascii_alphanumeric() => {
            let head_len = target.iter().take_while(|&&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)).count();
            target.get(head_len) == Some(&b':') || (head_len == target.len() && tsp.is_none() && !complete)
        }
        _ => false,
    };
    if !target_ok {
        return Invalid;
    }
    let Some(tsp) = tsp else {
        // HTTP/0.9 requests are not supported.
        return if complete { Invalid } else { Valid };
    };
    let ver = &rest[tsp + 1..];
    if complete {
        return if parse_version(ver).is_some() { Valid } else { Invalid };
    }
    let ver = if ver.len() == 9 { ver.strip_suffix(b"\r").unwrap_or(ver) } else { ver };
    if version_prefix_ok(ver) { Valid } else { Invalid }
}

/// `HTTP/1.0` or `HTTP/1.1` → minor version.
fn parse_version(v: &[u8]) -> Option<u8> {
    match v {
        b"HTTP/1.0" => Some(0),
        b"HTTP/1.1" => Some(1),
        _ => None,
    }
}

fn version_prefix_ok(v: &[u8]) -> bool {
    v.len() <= 8
        && v.iter().enumerate().all(|(i, &b)| match i {
            7 => b == b'0' || b == b'1',
            _ => b == b"HTTP/1.x"[i],
        })
}

fn check_status_line(line: &[u8], complete: bool) -> LineCheck {
    use LineCheck::*;
    let line = if complete { strip_cr(line) } else { line };
    if !version_prefix_ok(&line[..line.len().min(8)]) {
        return Invalid;
    }
    for (i, &b) in line.iter().enumerate().take(12).skip(8) {
        let ok = if i == 8 { b == b' ' } else { b.is_ascii_digit() };
        if !ok {
            return Invalid;
        }
    }
    match line.get(12) {
        None if line.len() < 12 => {
            if complete {
                Invalid
            } else {
                Partial
            }
        }
        None | Some(b' ') => Valid,
        Some(b'\r') if !complete && line.len() == 13 => Valid,
        Some(_) => Invalid,
    }
}

/// Cheap protocol detection: `data` (a connection's first bytes, possibly cut anywhere after
/// `METHOD SP x`) begins with a request line of a known method. Needs at least `GET /`.
pub fn looks_like_request(data: &[u8]) -> bool {
    start_check(FlowDir::ToServer, data, true) == LineCheck::Valid
}

/// Cheap protocol detection: `data` begins with `HTTP/1.x NNN` (at least those 12 bytes).
pub fn looks_like_response(data: &[u8]) -> bool {
    start_check(FlowDir::ToClient, data, true) == LineCheck::Valid
}

// ---------------------------------------------------------------------------------------------
// Heads

/// Fields of a head, both kinds (`'a`: the head's bytes).
#[derive(Debug, Default)]
struct Head<'a> {
    method: Cow<'static, str>,
    /// The request-target, capped at [`MAX_FIELD_BYTES`]: split into path, query and authority
    /// by [`Head::into_request`], never stored whole.
    target: &'a [u8],
    status: u16,
    version_minor: u8,
    /// Borrowed: [`Head::into_request`] shares the connection's previous value when equal.
    host: Option<&'a [u8]>,
    user_agent: Option<&'a [u8]>,
    traceparent: Option<Arc<str>>,
    tracestate: Option<String>,
    content_length: Option<u64>,
    te_present: bool,
    te_chunked: bool,
    expect_continue: bool,
    /// Invalid `Content-Length` (or conflicting values).
    bad_framing: bool,
    /// Header lines that were not `name: value`.
    bad_lines: u32,
}

impl Head<'_> {
    fn request_framing(&self) -> Framing {
        if self.te_present {
            if self.te_chunked { Framing::Chunked } else { Framing::Unknown }
        } else if self.bad_framing {
            Framing::Unknown
        } else {
            match self.content_length {
                Some(n) => Framing::Length(n),
                None => Framing::None,
            }
        }
    }

    fn response_framing(&self, is_head: bool, is_connect: bool) -> Framing {
        let s = self.status;
        if s == 101 || (is_connect && (200..300).contains(&s)) {
            Framing::Tunnel
        } else if is_head || s < 200 || s == 204 || s == 304 {
            Framing::None
        } else if self.te_present {
            if self.te_chunked { Framing::Chunked } else { Framing::UntilClose }
        } else if self.bad_framing {
            Framing::Unknown
        } else {
            match self.content_length {
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        }
    }

    /// The request; `last_host` and `last_user_agent` are the connection's previous values,
    /// reused when equal and replaced otherwise.
    fn into_request(
        self,
        head_truncated: bool,
        last_host: &mut Option<Arc<str>>,
        last_user_agent: &mut Option<Arc<str>>,
    ) -> HttpRequest {
        let host = self.host.map(|b| shared(last_host, b));
        let user_agent = self.user_agent.map(|b| shared(last_user_agent, b));
        let target = String::from_utf8_lossy(self.target);
        let (path, query, authority) = split_target(&self.method, &target);
        HttpRequest {
            method: self.method,
            path,
            query,
            authority,
            version_minor: self.version_minor,
            host,
            user_agent,
            traceparent: self.traceparent,
            tracestate: self.tracestate.map(Arc::from),
            content_length: self.content_length,
            chunked: self.te_chunked,
            expect_continue: self.expect_continue,
            head_truncated,
        }
    }

    fn into_response(self, head_truncated: bool) -> HttpResponse {
        HttpResponse {
            status: self.status,
            version_minor: self.version_minor,
            content_length: self.content_length,
            chunked: self.te_chunked,
            head_truncated,
        }
    }
}

/// `b` (capped at [`MAX_FIELD_BYTES`]) as text: `last` when it holds the same text, else a new
/// one that replaces it.
fn shared(last: &mut Option<Arc<str>>, b: &[u8]) -> Arc<str> {
    let b = &b[..b.len().min(MAX_FIELD_BYTES)];
    match last {
        Some(h) if h.as_bytes() == b => Arc::clone(h),
        _ => {
            let h: Arc<str> = Arc::from(String::from_utf8_lossy(b));
            *last = Some(Arc::clone(&h));
            h
        }
    }
}

fn capped(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_FIELD_BYTES)]).into_owned()
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// Parse a head: the start line (complete, or a long enough prefix if the head was cut) and every
/// header line ended by '\n' (a last line without one was cut and is ignored). None when the start
/// line is invalid. `ends`: offsets of `buf`'s first '\n's, as far as known (each is checked; the
/// lines past them are found by searching).
fn parse_head<'a>(dir: FlowDir, buf: &'a [u8], ends: &[u16]) -> Option<Head<'a>> {
    // One pass: each line is complete when a '\n' ends it; the piece after the last '\n' is not.
    let mut lines = HeadLines { buf, at: 0, known: ends.iter() };
    let (first, first_complete) = lines.next().unwrap_or((&[], false));
    let mut head = Head::default();
    match dir {
        FlowDir::ToServer => {
            // A cut start line is only believed with a known method.
            if check_request_line(first, first_complete, !first_complete) != LineCheck::Valid {
                return None;
            }
            let mut parts = first.splitn(3, |&b| b == b' ');
            let m = parts.next()?;
            head.method = match known_method(m) {
                Some(k) => Cow::Borrowed(k),
                None => Cow::Owned(capped(m)),
            };
            let target = parts.next()?;
            head.target = &target[..target.len().min(MAX_FIELD_BYTES)];
            head.version_minor = parts.next().and_then(parse_version).unwrap_or(1);
        }
        FlowDir::ToClient => {
            if check_status_line(first, first_complete) != LineCheck::Valid {
                return None;
            }
            head.version_minor = first[7] - b'0';
            head.status = first[9..12].iter().fold(0u16, |a, &d| a * 10 + u16::from(d - b'0'));
        }
    }
    for (line, complete) in lines {
        if !complete || line.is_empty() {
            break;
        }
        parse_header(&mut head, line);
    }
    Some(head)
}

/// The lines of a head: `(line without its "\r\n", complete)`, the last one incomplete when no
/// '\n' ends it. `known`: offsets of the first '\n's, each checked before it is used (the lines
/// past them are found by searching).
struct HeadLines<'a, 'e> {
    buf: &'a [u8],
    at: usize,
    known: std::slice::Iter<'e, u16>,
}

impl<'a> Iterator for HeadLines<'a, '_> {
    type Item = (&'a [u8], bool);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let (buf, at) = (self.buf, self.at);
        if at >= buf.len() {
            return None;
        }
        let nl = match self.known.next() {
            Some(&e) if e as usize >= at && buf.get(e as usize) == Some(&b'\n') => Some(e as usize),
            _ => memchr::memchr(b'\n', &buf[at..]).map(|i| at + i),
        };
        Some(match nl {
            Some(i) => {
                self.at = i + 1;
                (strip_cr(&buf[at..i]), true)
            }
            None => {
                self.at = buf.len();
                (&buf[at..], false)
            }
        })
    }
}

fn parse_header<'a>(head: &mut Head<'a>, line: &'a [u8]) {
    // `[OWS] name [OWS] ":"` in one pass: the name is a run of `tchar`s, so the walk that checks
    // it also finds the colon (a line without one, or with anything else before it, is bad).
    let skip_ows = |mut i: usize| {
        while i < line.len() && matches!(line[i], b' ' | b'\t') {
            i += 1;
        }
        i
    };
    let start = skip_ows(0);
    let mut end = start;
    while end < line.len() && is_tchar(line[end]) {
        end += 1;
    }
    let colon = skip_ows(end);
    if end == start || line.get(colon) != Some(&b':') {
        head.bad_lines += 1;
        return;
    }
    let name = &line[start..end];
    // Trimmed only for the headers read below (most are not).
    let value = || trim_ows(&line[colon + 1..]);
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    // Dispatch on the length first: most header names match none of these.
    match name.len() {
        14 if is("content-length") => match parse_content_length(value()) {
            Some(n) if head.content_length.is_none_or(|c| c == n) => head.content_length = Some(n),
            _ => head.bad_framing = true,
        },
        17 if is("transfer-encoding") => {
            head.te_present = true;
            let last = value().rsplit(|&b| b == b',').next().map(trim_ows).unwrap_or_default();
            head.te_chunked = last.eq_ignore_ascii_case(b"chunked");
        }
        4 if is("host") => {
            head.host.get_or_insert(value());
        }
        10 if is("user-agent") => {
            head.user_agent.get_or_insert_with(value);
        }
        11 if is("traceparent") => {
            head.traceparent.get_or_insert_with(|| Arc::from(capped(value())));
        }
        10 if is("tracestate") => {
            let value = value();
            match &mut head.tracestate {
                Some(ts) if ts.len() + value.len() < MAX_FIELD_BYTES => {
                    ts.push(',');
                    ts.push_str(&String::from_utf8_lossy(value));
                }
                Some(_) => {}
                None => head.tracestate = Some(capped(value)),
            }
        }
        6 if is("expect") => head.expect_continue |= value().eq_ignore_ascii_case(b"100-continue"),
        _ => {}
    }
}

/// `N` or a list of identical values `N, N`.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let mut out = None;
    for part in v.split(|&b| b == b',') {
        let part = trim_ows(part);
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |a, &d| a * 10 + u64::from(d - b'0'));
        if out.is_some_and(|o| o != n) {
            return None;
        }
        out = Some(n);
    }
    out
}

/// Split a request-target into (path, redacted query, authority).
fn split_target(method: &str, target: &str) -> (String, Option<String>, Option<String>) {
    // Byte searches for ASCII delimiters (so every cut is a char boundary); the origin form
    // (`/path?query`, nearly every request) skips the search for a scheme.
    let target = memchr::memchr(b'#', target.as_bytes()).map_or(target, |i| &target[..i]);
    if target == "*" {
        return ("*".into(), None, None);
    }
    if method == "CONNECT" {
        return (String::new(), None, Some(strip_userinfo(target).to_string()));
    }
    let scheme_end = if target.starts_with('/') { None } else { memchr::memmem::find(target.as_bytes(), b"://") };
    let (authority, rest) = match scheme_end {
        Some(i) => {
            let after = &target[i + 3..];
            let end = memchr::memchr2(b'/', b'?', after.as_bytes()).unwrap_or(after.len());
            (Some(strip_userinfo(&after[..end]).to_string()), &after[end..])
        }
        None => (None, target),
    };
    let (path, query) = match memchr::memchr(b'?', rest.as_bytes()) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let path = if path.is_empty() && authority.is_some() { "/" } else { path };
    let query = query.filter(|q| !q.is_empty()).map(redact_query);
    (path.to_string(), query, authority)
}

fn strip_userinfo(authority: &str) -> &str {
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

// ---------------------------------------------------------------------------------------------
// Route templates

/// Low-cardinality route template: id-looking path segments become `{id}` (numbers, UUIDs, long
/// hex, digit-heavy or long mixed tokens, e-mail addresses); words are kept. The query, fragment
/// and `;params` of segments are dropped. An empty path gives `/`; at most 32 segments are kept.
pub fn path_template(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(256));
    push_path_template(&mut out, path);
    out
}

/// [`path_template`] appended to `out` (a span name being built: no string of its own).
pub fn push_path_template(out: &mut String, path: &str) {
    // Cuts at ASCII bytes only, so every piece is a char boundary of `path`.
    let path = memchr::memchr2(b'?', b'#', path.as_bytes()).map_or(path, |i| &path[..i]);
    if path.is_empty() {
        out.push('/');
        return;
    }
    if path == "*" {
        out.push('*');
        return;
    }
    let bytes = path.as_bytes();
    let mut start = 0;
    for i in 0..33 {
        let end = memchr::memchr(b'/', &bytes[start..]).map_or(bytes.len(), |e| start + e);
        if i > 0 {
            out.push('/');
        }
        let seg = &path[start..end];
        let seg = memchr::memchr(b';', seg.as_bytes()).map_or(seg, |p| &seg[..p]);
        if is_id_segment(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
        if end == bytes.len() {
            break;
        }
        start = end + 1;
    }
}

/// Byte classes of [`is_id_segment`], one table lookup per byte of a path segment.
const SEG_DIGIT: u8 = 1;
const SEG_LETTER: u8 = 2;
const SEG_HEX: u8 = 4;
/// Alphanumeric or one of `-_.~=%`.
const SEG_TOKEN: u8 = 8;
const SEG_AT: u8 = 16;

static SEG_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let mut c = 0;
        if b.is_ascii_digit() {
            c |= SEG_DIGIT | SEG_HEX | SEG_TOKEN;
        }
        if b.is_ascii_alphabetic() {
            c |= SEG_LETTER | SEG_TOKEN;
        }
        if b.is_ascii_hexdigit() {
            c |= SEG_HEX;
        }
        if matches!(b, b'-' | b'_' | b'.' | b'~' | b'=' | b'%') {
            c |= SEG_TOKEN;
        }
        if b == b'@' {
            c |= SEG_AT;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn is_id_segment(seg: &str) -> bool {
    let b = seg.as_bytes();
    if b.is_empty() {
        return false;
    }
    // One pass over the segment: which classes every byte is in, and which some byte is in.
    let (mut digits, mut letters, mut all, mut any) = (0usize, 0usize, 0xffu8, 0u8);
    for &c in b {
        let k = SEG_CLASS[c as usize];
        digits += usize::from(k & SEG_DIGIT);
        letters += usize::from((k & SEG_LETTER) >> 1);
        all &= k;
        any |= k;
    }
    let (all_hex, tokenish, at) = (all & SEG_HEX != 0, all & SEG_TOKEN != 0, any & SEG_AT != 0);
    digits == b.len()
        || is_uuid(b)
        || (all_hex && b.len() >= 8 && digits > 0)
        || (b.len() >= 4 && digits * 2 >= b.len())
        || (tokenish && b.len() >= 16 && digits > 0 && letters > 0)
        || at
        || b.len() > 64
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-class table gives the rules' plain reading, byte for byte.
    #[test]
    fn id_segments_by_table_match_the_rules() {
        fn plain(seg: &str) -> bool {
            let b = seg.as_bytes();
            if b.is_empty() {
                return false;
            }
            let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
            let letters = b.iter().filter(|c| c.is_ascii_alphabetic()).count();
            let all_hex = b.iter().all(u8::is_ascii_hexdigit);
            let tokenish = b.iter().all(|&c| c.is_ascii_alphanumeric() || b"-_.~=%".contains(&c));
            digits == b.len()
                || is_uuid(b)
                || (all_hex && b.len() >= 8 && digits > 0)
                || (b.len() >= 4 && digits * 2 >= b.len())
                || (tokenish && b.len() >= 16 && digits > 0 && letters > 0)
                || seg.contains('@')
                || b.len() > 64
        }
        let pieces = ["a", "Z", "7", "f", "-", "_", ".", "~", "=", "%", "@", "!", "é", " ", "ab12", "deadbeef"];
        let mut n = 0u32;
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    for reps in [1, 3, 9] {
                        let seg = format!("{a}{b}{c}").repeat(reps);
                        assert_eq!(is_id_segment(&seg), plain(&seg), "{seg:?}");
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(n, 16 * 16 * 16 * 3);
    }

    #[test]
    fn request_line_checks() {
        use LineCheck::*;
        let cases: &[(&[u8], bool, bool, LineCheck)] = &[
            (b"GET / HTTP/1.1", true, true, Valid),
            (b"GET / HTTP/1.1\r", true, true, Valid),
            (b"GET / HTTP/1.0", true, true, Valid),
            (b"GET / HTTP/2.0", true, true, Invalid),
            (b"GET / HTTP/1.2", true, true, Invalid),
            (b"GET /", true, true, Invalid),
            (b"GET /", false, true, Valid),
            (b"GET / HT", false, true, Valid),
            (b"GET / HTTP/1.1\r", false, true, Valid),
            (b"GET / HTTX", false, true, Invalid),
            (b"GE", false, true, Partial),
            (b"GET ", false, true, Partial),
            (b"", false, true, Partial),
            (b"XYZ / HTTP/1.1", true, true, Invalid),
            (b"XYZ / HTTP/1.1", true, false, Valid),
            (b"XY", false, true, Invalid),
            (b"get / HTTP/1.1", true, true, Invalid),
            (b"GET  / HTTP/1.1", true, true, Invalid),
            (b"GET /a\x01b HTTP/1.1", true, false, Invalid),
            (b"OPTIONS * HTTP/1.1", true, true, Valid),
            (b"CONNECT example.com:443 HTTP/1.1", true, true, Valid),
            (b"GET http://h/ HTTP/1.1", true, true, Valid),
            (b"PRI * HTTP/2.0", true, true, Invalid),
            (b"\x16\x03\x01\x02\x00", false, true, Invalid),
        ];
        for (line, complete, known, want) in cases {
            assert_eq!(check_request_line(line, *complete, *known), *want, "{:?}", String::from_utf8_lossy(line));
        }
    }

    /// A keep-alive connection's requests share one `Host` text, and one `User-Agent` text, when
    /// it does not change: no allocation per request for it.
    #[test]
    fn same_host_on_a_connection_is_shared() {
        let mut conn = Http1Conn::new();
        let mut out = Vec::new();
        let mut ts = 0;
        let mut exchange = |conn: &mut Http1Conn, host: &str| {
            let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ua/{host}\r\n\r\n");
            for (dir, data) in
                [(FlowDir::ToServer, req.as_bytes()), (FlowDir::ToClient, &b"HTTP/1.1 204 No Content\r\n\r\n"[..])]
            {
                ts += 1;
                conn.feed(Chunk { dir, data, total: data.len(), ts_ns: ts }, &mut out);
            }
        };
        exchange(&mut conn, "a.example");
        exchange(&mut conn, "a.example");
        exchange(&mut conn, "b.example");
        let hosts: Vec<Arc<str>> = out.iter().map(|e| e.request.host.clone().unwrap()).collect();
        assert_eq!(hosts.iter().map(|h| &**h).collect::<Vec<_>>(), ["a.example", "a.example", "b.example"]);
        assert!(Arc::ptr_eq(&hosts[0], &hosts[1]));
        assert!(!Arc::ptr_eq(&hosts[1], &hosts[2]));
        let agents: Vec<Arc<str>> = out.iter().map(|e| e.request.user_agent.clone().unwrap()).collect();
        assert_eq!(agents.iter().map(|h| &**h).collect::<Vec<_>>(), ["ua/a.example", "ua/a.example", "ua/b.example"]);
        assert!(Arc::ptr_eq(&agents[0], &agents[1]));
        assert!(!Arc::ptr_eq(&agents[1], &agents[2]));
    }

    #[test]
    fn status_line_checks() {
        use LineCheck::*;
        let cases: &[(&[u8], bool, LineCheck)] = &[
            (b"HTTP/1.1 200 OK", true, Valid),
            (b"HTTP/1.1 200", true, Valid),
            (b"HTTP/1.0 404 Not Found\r", true, Valid),
            (b"HTTP/1.1 20", true, Invalid),
            (b"HTTP/1.1 20", false, Partial),
            (b"HTTP/1.1 200\r", false, Valid),
            (b"HTTP/1.1 2000", true, Invalid),
            (b"HTTP/2 200", true, Invalid),
            (b"HTTP/1.1 abc", false, Invalid),
            (b"H", false, Partial),
            (b"X", false, Invalid),
        ];
        for (line, complete, want) in cases {
            assert_eq!(check_status_line(line, *complete), *want, "{:?}", String::from_utf8_lossy(line));
        }
    }

    /// The line ends `HeadBuf::push` records give the same parse as searching for them, however
    /// the head is cut into chunks, with more lines than are recorded, and with wrong offsets.
    #[test]
    fn recorded_line_ends_parse_like_a_search() {
        let many: String = (0..40).map(|i| format!("X-H{i}: v{i}\r\n")).collect();
        let heads: Vec<(FlowDir, Vec<u8>)> = vec![
            (
                FlowDir::ToServer,
                b"GET /a?b=1 HTTP/1.1\r\nHost: h:80\r\nUser-Agent: t\r\n Bad Line\r\nX: y\r\n\r\n".to_vec(),
            ),
            (FlowDir::ToServer, format!("POST /p HTTP/1.1\r\n{many}Content-Length: 3\r\n\r\n").into_bytes()),
            (FlowDir::ToClient, b"HTTP/1.1 200 OK\nContent-Length: 5\nTransfer-Encoding :chunked\n\n".to_vec()),
        ];
        for (dir, head) in &heads {
            let searched = format!("{:?}", parse_head(*dir, head, &[]));
            for cut in 1..head.len() {
                let mut hb = HeadBuf::new(0, false);
                let mut ends = LineEnds::default();
                let (n1, done1) = hb.push(&head[..cut], 0, &mut ends);
                let (n2, done2) = if done1 { (0, true) } else { hb.push(&head[n1..], 0, &mut ends) };
                assert!(done2 && n1 + n2 == head.len(), "the head ends where it does");
                let bytes = if hb.buf.is_empty() { &head[..] } else { &hb.buf[..] };
                assert_eq!(format!("{:?}", parse_head(*dir, bytes, ends.as_slice())), searched, "cut at {cut}");
            }
            let wrong = [3u16, 1, 500, 7];
            assert_eq!(format!("{:?}", parse_head(*dir, head, &wrong)), searched, "wrong offsets are not trusted");
        }
    }

    #[test]
    fn chunked_decoder_splits() {
        let body: &[u8] = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..=end {
            let mut d = ChunkedDecoder::default();
            let a = d.feed(&body[..split]).unwrap();
            let got = match a {
                Some(n) => n,
                None => split + d.feed(&body[split..]).unwrap().unwrap(),
            };
            assert_eq!(got, end, "split {split}");
        }
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"zz\r\n"), Err(()));
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"\r\n"), Err(()));
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"11111111111111111\r\n"), Err(()));
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"3\r\nabcX"), Err(()));
    }

    #[test]
    fn chunked_decoder_uncaptured() {
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"10\r\nab").unwrap(), None);
        assert!(d.skip_uncaptured(14));
        assert_eq!(d.feed(b"\r\n0\r\n\r\n").unwrap(), Some(7));
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"10\r\nab").unwrap(), None);
        assert!(!d.skip_uncaptured(15));
    }

    #[test]
    fn content_length_values() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"42"), Some(42));
        assert_eq!(parse_content_length(b"42, 42"), Some(42));
        assert_eq!(parse_content_length(b"42, 43"), None);
        assert_eq!(parse_content_length(b"-1"), None);
        assert_eq!(parse_content_length(b""), None);
        assert_eq!(parse_content_length(b"99999999999999999999"), None);
        assert_eq!(parse_content_length(b"1e3"), None);
    }
}
