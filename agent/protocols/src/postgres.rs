//! PostgreSQL frontend/backend protocol v3 → [`DbCall`]s.
//!
//! # What it handles
//! * Startup: `StartupMessage` (namespace = `database`, else `user`), `SSLRequest` /
//!   `GSSENCRequest` (answer `N` → the startup follows in clear; `S`/`G` → encrypted from here on:
//!   the connection is ignored for good), `CancelRequest` (nothing to report), a TLS ClientHello
//!   as first bytes (direct TLS: ignored for good), authentication (`R` requests, `p`
//!   password/SASL/GSS messages: **their bodies are never buffered, parsed or stored**).
//! * Simple query `Q`: **one call per `Q` message**, completed by `ReadyForQuery`. A
//!   multi-statement text gets `batch_size` = statement count, operation `BATCH <op>` when all
//!   statements share one operation (else `BATCH`), collection when they share one, summary =
//!   distinct statement summaries joined by `"; "`, rows = sum of the CommandComplete counts.
//!   The first `ErrorResponse` gives status/error. `EmptyQueryResponse` → a call with no text.
//! * Extended query: **one call per `Execute`** (timestamps: first frontend message since the
//!   previous `Execute`/`Sync` → its `CommandComplete`/`EmptyQueryResponse`/`PortalSuspended`/
//!   `ErrorResponse`). Statement names → redacted SQL are remembered per connection (LRU, 256
//!   statements + the unnamed one; 64 portals), so executions of a prepared statement report its
//!   SQL. When `Parse`/`Bind`/`Describe` fails, the error is reported on the group's first
//!   `Execute` (or, when the group has none, on a call for the failing statement); the rest of
//!   the group up to `Sync` is skipped as the server does. Pipelined `Sync`s and `Flush` work.
//! * COPY in/out (`G`/`H`/`W`, `d`/`c`/`f` in both directions) is passed over; the `COPY`
//!   statement's call completes normally. Function calls (`F`) are tracked but emit nothing.
//! * `NoticeResponse`, `ParameterStatus`, `NotificationResponse`, `BackendKeyData`,
//!   `NegotiateProtocolVersion` are skipped wherever they appear.
//!
//! # Lost bytes and resynchronisation
//! Each direction is framed by length prefix, so uncaptured bytes *inside* a message (a chunk
//! whose `total > data.len()`) are skipped without losing sync. When uncaptured bytes cross a
//! message boundary, or a header is implausible (unknown type byte for the direction, or a
//! length outside the type's bounds), that direction is *lost* and resynchronises on a later
//! chunk: candidate offsets are tried in order, and one is accepted when the messages parsed
//! from it chain with valid headers and type-specific body checks (e.g. `Z` is 5 bytes with
//! status `I`/`T`/`E`, `C` is a printable tag, `D`/`T`/`B`/`P` lengths add up exactly) to the end
//! of the captured data (a last partial message is allowed). At a chunk's first byte one
//! plausible message suffices; elsewhere a strongly validated one is required. Mid-stream
//! adoption (first bytes are not a startup packet) uses the same rule and leaves the namespace
//! unknown. While anything was lost, calls are `approximate`; when a new request group starts
//! while the response direction is still lost, the outstanding calls are flushed as
//! approximate (clients wait for `ReadyForQuery` unless pipelining).
//!
//! # Redaction
//! Query texts go through [`crate::sql::redact`]; only redacted SQL is kept in the statement
//! cache. Errors keep severity + SQLSTATE + the primary message with quoted parts and numbers
//! replaced by `?` (`ERROR 42P01: relation ? does not exist`); for user-raised errors (class
//! `P0`) the message is dropped. Error detail/hint/where fields are never read.
//!
//! # Limits
//! SQL longer than 32 KiB is truncated before redaction (unterminated literals at the cut are
//! redacted to the end). At most 1024 expected responses are tracked; beyond that requests are
//! counted in [`ParserStats::dropped`] and their responses skipped. Protocol versions other
//! than 3.x are ignored.
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use crate::db::{DbCall, DbSystem, ParserStats, redact_message};
use crate::{Chunk, FlowDir, sql};

const MAX_SQL: usize = 32 * 1024;
const MAX_INFLIGHT: usize = 1024;
const MAX_STATEMENTS: usize = 256;
const MAX_PORTALS: usize = 64;
/// PostgreSQL refuses messages above 1 GiB.
const MAX_MSG: usize = 1 << 30;
/// Untyped startup-phase packets (PostgreSQL caps them at 10000 bytes).
const MAX_STARTUP: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

// ---------------------------------------------------------------------------------------------
// Helpers

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The NUL-terminated string at `*pos`; advances past the NUL.
fn cstr<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = b.get(*pos..)?;
    let n = rest.iter().position(|&c| c == 0)?;
    *pos += n + 1;
    Some(&rest[..n])
}

fn printable(b: &[u8]) -> bool {
    b.iter().all(|&c| c >= 0x20 && c != 0x7f || c == b'\t' || c == b'\n' || c == b'\r')
}

// ---------------------------------------------------------------------------------------------
// Message validation (framing sanity and resync scoring)

fn valid_type(dir: FlowDir, ty: u8) -> bool {
    match dir {
        FlowDir::ToServer => b"QPBEDSHCXFdcfp".contains(&ty),
        FlowDir::ToClient => b"RKSZCTDEN123ntsIGHWdcAVv".contains(&ty),
    }
}

/// Bounds of the length field (which counts itself) for a message type.
fn len_bounds(dir: FlowDir, ty: u8) -> (usize, usize) {
    match (dir, ty) {
        (FlowDir::ToServer, b'S' | b'H' | b'X' | b'c') => (4, 4),
        (FlowDir::ToServer, b'E') => (9, 4 + 1024 + 4),
        (FlowDir::ToServer, b'D' | b'C') => (6, 4 + 1 + 1024),
        (FlowDir::ToClient, b'Z') => (5, 5),
        (FlowDir::ToClient, b'1' | b'2' | b'3' | b'n' | b's' | b'I' | b'c') => (4, 4),
        (FlowDir::ToClient, b'K') => (12, 4 + 256 + 4),
        (FlowDir::ToClient, b'R') => (8, 64 * 1024),
        (FlowDir::ToClient, b'C') => (5, 4 + 1024),
        (FlowDir::ToClient, b'S') => (6, 64 * 1024),
        (_, b'p') => (4, 64 * 1024),
        _ => (4, MAX_MSG),
    }
}

/// How convincing a message is as a resync point: `None` = impossible, else a score
/// (3 strong, 2 good, 1 weak-but-consistent, 0 anything-goes payload like CopyData).
/// `body` may be a prefix (`complete == false`).
fn score_body(dir: FlowDir, ty: u8, body: &[u8], complete: bool) -> Option<u32> {
    use FlowDir::*;
    let n = body.len();
    let exact =
        |need: usize| -> Option<u32> { if complete { (need == n).then_some(3) } else { (need >= n).then_some(2) } };
    match (dir, ty) {
        (ToServer, b'Q') => {
            let (text, term) = if complete && n > 0 { (&body[..n - 1], body[n - 1] == 0) } else { (body, true) };
            if !term || !printable(text) {
                return None;
            }
            Some(if complete || n >= 8 { 3 } else { 1 })
        }
        (ToServer, b'P') => {
            let mut p = 0;
            let name = cstr(body, &mut p);
            let Some(name) = name else {
                return (!complete && printable(body)).then_some(1);
            };
            if !printable(name) || name.len() > 255 {
                return None;
            }
            let Some(q) = cstr(body, &mut p) else {
                return (!complete && printable(&body[p..])).then_some(2);
            };
            if !printable(q) {
                return None;
            }
            if n < p + 2 {
                return (!complete).then_some(2);
            }
            let k = be16(&body[p..]) as usize;
            exact(p + 2 + 4 * k)
        }
        (ToServer, b'B') => {
            let mut p = 0;
            let (Some(portal), Some(stmt)) = (cstr(body, &mut p), cstr(body, &mut p)) else {
                return (!complete && body.len() < 512).then_some(1);
            };
            if !printable(portal) || !printable(stmt) {
                return None;
            }
            // formats
            let mut walk = || -> Option<bool> {
                let nf = be16(body.get(p..p + 2)?) as usize;
                p += 2;
                for _ in 0..nf {
                    if be16(body.get(p..p + 2)?) > 1 {
                        return Some(false);
                    }
                    p += 2;
                }
                let np = be16(body.get(p..p + 2)?) as usize;
                p += 2;
                if nf > 1 && nf != np {
                    return Some(false);
                }
                for _ in 0..np {
                    let l = be32(body.get(p..p + 4)?) as i32;
                    p += 4;
                    if l < -1 {
                        return Some(false);
                    }
                    p += l.max(0) as usize;
                }
                let nr = be16(body.get(p..p + 2)?) as usize;
                p += 2;
                for _ in 0..nr {
                    if be16(body.get(p..p + 2)?) > 1 {
                        return Some(false);
                    }
                    p += 2;
                }
                Some(p == n)
            };
            match walk() {
                Some(true) => Some(3),
                Some(false) => None,
                None => (!complete).then_some(2),
            }
        }
        (ToServer, b'E') => {
            let mut p = 0;
            let name = cstr(body, &mut p)?;
            if !printable(name) {
                return None;
            }
            exact(p + 4)
        }
        (ToServer, b'D' | b'C') => {
            if !matches!(body.first(), Some(b'S' | b'P')) {
                return None;
            }
            let mut p = 1;
            match cstr(body, &mut p) {
                Some(name) if printable(name) => exact(p),
                Some(_) => None,
                None => (!complete).then_some(1),
            }
        }
        (ToServer, b'S' | b'H' | b'X' | b'c') => Some(1),
        (ToServer, b'f') => {
            let mut p = 0;
            match cstr(body, &mut p) {
                Some(_) => exact(p),
                None => (!complete).then_some(0),
            }
        }
        (ToServer, b'd' | b'p' | b'F') => Some(0),
        (ToClient, b'Z') => {
            if complete {
                matches!(body, [b'I' | b'T' | b'E']).then_some(3)
            } else {
                Some(0)
            }
        }
        (ToClient, b'C') => {
            if !body.first().is_none_or(u8::is_ascii_uppercase) {
                return None;
            }
            if complete {
                let ok = n >= 2 && body[n - 1] == 0 && printable(&body[..n - 1]);
                ok.then_some(3)
            } else {
                printable(body).then_some(1)
            }
        }
        (ToClient, b'T') => {
            let walk = || -> Option<bool> {
                let nf = be16(body.get(0..2)?) as usize;
                let mut p = 2;
                for _ in 0..nf {
                    let name = cstr(body, &mut p)?;
                    if !printable(name) {
                        return Some(false);
                    }
                    body.get(p..p + 18)?;
                    p += 18;
                }
                Some(p == n)
            };
            match walk() {
                Some(true) => Some(3),
                Some(false) => None,
                None => (!complete).then_some(2),
            }
        }
        (ToClient, b'D') => {
            let walk = || -> Option<bool> {
                let nc = be16(body.get(0..2)?) as usize;
                if nc > 1664 {
                    return Some(false);
                }
                let mut p = 2;
                for _ in 0..nc {
                    let l = be32(body.get(p..p + 4)?) as i32;
                    if l < -1 {
                        return Some(false);
                    }
                    p += 4 + l.max(0) as usize;
                    if p > n {
                        return if complete { Some(false) } else { None };
                    }
                }
                Some(p == n)
            };
            match walk() {
                Some(true) => Some(3),
                Some(false) => None,
                None => (!complete).then_some(1),
            }
        }
        (ToClient, b'E' | b'N') => {
            let mut p = 0;
            loop {
                let Some(&code) = body.get(p) else {
                    return (!complete).then_some(1);
                };
                if code == 0 {
                    return (p + 1 == n).then_some(3);
                }
                if !code.is_ascii_alphabetic() {
                    return None;
                }
                p += 1;
                match cstr(body, &mut p) {
                    Some(v) if printable(v) => {}
                    Some(_) => return None,
                    None => return (!complete).then_some(2),
                }
            }
        }
        (ToClient, b'S') => {
            let mut p = 0;
            match (cstr(body, &mut p), cstr(body, &mut p)) {
                (Some(a), Some(b)) if printable(a) && printable(b) => exact(p),
                (Some(_), Some(_)) => None,
                _ => (!complete).then_some(1),
            }
        }
        (ToClient, b't') => {
            let Some(k) = body.get(0..2).map(be16) else {
                return (!complete).then_some(0);
            };
            exact(2 + 4 * k as usize)
        }
        (ToClient, b'G' | b'H' | b'W') => {
            let Some(k) = body.get(1..3).map(be16) else {
                return (!complete).then_some(0);
            };
            if body[0] > 1 {
                return None;
            }
            exact(3 + 2 * k as usize)
        }
        (ToClient, b'R') => {
            let Some(code) = body.get(0..4).map(be32) else {
                return (!complete).then_some(0);
            };
            if !matches!(code, 0 | 2 | 3 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | 12) {
                return None;
            }
            Some(2)
        }
        (ToClient, b'A') => Some(1),
        (ToClient, b'V') => {
            let Some(l) = body.get(0..4).map(be32) else {
                return (!complete).then_some(0);
            };
            exact(4 + (l as i32).max(0) as usize)
        }
        (ToClient, b'1' | b'2' | b'3' | b'n' | b's' | b'I' | b'c') => Some(1),
        (ToClient, b'K' | b'v') => Some(1),
        (ToClient, b'd') => Some(0),
        _ => None,
    }
}

/// Total score of the message chain starting at `data[0]`, or `None` when it breaks.
/// The chain must reach the end of `data` (the last message may be partial).
fn chain_score(dir: FlowDir, data: &[u8]) -> Option<u32> {
    let mut p = 0;
    let mut score = 0;
    let mut msgs = 0;
    while p < data.len() {
        let ty = data[p];
        if !valid_type(dir, ty) {
            return None;
        }
        if data.len() - p < 5 {
            // Partial header: nothing more to check.
            return Some(score);
        }
        let len = be32(&data[p + 1..]) as usize;
        let (lo, hi) = len_bounds(dir, ty);
        if len < lo || len > hi {
            return None;
        }
        let body_end = p + 1 + len;
        let complete = body_end <= data.len();
        let body = &data[p + 5..body_end.min(data.len())];
        score += score_body(dir, ty, body, complete)?;
        msgs += 1;
        if !complete || msgs >= 64 {
            return Some(score);
        }
        p = body_end;
    }
    Some(score)
}

/// First offset of `data` from which a plausible message chain starts.
fn find_resync(dir: FlowDir, data: &[u8], chunk_start: bool) -> Option<usize> {
    (0..data.len()).find(|&o| {
        let need = if o == 0 && chunk_start { 1 } else { 3 };
        chain_score(dir, &data[o..]).is_some_and(|s| s >= need)
    })
}

/// StartupMessage / SSLRequest / GSSENCRequest / CancelRequest (the untyped packets a
/// connection starts with). Works on a prefix of at least 8 bytes.
pub fn looks_like_postgres_startup(data: &[u8]) -> bool {
    if data.len() < 8 {
        return false;
    }
    let len = be32(data) as usize;
    let code = be32(&data[4..]);
    match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        c if c >> 16 == 3 => {
            if !(8 + 5..=MAX_STARTUP).contains(&len) {
                return false;
            }
            // Parameters: printable key/value C strings; a complete packet ends with a NUL and
            // names `user`.
            let params = &data[8..data.len().min(len)];
            if !params.iter().all(|&c| c == 0 || (0x20..0x7f).contains(&c) || c >= 0x80) {
                return false;
            }
            if data.len() >= len {
                params.last() == Some(&0) && params.windows(5).any(|w| w == b"user\0")
            } else {
                true
            }
        }
        _ => false,
    }
}

/// A plausible typed frontend message (chain) at the start of `data`: requires at least one
/// strongly validated message (`Q`, `P`, `B`, `E`, `D`, `C`…), so a lone `Sync` does not count.
pub fn looks_like_postgres_frontend(data: &[u8]) -> bool {
    chain_score(FlowDir::ToServer, data).is_some_and(|s| s >= 2)
}

// ---------------------------------------------------------------------------------------------
// Framing

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    Prefix(usize),
    /// Up to and including the n-th NUL (at most 1 KiB).
    CStrings(u8),
}

fn keep_rule(dir: FlowDir, ty: u8) -> Keep {
    match (dir, ty) {
        (FlowDir::ToServer, 0) => Keep::Prefix(MAX_STARTUP),
        (FlowDir::ToServer, b'Q' | b'P') => Keep::Prefix(MAX_SQL + 512),
        (FlowDir::ToServer, b'B') => Keep::CStrings(2),
        (FlowDir::ToServer, b'E' | b'D' | b'C') => Keep::Prefix(1100),
        (FlowDir::ToClient, b'C') => Keep::Prefix(1100),
        (FlowDir::ToClient, b'E') => Keep::Prefix(4096),
        (FlowDir::ToClient, b'Z') => Keep::Prefix(1),
        _ => Keep::Nothing,
    }
}

struct Msg {
    /// 0 for an untyped (startup-phase) packet.
    ty: u8,
    /// The framer resynchronised earlier in the chunk that completed this message.
    after_resync: bool,
    /// Kept prefix of the body.
    body: Vec<u8>,
    start_ts: u64,
    end_ts: u64,
}

struct Body {
    ty: u8,
    remaining: usize,
    keep: Keep,
    nuls: u8,
    body: Vec<u8>,
    partial: bool,
    start_ts: u64,
}

enum FState {
    Lost,
    Header { buf: [u8; 5], have: usize, start_ts: u64 },
    Body(Box<Body>),
}

/// What the consumer of a message wants next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    Same,
    Typed,
    Untyped,
}

struct Framer {
    dir: FlowDir,
    untyped: bool,
    state: FState,
    /// The state went Lost after the stream had been in sync (not the initial unknown).
    lost_after_sync: bool,
    /// Never synced: a plausible message at the first byte is the normal adoption.
    fresh: bool,
    /// A resync happened and no message has completed since.
    resync_pending: bool,
    parse_errors: u64,
    resyncs: u64,
    desyncs: u64,
}

#[derive(Default)]
struct FeedOutcome {
    lost: bool,
    resynced: bool,
}

impl Framer {
    fn new(dir: FlowDir) -> Self {
        Framer {
            dir,
            untyped: false,
            state: FState::Lost,
            lost_after_sync: false,
            fresh: true,
            resync_pending: false,
            parse_errors: 0,
            resyncs: 0,
            desyncs: 0,
        }
    }

    fn synced(&mut self) {
        self.state = FState::Header { buf: [0; 5], have: 0, start_ts: 0 };
        self.lost_after_sync = false;
        self.fresh = false;
    }

    fn is_lost(&self) -> bool {
        matches!(self.state, FState::Lost)
    }

    fn lose(&mut self, out: &mut FeedOutcome) {
        if !self.is_lost() {
            self.lost_after_sync = true;
            self.desyncs += 1;
            out.lost = true;
        }
        self.state = FState::Lost;
    }

    fn feed(&mut self, data: &[u8], mut gap: usize, ts: u64, sink: &mut dyn FnMut(Msg) -> Next) -> FeedOutcome {
        let mut res = FeedOutcome::default();
        let mut i = 0usize;
        loop {
            match &mut self.state {
                FState::Lost => {
                    if i >= data.len() {
                        break;
                    }
                    let fresh = self.fresh && i == 0;
                    self.fresh = false;
                    match find_resync(self.dir, &data[i..], i == 0) {
                        Some(o) => {
                            i += o;
                            self.untyped = false;
                            self.synced();
                            if !(fresh && o == 0) {
                                // Not just the normal mid-stream adoption at a chunk start.
                                self.resyncs += 1;
                                res.resynced = true;
                                self.resync_pending = true;
                            }
                        }
                        None => break,
                    }
                }
                FState::Header { buf, have, start_ts } => {
                    if i >= data.len() {
                        break;
                    }
                    let need = if self.untyped { 4 } else { 5 };
                    if *have == 0 {
                        *start_ts = ts;
                    }
                    let hdr_pos = i;
                    let take = (need - *have).min(data.len() - i);
                    buf[*have..*have + take].copy_from_slice(&data[i..i + take]);
                    *have += take;
                    i += take;
                    if *have < need {
                        break;
                    }
                    let (ty, len) =
                        if self.untyped { (0, be32(&buf[..4]) as usize) } else { (buf[0], be32(&buf[1..5]) as usize) };
                    let ok = if self.untyped {
                        (8..=MAX_STARTUP).contains(&len)
                    } else {
                        let (lo, hi) = len_bounds(self.dir, ty);
                        valid_type(self.dir, ty) && len >= lo && len <= hi
                    };
                    if !ok {
                        self.parse_errors += 1;
                        self.lose(&mut res);
                        // Re-scan from just after the bad header's first byte when it was all
                        // in this chunk.
                        if take == need {
                            i = hdr_pos + 1;
                        }
                        continue;
                    }
                    let start_ts = *start_ts;
                    let rule = keep_rule(self.dir, ty);
                    self.state = FState::Body(Box::new(Body {
                        ty,
                        remaining: len - 4,
                        keep: rule,
                        nuls: 0,
                        body: Vec::new(),
                        partial: false,
                        start_ts,
                    }));
                    if len == 4 {
                        self.finish(ts, sink);
                    }
                }
                FState::Body(b) => {
                    if i >= data.len() {
                        break;
                    }
                    let take = b.remaining.min(data.len() - i);
                    let bytes = &data[i..i + take];
                    match b.keep {
                        Keep::Nothing => {}
                        Keep::Prefix(max) => {
                            let room = max.saturating_sub(b.body.len());
                            b.body.extend_from_slice(&bytes[..room.min(take)]);
                            if room < take {
                                b.partial = true;
                            }
                        }
                        Keep::CStrings(n) => {
                            for &c in bytes {
                                if b.nuls >= n || b.body.len() >= 1024 {
                                    break;
                                }
                                b.body.push(c);
                                if c == 0 {
                                    b.nuls += 1;
                                }
                            }
                        }
                    }
                    b.remaining -= take;
                    i += take;
                    if b.remaining == 0 {
                        self.finish(ts, sink);
                    } else {
                        break;
                    }
                }
            }
        }
        if gap > 0 {
            if let FState::Body(b) = &mut self.state {
                let t = gap.min(b.remaining);
                b.remaining -= t;
                b.partial = true;
                gap -= t;
                if b.remaining == 0 {
                    self.finish(ts, sink);
                }
            }
            if gap > 0 {
                self.lose(&mut res);
            }
        }
        res
    }

    fn finish(&mut self, ts: u64, sink: &mut dyn FnMut(Msg) -> Next) {
        let FState::Body(b) = std::mem::replace(&mut self.state, FState::Header { buf: [0; 5], have: 0, start_ts: 0 })
        else {
            return;
        };
        let b = *b;
        let msg = Msg {
            ty: b.ty,
            after_resync: std::mem::take(&mut self.resync_pending),
            body: b.body,
            start_ts: b.start_ts,
            end_ts: ts,
        };
        match sink(msg) {
            Next::Same => {}
            Next::Typed => self.untyped = false,
            Next::Untyped => self.untyped = true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pairing

/// What is known about a statement (only redacted text is kept).
#[derive(Debug, Default, PartialEq, Eq)]
struct StmtInfo {
    query_text: Option<String>,
    operation: Option<String>,
    collection: Option<String>,
    summary: Option<String>,
    batch_size: Option<u32>,
}

fn sql_text(body: &[u8]) -> String {
    let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
    let b = &body[..end.min(MAX_SQL)];
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
fn stmt_info(sql: &str) -> StmtInfo {
    stmt_info_redacted(sql, sql::redact(sql))
}

/// The facts of `sql`, or `last`'s when its redacted text is the same: clients repeat one
/// statement shape with new literals, and everything but the text is decided by keywords and
/// names, which redaction keeps — so the split and describe passes are skipped (a fifth of the
/// agent's time under `pgbench -S`).
fn stmt_info_reusing(last: &mut Option<Arc<StmtInfo>>, sql: &str) -> Arc<StmtInfo> {
    let redacted = sql::redact(sql);
    if let Some(l) = last.as_ref().filter(|l| l.query_text.as_deref().unwrap_or("") == redacted) {
        return Arc::clone(l);
    }
    let info = Arc::new(stmt_info_redacted(sql, redacted));
    *last = Some(Arc::clone(&info));
    info
}

fn stmt_info_redacted(sql: &str, redacted: String) -> StmtInfo {
    let stmts = sql::split_statements(sql);
    let query_text = (!redacted.is_empty()).then_some(redacted);
    if stmts.len() <= 1 {
        let (operation, collection, summary) = sql::describe(stmts.first().copied().unwrap_or(""));
        return StmtInfo {
            query_text,
            operation,
            collection,
            summary: (!summary.is_empty()).then_some(summary),
            batch_size: None,
        };
    }
    let descs: Vec<_> = stmts.iter().map(|s| sql::describe(s)).collect();
    let first_op = &descs[0].0;
    let same_op = first_op.is_some() && descs.iter().all(|d| &d.0 == first_op);
    let operation = Some(match (same_op, first_op) {
        (true, Some(op)) => format!("BATCH {op}"),
        _ => "BATCH".to_string(),
    });
    let first_coll = &descs[0].1;
    let collection = if descs.iter().all(|d| &d.1 == first_coll) { first_coll.clone() } else { None };
    let mut summary = String::new();
    let mut seen: Vec<&str> = Vec::new();
    for d in &descs {
        if d.2.is_empty() || seen.contains(&d.2.as_str()) {
            continue;
        }
        seen.push(&d.2);
        if summary.len() + d.2.len() > 255 {
            break;
        }
        if !summary.is_empty() {
            summary.push_str("; ");
        }
        summary.push_str(&d.2);
    }
    StmtInfo {
        query_text,
        operation,
        collection,
        summary: (!summary.is_empty()).then_some(summary),
        batch_size: Some(stmts.len().min(u32::MAX as usize) as u32),
    }
}

/// A call being assembled.
struct Acc {
    info: Option<Arc<StmtInfo>>,
    start_ns: u64,
    rows: Option<u64>,
    data_rows: u64,
    status: Option<String>,
    error: Option<String>,
}

impl Acc {
    fn new(info: Option<Arc<StmtInfo>>, start_ns: u64) -> Box<Self> {
        Box::new(Acc { info, start_ns, rows: None, data_rows: 0, status: None, error: None })
    }
}

enum Expect {
    /// `Q`: completes at `Z`.
    Simple(Box<Acc>),
    Parse(Option<Arc<StmtInfo>>, u64),
    Bind(Option<Arc<StmtInfo>>, u64),
    Describe(Option<Arc<StmtInfo>>, u64),
    Close,
    Execute(Box<Acc>),
    Sync,
    /// `F`: `V` then `Z`.
    Func,
    /// Untracked request groups (queue overflow): swallow responses through this many `Z`.
    Skip(u32),
}

/// Bounded name → statement map with least-recently-used eviction.
struct Lru {
    cap: usize,
    tick: u64,
    map: HashMap<Vec<u8>, (Arc<StmtInfo>, u64)>,
}

impl Lru {
    fn new(cap: usize) -> Self {
        Lru { cap, tick: 0, map: HashMap::new() }
    }
    fn get(&mut self, k: &[u8]) -> Option<Arc<StmtInfo>> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(k).map(|e| {
            e.1 = t;
            e.0.clone()
        })
    }
    fn put(&mut self, k: &[u8], v: Arc<StmtInfo>) {
        self.tick += 1;
        if !self.map.contains_key(k) && self.map.len() >= self.cap {
            if let Some(old) = self.map.iter().min_by_key(|e| e.1.1).map(|e| e.0.clone()) {
                self.map.remove(&old);
            }
        }
        self.map.insert(k.to_vec(), (v, self.tick));
    }
    fn remove(&mut self, k: &[u8]) {
        self.map.remove(k);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet on the frontend.
    Initial,
    /// Startup packets (untyped) expected.
    Startup,
    /// Waiting for the one-byte answer to SSLRequest/GSSENCRequest.
    AwaitEncAnswer,
    /// Typed messages flowing.
    Running,
    /// Encrypted, cancelled, unsupported or closed: ignore everything.
    Dead,
}

struct State {
    phase: Phase,
    namespace: Option<String>,
    queue: VecDeque<Expect>,
    statements: Lru,
    unnamed_stmt: Option<Arc<StmtInfo>>,
    portals: Lru,
    unnamed_portal: Option<Arc<StmtInfo>>,
    /// The facts of the last statement text parsed on this connection (see [`stmt_info_reusing`]).
    last_info: Option<Arc<StmtInfo>>,
    /// Start of the call being prepared (first frontend message since the last call boundary).
    call_start: Option<u64>,
    /// After an extended-protocol error: frontend messages up to `Sync` are discarded.
    discard_until_sync: bool,
    /// Requests are being dropped (queue full) until the current group ends.
    dropping: bool,
    /// Bytes were lost while calls were in flight.
    uncertain: bool,
    /// The frontend's last message was a `Sync` (or nothing yet): the next one opens a group.
    group_closed: bool,
    last_be_ts: u64,
    /// First frontend bytes, held until there are 8 to recognise a startup packet.
    initial: Vec<u8>,
    initial_ts: u64,
    /// The backend direction lost sync after having been in sync (and has not resynced).
    be_lost: bool,
    stats: ParserStats,
}

/// PostgreSQL connection parser. See the module docs.
pub struct PgConn {
    fe: Framer,
    be: Framer,
    st: State,
}

impl Default for PgConn {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PgConn {
    /// Never prints buffered bytes (they may hold literals).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConn")
            .field("namespace", &self.st.namespace)
            .field("in_flight", &self.st.queue.len())
            .field("statements", &self.st.statements.map.len())
            .field("stats", &self.st.stats)
            .finish_non_exhaustive()
    }
}

impl PgConn {
    pub fn new() -> Self {
        PgConn {
            fe: Framer::new(FlowDir::ToServer),
            be: Framer::new(FlowDir::ToClient),
            st: State {
                phase: Phase::Initial,
                namespace: None,
                queue: VecDeque::new(),
                statements: Lru::new(MAX_STATEMENTS),
                unnamed_stmt: None,
                portals: Lru::new(MAX_PORTALS),
                unnamed_portal: None,
                last_info: None,
                call_start: None,
                discard_until_sync: false,
                dropping: false,
                uncertain: false,
                group_closed: true,
                last_be_ts: 0,
                initial: Vec::new(),
                initial_ts: 0,
                be_lost: false,
                stats: ParserStats::default(),
            },
        }
    }

    /// The database name, once known from the StartupMessage.
    pub fn namespace(&self) -> Option<&str> {
        self.st.namespace.as_deref()
    }

    pub fn stats(&self) -> ParserStats {
        let mut s = self.st.stats;
        s.parse_errors += self.fe.parse_errors + self.be.parse_errors;
        s.resyncs += self.fe.resyncs + self.be.resyncs;
        s.desyncs += self.fe.desyncs + self.be.desyncs;
        s
    }

    pub fn feed(&mut self, c: Chunk<'_>, out: &mut Vec<DbCall>) {
        let gap = c.total.saturating_sub(c.data.len());
        if self.st.phase == Phase::Dead {
            return;
        }
        match c.dir {
            FlowDir::ToServer => {
                if self.st.phase == Phase::Initial {
                    let st = &mut self.st;
                    if st.initial.len() + c.data.len() < 8 && gap == 0 {
                        // Too short to tell a startup packet: wait for more (or for the server
                        // to answer, which rules a startup packet out).
                        if st.initial.is_empty() {
                            st.initial_ts = c.ts_ns;
                        }
                        st.initial.extend_from_slice(c.data);
                        return;
                    }
                    let mut buf = std::mem::take(&mut st.initial);
                    buf.extend_from_slice(c.data);
                    if buf.len() >= 2 && buf[0] == 0x16 && buf[1] == 0x03 {
                        st.phase = Phase::Dead; // direct TLS
                        return;
                    }
                    if looks_like_postgres_startup(&buf) {
                        st.phase = Phase::Startup;
                        self.fe.untyped = true;
                        self.fe.synced();
                        self.be.synced();
                    } else {
                        st.phase = Phase::Running;
                    }
                    self.feed_fe(&buf, gap, c.ts_ns, out);
                } else {
                    self.feed_fe(c.data, gap, c.ts_ns, out);
                }
            }
            FlowDir::ToClient => {
                if self.st.phase == Phase::Initial && !self.st.initial.is_empty() {
                    // The server answered: the held bytes were typed messages, not a startup.
                    let buf = std::mem::take(&mut self.st.initial);
                    self.st.phase = Phase::Running;
                    let ts = self.st.initial_ts;
                    self.feed_fe(&buf, 0, ts, out);
                }
                let mut data = c.data;
                let st = &mut self.st;
                st.last_be_ts = c.ts_ns;
                if st.phase == Phase::AwaitEncAnswer {
                    let Some(&b) = data.first() else { return };
                    match b {
                        b'N' => {
                            data = &data[1..];
                            st.phase = Phase::Startup;
                            self.fe.untyped = true;
                            self.fe.synced();
                        }
                        b'E' => st.phase = Phase::Running, // ancient server: error follows
                        _ => {
                            st.phase = Phase::Dead; // 'S' / 'G': encrypted from here on
                            return;
                        }
                    }
                }
                let r = self.be.feed(data, gap, c.ts_ns, &mut |m| {
                    st.on_backend(m, out);
                    Next::Same
                });
                if r.lost || r.resynced {
                    st.uncertain = true;
                }
            }
        }
    }

    fn feed_fe(&mut self, data: &[u8], gap: usize, ts: u64, out: &mut Vec<DbCall>) {
        let st = &mut self.st;
        st.be_lost = self.be.is_lost() && self.be.lost_after_sync;
        let r = self.fe.feed(data, gap, ts, &mut |m| st.on_frontend(m, out));
        if r.lost || r.resynced {
            st.uncertain = true;
        }
        if st.phase == Phase::Dead {
            st.queue.clear();
        }
    }

    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<DbCall>) {
        self.st.flush_all(ts_ns, out);
        self.st.phase = Phase::Dead;
    }
}

fn tag_rows(body: &[u8]) -> Option<u64> {
    let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
    let tag = std::str::from_utf8(&body[..end]).ok()?;
    let mut words = tag.split_ascii_whitespace();
    let verb = words.next()?;
    if !matches!(verb, "INSERT" | "SELECT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY") {
        return None;
    }
    words.last()?.parse().ok()
}

/// (SQLSTATE, redacted error message) from an ErrorResponse body.
fn parse_error(body: &[u8]) -> (Option<String>, String) {
    let (mut sev_v, mut sev_s, mut code, mut msg) = (None, None, None, None);
    let mut p = 0;
    while let Some(&t) = body.get(p) {
        if t == 0 {
            break;
        }
        p += 1;
        let Some(v) = cstr(body, &mut p) else {
            // Truncated field: only the message may be usable (it is redacted anyway).
            if t == b'M' {
                msg = Some(&body[p..]);
            }
            break;
        };
        match t {
            b'V' => sev_v = Some(v),
            b'S' => sev_s = Some(v),
            b'C' => code = Some(v),
            b'M' => msg = Some(v),
            _ => {}
        }
    }
    let word = |v: Option<&[u8]>| {
        v.filter(|v| !v.is_empty() && v.len() <= 16 && v.iter().all(u8::is_ascii_alphanumeric))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let code = word(code);
    let sev = word(sev_v).or_else(|| word(sev_s)).unwrap_or_else(|| "ERROR".into());
    let mut e = sev;
    if let Some(c) = &code {
        e.push(' ');
        e.push_str(c);
    }
    let user_raised = code.as_deref().is_some_and(|c| c.starts_with("P0"));
    if let (Some(m), false) = (msg, user_raised) {
        let m = redact_message(m, 160);
        if !m.is_empty() {
            e.push_str(": ");
            e.push_str(&m);
        }
    }
    (code, e)
}

fn name_of(body: &[u8], p: &mut usize) -> Option<Vec<u8>> {
    cstr(body, p).map(<[u8]>::to_vec)
}

impl State {
    fn emit(&mut self, acc: Acc, end_ns: u64, approximate: bool, out: &mut Vec<DbCall>) {
        let mut c = DbCall::new(DbSystem::Postgresql, acc.start_ns);
        if let Some(i) = &acc.info {
            c.operation = i.operation.clone().map(Cow::Owned);
            c.collection = i.collection.clone();
            c.query_text = i.query_text.clone();
            c.summary = i.summary.clone().map(Cow::Owned);
            c.batch_size = i.batch_size;
        }
        c.namespace = self.namespace.clone();
        c.status_code = acc.status;
        c.error_message = acc.error;
        c.rows = acc.rows;
        c.end_ns = end_ns.max(acc.start_ns);
        c.approximate = approximate || self.uncertain;
        out.push(c);
    }

    fn push(&mut self, e: Expect) {
        let boundary = matches!(e, Expect::Sync | Expect::Simple(_) | Expect::Func);
        if self.dropping || self.queue.len() >= MAX_INFLIGHT {
            if matches!(e, Expect::Simple(_) | Expect::Execute(_)) {
                self.stats.dropped += 1;
            }
            self.dropping = true;
            if boundary {
                match self.queue.back_mut() {
                    Some(Expect::Skip(n)) => *n = n.saturating_add(1),
                    _ => self.queue.push_back(Expect::Skip(1)),
                }
                self.dropping = false;
            }
            return;
        }
        self.queue.push_back(e);
    }

    /// Emit every outstanding call as approximate, ending at `ts`, and forget the rest.
    fn flush_all(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        while let Some(e) = self.queue.pop_front() {
            if let Expect::Simple(a) | Expect::Execute(a) = e {
                self.emit(*a, ts, true, out);
            }
        }
        self.call_start = None;
        self.discard_until_sync = false;
        self.dropping = false;
        self.uncertain = false;
    }

    fn on_startup(&mut self, m: Msg) -> Next {
        if m.body.len() < 4 {
            return Next::Same;
        }
        match be32(&m.body) {
            SSL_REQUEST | GSSENC_REQUEST => {
                self.phase = Phase::AwaitEncAnswer;
                Next::Untyped
            }
            c if c >> 16 == 3 => {
                let (mut db, mut user) = (None, None);
                let mut p = 4;
                while let (Some(k), Some(v)) = (cstr(&m.body, &mut p), cstr(&m.body, &mut p)) {
                    if k.is_empty() {
                        break;
                    }
                    let ok = !v.is_empty() && v.len() <= 128 && printable(v);
                    match k {
                        b"database" if ok => db = Some(v),
                        b"user" if ok => user = Some(v),
                        _ => {}
                    }
                }
                self.namespace = db.or(user).map(|v| String::from_utf8_lossy(v).into_owned());
                self.phase = Phase::Running;
                Next::Typed
            }
            // CancelRequest, protocol 2, garbage: nothing to report on this connection.
            _ => {
                self.phase = Phase::Dead;
                Next::Same
            }
        }
    }

    fn lookup_stmt(&mut self, name: &[u8]) -> Option<Arc<StmtInfo>> {
        if name.is_empty() { self.unnamed_stmt.clone() } else { self.statements.get(name) }
    }

    fn lookup_portal(&mut self, name: &[u8]) -> Option<Arc<StmtInfo>> {
        if name.is_empty() { self.unnamed_portal.clone() } else { self.portals.get(name) }
    }

    fn on_frontend(&mut self, m: Msg, out: &mut Vec<DbCall>) -> Next {
        if m.ty == 0 {
            return match self.phase {
                Phase::Startup | Phase::AwaitEncAnswer | Phase::Initial => self.on_startup(m),
                _ => Next::Typed,
            };
        }
        if self.phase == Phase::Dead {
            return Next::Same;
        }
        self.phase = Phase::Running;
        if m.after_resync {
            self.uncertain = true;
        }
        let ty = m.ty;
        let requesty = matches!(ty, b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'F' | b'S');
        if requesty {
            if self.group_closed && self.be_lost && !self.queue.is_empty() {
                // The responses to what is outstanding were (partly) lost: clients wait for
                // ReadyForQuery before a new group unless pipelining, so close them now.
                let ts = self.last_be_ts;
                self.flush_all(ts, out);
                self.uncertain = true;
            }
            self.group_closed = matches!(ty, b'Q' | b'S' | b'F');
        }
        if self.discard_until_sync && ty != b'S' {
            return Next::Same;
        }
        let body = &m.body[..];
        match ty {
            b'Q' => {
                let info = stmt_info_reusing(&mut self.last_info, &sql_text(body));
                self.call_start = None;
                self.push(Expect::Simple(Acc::new(Some(info), m.start_ts)));
            }
            b'P' => {
                let start = *self.call_start.get_or_insert(m.start_ts);
                let mut p = 0;
                let info = name_of(body, &mut p).map(|name| {
                    let info = stmt_info_reusing(&mut self.last_info, &sql_text(&body[p..]));
                    if name.is_empty() {
                        self.unnamed_stmt = Some(info.clone());
                    } else {
                        self.statements.put(&name, info.clone());
                    }
                    info
                });
                self.push(Expect::Parse(info, start));
            }
            b'B' => {
                let start = *self.call_start.get_or_insert(m.start_ts);
                let mut p = 0;
                let portal = name_of(body, &mut p);
                let stmt = name_of(body, &mut p);
                let info = stmt.and_then(|s| self.lookup_stmt(&s));
                match portal {
                    Some(n) if n.is_empty() => self.unnamed_portal = info.clone(),
                    Some(n) => match &info {
                        Some(i) => self.portals.put(&n, i.clone()),
                        None => self.portals.remove(&n),
                    },
                    None => {}
                }
                self.push(Expect::Bind(info, start));
            }
            b'D' => {
                let start = *self.call_start.get_or_insert(m.start_ts);
                let mut p = 1;
                let info = match (body.first(), name_of(body, &mut p)) {
                    (Some(b'S'), Some(n)) => self.lookup_stmt(&n),
                    (Some(b'P'), Some(n)) => self.lookup_portal(&n),
                    _ => None,
                };
                self.push(Expect::Describe(info, start));
            }
            b'E' => {
                let start = self.call_start.take().unwrap_or(m.start_ts);
                let mut p = 0;
                let info = name_of(body, &mut p).and_then(|n| self.lookup_portal(&n));
                self.push(Expect::Execute(Acc::new(info, start)));
            }
            b'C' => {
                self.call_start.get_or_insert(m.start_ts);
                let mut p = 1;
                match (body.first(), name_of(body, &mut p)) {
                    (Some(b'S'), Some(n)) if n.is_empty() => self.unnamed_stmt = None,
                    (Some(b'S'), Some(n)) => self.statements.remove(&n),
                    (Some(b'P'), Some(n)) if n.is_empty() => self.unnamed_portal = None,
                    (Some(b'P'), Some(n)) => self.portals.remove(&n),
                    _ => {}
                }
                self.push(Expect::Close);
            }
            b'S' => {
                self.call_start = None;
                self.discard_until_sync = false;
                self.push(Expect::Sync);
            }
            b'F' => {
                self.call_start = None;
                self.push(Expect::Func);
            }
            // Flush, CopyData/CopyDone/CopyFail, Terminate, password/SASL/GSS (never read).
            _ => {}
        }
        Next::Same
    }

    fn pop_if(&mut self, f: impl Fn(&Expect) -> bool) {
        match self.queue.front() {
            Some(e) if f(e) => {
                self.queue.pop_front();
            }
            Some(Expect::Skip(_)) => {}
            None if self.uncertain => {}
            _ => {
                self.stats.unmatched += 1;
                self.uncertain = true;
            }
        }
    }

    fn on_backend(&mut self, m: Msg, out: &mut Vec<DbCall>) {
        if self.phase == Phase::Dead {
            return;
        }
        if m.after_resync {
            self.uncertain = true;
        }
        let end = m.end_ts;
        match m.ty {
            b'T' => {
                if let Some(Expect::Describe(..)) = self.queue.front() {
                    self.queue.pop_front();
                }
            }
            b'n' => self.pop_if(|e| matches!(e, Expect::Describe(..))),
            b'1' => self.pop_if(|e| matches!(e, Expect::Parse(..))),
            b'2' => self.pop_if(|e| matches!(e, Expect::Bind(..))),
            b'3' => self.pop_if(|e| matches!(e, Expect::Close)),
            b'D' => {
                if let Some(Expect::Simple(a) | Expect::Execute(a)) = self.queue.front_mut() {
                    a.data_rows += 1;
                }
            }
            b'C' | b'I' | b's' => {
                let rows = if m.ty == b'C' { tag_rows(&m.body) } else { None };
                match self.queue.front_mut() {
                    Some(Expect::Simple(a)) => {
                        if let Some(r) = rows {
                            a.rows = Some(a.rows.unwrap_or(0).saturating_add(r));
                        }
                    }
                    Some(Expect::Execute(_)) => {
                        let Some(Expect::Execute(mut a)) = self.queue.pop_front() else {
                            return;
                        };
                        a.rows = match m.ty {
                            b'C' => rows,
                            b's' => Some(a.data_rows),
                            _ => None,
                        };
                        self.emit(*a, end, false, out);
                    }
                    Some(Expect::Skip(_)) => {}
                    _ => self.stats.unmatched += 1,
                }
            }
            b'E' => self.on_error(&m.body, end, out),
            b'Z' => self.on_ready(end, out),
            // Async and informational messages, COPY traffic, auth, key data.
            _ => {}
        }
    }

    fn on_error(&mut self, body: &[u8], end: u64, out: &mut Vec<DbCall>) {
        let (status, error) = parse_error(body);
        match self.queue.front_mut() {
            Some(Expect::Simple(a)) if a.error.is_none() => {
                a.status = status;
                a.error = Some(error);
            }
            Some(Expect::Execute(_)) => {
                if let Some(Expect::Execute(mut a)) = self.queue.pop_front() {
                    a.status = status;
                    a.error = Some(error);
                    self.emit(*a, end, false, out);
                }
                self.discard_to_sync();
            }
            Some(Expect::Parse(info, start) | Expect::Bind(info, start) | Expect::Describe(info, start)) => {
                let fallback = Acc::new(info.clone(), *start);
                let group_end = self
                    .queue
                    .iter()
                    .position(|e| matches!(e, Expect::Sync | Expect::Skip(_)))
                    .unwrap_or(self.queue.len());
                let exec = self.queue.iter().take(group_end).position(|e| matches!(e, Expect::Execute(_)));
                let mut a = match exec.and_then(|k| self.queue.remove(k)) {
                    Some(Expect::Execute(a)) => a,
                    _ => fallback,
                };
                a.status = status;
                a.error = Some(error);
                self.emit(*a, end, false, out);
                self.discard_to_sync();
            }
            Some(Expect::Close) => self.discard_to_sync(),
            // Commit-time errors at Sync, function-call errors, untracked or unsolicited
            // (e.g. FATAL on shutdown, authentication failure).
            _ => {}
        }
    }

    /// After an extended-protocol error the server skips everything up to the next Sync.
    fn discard_to_sync(&mut self) {
        while let Some(e) = self.queue.front() {
            if matches!(e, Expect::Sync | Expect::Skip(_)) {
                return;
            }
            self.queue.pop_front();
        }
        self.discard_until_sync = true;
    }

    fn on_ready(&mut self, end: u64, out: &mut Vec<DbCall>) {
        match self.queue.front_mut() {
            None => {}
            Some(Expect::Simple(_)) => {
                if let Some(Expect::Simple(a)) = self.queue.pop_front() {
                    self.emit(*a, end, false, out);
                }
            }
            Some(Expect::Sync | Expect::Func) => {
                self.queue.pop_front();
            }
            Some(Expect::Skip(n)) => {
                *n -= 1;
                if *n == 0 {
                    self.queue.pop_front();
                }
            }
            Some(_) => {
                // Out of step (lost bytes): this Z ends the first group.
                self.stats.unmatched += 1;
                while let Some(e) = self.queue.pop_front() {
                    match e {
                        Expect::Sync | Expect::Func => break,
                        Expect::Simple(a) => {
                            self.emit(*a, end, true, out);
                            break;
                        }
                        Expect::Execute(a) => self.emit(*a, end, true, out),
                        _ => {}
                    }
                }
            }
        }
        if self.queue.is_empty() {
            self.uncertain = false;
            self.discard_until_sync = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reused facts are exactly the facts a fresh look would give: for statements that differ
    /// only in their literals the previous facts are handed back, for any other text they are
    /// computed anew.
    #[test]
    fn statement_facts_reused_only_for_the_same_redacted_text() {
        let shapes: &[&[&str]] = &[
            &[
                "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 98765",
            ],
            &["UPDATE t SET a = 'x' WHERE id = 2; SELECT 1", "UPDATE t SET a = 'it''s' WHERE id = 30; SELECT 7"],
            &["INSERT INTO \"Orders\" (a, b) VALUES ($$x;y$$, 1.5)", "INSERT INTO \"Orders\" (a, b) VALUES ('q', 2)"],
            &["CREATE TABLE IF NOT EXISTS t2 (id int)", "CREATE TABLE IF NOT EXISTS t2 (id int)"],
            &["select 1", "select 2"],
            &["", ""],
        ];
        let mut last = None;
        for shape in shapes {
            let first = stmt_info_reusing(&mut last, shape[0]);
            assert_eq!(*first, stmt_info(shape[0]), "{:?}", shape[0]);
            for sql in &shape[1..] {
                let again = stmt_info_reusing(&mut last, sql);
                assert!(Arc::ptr_eq(&first, &again), "{sql:?} reuses the facts of {:?}", shape[0]);
                assert_eq!(*again, stmt_info(sql), "{sql:?}");
            }
        }
        // A different shape right after is described afresh.
        let other = stmt_info_reusing(&mut last, "DELETE FROM t WHERE id = 3");
        assert_eq!(other.operation.as_deref(), Some("DELETE"));
        assert_eq!(*other, stmt_info("DELETE FROM t WHERE id = 3"));
    }
}
