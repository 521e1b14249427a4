//! The connection table: one entry per (pid, fd) socket of a traced process, with its 4-tuple,
//! its role (server or client side), and the protocol parser fed with its byte stream.
//!
//! Protocol detection (user space decides; the kernel only ships bytes), in this order:
//! 1. HTTP/1.x request line (`GET /x HTTP/1.1`): cheapest and most common; a request read by the
//!    process makes it the server side, a request written makes it the client side.
//! 2. HTTP/1.x status line (`HTTP/1.1 200`): a connection adopted mid-stream (opened before
//!    Waybill attached); the role follows from the direction, and the parser resynchronises on the
//!    next request.
//! 3. PostgreSQL StartupMessage / SSLRequest / CancelRequest: a fixed length + protocol code,
//!    unambiguous.
//! 4. Redis RESP command (`*<n>\r\n$<len>\r\n…` or a known inline command).
//! 5. PostgreSQL typed frontend messages (`Q`, `P`, `B`…) whose chain validates: a pooled
//!    connection adopted mid-stream. Last, because a tag byte + length is the weakest signal.
//!
//! In every case the side that sent the request bytes is the client: if the traced process read
//! them, it is the server.
//!
//! A connection that shows none of these in its first `DETECT_CHUNKS` chunks with payload is
//! marked unknown and counted (`waybill_connections_unknown_protocol_total`), never guessed.
//!
//! Bounds: at most `max_conns` entries (the least recently active is evicted and counted),
//! idle entries expire after `idle_ns`.

use std::sync::Arc;

// FxHash: the table is keyed by (pid, fd), looked up for every data record.
use rustc_hash::FxHashMap;

use waybill_common::{CloseEvent, ConnEvent, DIR_READ, DataHeader, ROLE_CLIENT, ROLE_SERVER, Tuple};
use waybill_protocols::{
    Chunk, FlowDir,
    db::{self, DbCall, DbSystem, PgConn, RedisConn},
    http1::{self, Http1Conn, HttpExchange, HttpRequest},
};

use crate::metrics::Metrics;

mod tls;

/// Which end of the connection the traced process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Unknown,
    Server,
    Client,
}

impl Role {
    fn from_kernel(r: u32) -> Self {
        match r {
            ROLE_SERVER => Role::Server,
            ROLE_CLIENT => Role::Client,
            _ => Role::Unknown,
        }
    }
}

/// Facts about a connection that travel with each finished exchange.
#[derive(Clone, Copy, Debug)]
pub struct ConnMeta {
    /// Unique per connection for the agent's lifetime (fds are reused, this is not).
    pub conn_id: u64,
    pub pid: u32,
    pub fd: u32,
    pub tuple: Tuple,
    pub role: Role,
    /// Thread that read the first byte of the current request (server side) or wrote it (client).
    pub tid: u32,
    /// The bytes are TLS plaintext from the TLS uprobes (conn/tls.rs).
    pub tls: bool,
}

/// What the connection table tells the stitcher, in event order.
#[derive(Debug)]
pub enum Finished {
    /// A request head was seen (`meta.tid` is the thread that read or wrote it).
    HttpStart { meta: ConnMeta, seq: u64, traceparent: Option<Arc<str>>, tracestate: Option<Arc<str>>, start_ns: u64 },
    /// The exchange of request `seq` on this connection finished.
    Http(ConnMeta, u64, HttpExchange),
    /// A PostgreSQL or Redis call finished (`meta.tid`: the thread that sent it).
    Db(ConnMeta, DbCall),
    /// The traced process (client role) wrote request bytes on a PostgreSQL or Redis connection
    /// (`meta.tid`: the writing thread): the thread rule is decided now, not when the reply comes.
    DbSend { meta: ConnMeta, system: DbSystem, ts_ns: u64 },
}

/// Protocol detection (order and reasons in the module docs). `read`: the traced process read
/// these bytes. Returns the process's role and a parser.
fn detect(payload: &[u8], read: bool) -> Option<(Role, L7)> {
    let sent_by_client = |client_sent: bool| if client_sent != read { Role::Client } else { Role::Server };
    if http1::looks_like_request(payload) {
        return Some((sent_by_client(true), L7::Http(Box::new(Http1Conn::new()))));
    }
    if http1::looks_like_response(payload) {
        return Some((sent_by_client(false), L7::Http(Box::new(Http1Conn::new()))));
    }
    if db::looks_like_postgres_startup(payload) {
        return Some((sent_by_client(true), L7::Pg(Box::new(PgConn::new()))));
    }
    if db::looks_like_resp(payload) {
        return Some((sent_by_client(true), L7::Redis(Box::new(RedisConn::new()))));
    }
    // A pooled PostgreSQL connection adopted mid-stream: a chain of typed frontend messages whose
    // lengths and contents validate (a lone tag + length is not enough).
    if db::looks_like_postgres_frontend(payload) {
        return Some((sent_by_client(true), L7::Pg(Box::new(PgConn::new()))));
    }
    None
}

enum L7 {
    Pg(Box<PgConn>),
    Redis(Box<RedisConn>),
    Undecided { chunks: u8 },
    Http(Box<Http1Conn>),
    Unknown,
}

struct Conn {
    meta: ConnMeta,
    /// Sequence number of the next request head not yet announced with `HttpStart`.
    next_seq: u64,
    sk: u64,
    l7: L7,
    last_ns: u64,
    /// Parser error counts already reported to the metrics.
    reported_errors: u64,
}

const DETECT_CHUNKS: u8 = 3;

impl Conn {
    /// A connection first seen through its data (no accept/connect record yet): tuple and role
    /// unknown until the kernel's connection record or the first bytes tell.
    fn first_data(conn_id: u64, head: &DataHeader) -> Self {
        Conn::new(
            conn_id,
            head.hdr.tgid,
            head.fd,
            Tuple::default(),
            Role::Unknown,
            head.hdr.tid,
            head.sk,
            head.hdr.ts_ns,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(conn_id: u64, pid: u32, fd: u32, tuple: Tuple, role: Role, tid: u32, sk: u64, ts_ns: u64) -> Self {
        Conn {
            meta: ConnMeta { conn_id, pid, fd, tuple, role, tid, tls: false },
            next_seq: 0,
            sk,
            l7: L7::Undecided { chunks: 0 },
            last_ns: ts_ns,
            reported_errors: 0,
        }
    }
}

pub struct ConnTable {
    conns: FxHashMap<(u32, u32), Conn>,
    max_conns: usize,
    idle_ns: u64,
    next_conn_id: u64,
    scratch: Vec<(u64, HttpExchange)>,
    db_scratch: Vec<DbCall>,
}

impl ConnTable {
    pub fn new(max_conns: usize, idle_ns: u64) -> Self {
        Self {
            conns: FxHashMap::default(),
            max_conns,
            idle_ns,
            next_conn_id: 1,
            scratch: Vec::new(),
            db_scratch: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    fn finish(
        conn: &mut Conn,
        ts_ns: u64,
        m: &Metrics,
        scratch: &mut Vec<(u64, HttpExchange)>,
        out: &mut Vec<Finished>,
    ) {
        let mut calls = Vec::new();
        match &mut conn.l7 {
            L7::Http(p) => {
                p.close_seq(ts_ns, &mut |seq, ex| scratch.push((seq, ex)));
                Self::drain(conn, m, scratch, out);
            }
            L7::Pg(p) => p.close(ts_ns, &mut calls),
            L7::Redis(p) => p.close(ts_ns, &mut calls),
            _ => {}
        }
        Self::drain_db(conn, m, &mut calls, out);
    }

    /// Announces request heads seen since the last call, then hands out finished exchanges.
    fn drain(conn: &mut Conn, m: &Metrics, scratch: &mut Vec<(u64, HttpExchange)>, out: &mut Vec<Finished>) {
        if let L7::Http(p) = &conn.l7 {
            let s = p.stats();
            // Resynchronisations are normal (adoption mid-stream) and not counted as errors.
            let errs = s.parse_errors + s.dropped_requests;
            if errs > conn.reported_errors {
                m.parse_errors.add(errs - conn.reported_errors);
                conn.reported_errors = errs;
            }
            let meta = conn.meta;
            let start = |seq: u64, req: &HttpRequest, ts: u64| Finished::HttpStart {
                meta,
                seq,
                traceparent: req.traceparent.clone(),
                tracestate: req.tracestate.clone(),
                start_ns: ts,
            };
            // Requests that began and finished within this batch, then those still open.
            for (seq, ex) in scratch.iter().filter(|(seq, _)| *seq >= conn.next_seq) {
                out.push(start(*seq, &ex.request, ex.request_start_ns));
            }
            for (seq, req, ts) in p.requests_from(conn.next_seq) {
                out.push(start(seq, req, ts));
            }
            conn.next_seq = p.next_request_seq().max(conn.next_seq);
        }
        for (seq, ex) in scratch.drain(..) {
            if ex.response.is_none() {
                m.requests_unpaired.inc();
            }
            out.push(Finished::Http(conn.meta, seq, ex));
        }
    }

    fn drain_db(conn: &mut Conn, m: &Metrics, scratch: &mut Vec<DbCall>, out: &mut Vec<Finished>) {
        let s = match &conn.l7 {
            L7::Pg(p) => p.stats(),
            L7::Redis(p) => p.stats(),
            _ => return,
        };
        let errs = s.parse_errors + s.dropped;
        if errs > conn.reported_errors {
            m.parse_errors.add(errs - conn.reported_errors);
            conn.reported_errors = errs;
        }
        for call in scratch.drain(..) {
            out.push(Finished::Db(conn.meta, call));
        }
    }

    fn make_room(&mut self, ts_ns: u64, m: &Metrics, out: &mut Vec<Finished>) {
        if self.conns.len() < self.max_conns {
            return;
        }
        if let Some(key) = self.conns.iter().min_by_key(|(_, c)| c.last_ns).map(|(k, _)| *k) {
            if let Some(mut c) = self.conns.remove(&key) {
                Self::finish(&mut c, ts_ns, m, &mut self.scratch, out);
                m.connections_evicted.inc();
            }
        }
    }

    /// A socket fd of a traced process was seen for the first time (or re-used).
    pub fn on_conn(&mut self, ev: &ConnEvent, m: &Metrics, out: &mut Vec<Finished>) {
        let key = (ev.hdr.tgid, ev.fd);
        if let Some(mut old) = self.conns.remove(&key) {
            if old.sk == ev.sk {
                // Same socket, now with a known role (accept/connect after a data walk).
                if old.meta.role == Role::Unknown {
                    old.meta.role = Role::from_kernel(ev.role);
                }
                self.conns.insert(key, old);
                return;
            }
            Self::finish(&mut old, ev.hdr.ts_ns, m, &mut self.scratch, out);
        }
        self.make_room(ev.hdr.ts_ns, m, out);
        m.connections_opened.inc();
        self.next_conn_id += 1;
        self.conns.insert(
            key,
            Conn::new(
                self.next_conn_id,
                ev.hdr.tgid,
                ev.fd,
                ev.tuple,
                Role::from_kernel(ev.role),
                ev.hdr.tid,
                ev.sk,
                ev.hdr.ts_ns,
            ),
        );
        m.connections_tracked.set(self.conns.len() as u64);
    }

    /// Bytes moved on a socket.
    pub fn on_data(&mut self, head: &DataHeader, payload: &[u8], m: &Metrics, out: &mut Vec<Finished>) {
        if self.tls_gate(head, m, out) {
            return;
        }
        let key = (head.hdr.tgid, head.fd);
        if !self.conns.contains_key(&key) {
            // Its KIND_CONN record was lost (ring buffer full): track it without a tuple.
            self.make_room(head.hdr.ts_ns, m, out);
            m.connections_opened.inc();
            self.next_conn_id += 1;
            self.conns.insert(key, Conn::first_data(self.next_conn_id, head));
        }
        let conn = self.conns.get_mut(&key).expect("inserted above");
        conn.last_ns = head.hdr.ts_ns;
        let read = head.dir == DIR_READ;
        if let L7::Undecided { chunks } = &mut conn.l7 {
            if payload.is_empty() {
                return;
            }
            match detect(payload, read) {
                Some((r, l7)) => {
                    conn.meta.role = r;
                    conn.l7 = l7;
                }
                None => {
                    *chunks += 1;
                    if *chunks >= DETECT_CHUNKS {
                        conn.l7 = L7::Unknown;
                        m.connections_unknown_protocol.inc();
                    }
                    return;
                }
            }
        }
        let to_server = read == (conn.meta.role == Role::Server);
        let dir = if to_server { FlowDir::ToServer } else { FlowDir::ToClient };
        if to_server && matches!(conn.l7, L7::Pg(_) | L7::Redis(_)) {
            // The thread that sends a database command is the one waiting for its reply.
            conn.meta.tid = head.hdr.tid;
            if conn.meta.role == Role::Client {
                let system = if matches!(conn.l7, L7::Pg(_)) { DbSystem::Postgresql } else { DbSystem::Redis };
                out.push(Finished::DbSend { meta: conn.meta, system, ts_ns: head.hdr.ts_ns });
            }
        }
        let chunk = Chunk { dir, data: payload, total: head.total as usize, ts_ns: head.hdr.ts_ns };
        match &mut conn.l7 {
            L7::Pg(p) => {
                p.feed(chunk, &mut self.db_scratch);
                Self::drain_db(conn, m, &mut self.db_scratch, out);
                return;
            }
            L7::Redis(p) => {
                p.feed(chunk, &mut self.db_scratch);
                Self::drain_db(conn, m, &mut self.db_scratch, out);
                return;
            }
            _ => {}
        }
        if let L7::Http(p) = &mut conn.l7 {
            if to_server && p.in_flight() == 0 {
                conn.meta.tid = head.hdr.tid;
            }
            let scratch = &mut self.scratch;
            p.feed_seq(chunk, &mut |seq, ex| scratch.push((seq, ex)));
            Self::drain(conn, m, &mut self.scratch, out);
        }
    }

    pub fn on_close(&mut self, ev: &CloseEvent, m: &Metrics, out: &mut Vec<Finished>) {
        if let Some(mut c) = self.conns.remove(&(ev.hdr.tgid, ev.fd)) {
            Self::finish(&mut c, ev.hdr.ts_ns, m, &mut self.scratch, out);
        }
        m.connections_tracked.set(self.conns.len() as u64);
    }

    /// A process exited: finish all its connections.
    pub fn on_exit(&mut self, pid: u32, ts_ns: u64, m: &Metrics, out: &mut Vec<Finished>) {
        let keys: Vec<_> = self.conns.keys().filter(|(p, _)| *p == pid).copied().collect();
        for k in keys {
            if let Some(mut c) = self.conns.remove(&k) {
                Self::finish(&mut c, ts_ns, m, &mut self.scratch, out);
            }
        }
        m.connections_tracked.set(self.conns.len() as u64);
    }

    /// Expires connections idle for longer than the idle timeout.
    pub fn sweep(&mut self, now_ns: u64, m: &Metrics, out: &mut Vec<Finished>) {
        let idle = self.idle_ns;
        let keys: Vec<_> =
            self.conns.iter().filter(|(_, c)| now_ns.saturating_sub(c.last_ns) > idle).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(mut c) = self.conns.remove(&k) {
                Self::finish(&mut c, now_ns, m, &mut self.scratch, out);
                m.connections_evicted.inc();
            }
        }
        m.connections_tracked.set(self.conns.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use waybill_common::{DIR_WRITE, EventHeader, KIND_CONN, KIND_DATA};

    use super::*;

    fn conn_ev(pid: u32, fd: u32, role: u32, ts: u64) -> ConnEvent {
        ConnEvent {
            hdr: EventHeader { kind: KIND_CONN, tgid: pid, tid: pid, _pad: 0, ts_ns: ts },
            fd,
            role,
            sk: 0xabc,
            tuple: Tuple {
                family: 2,
                lport: 8080,
                rport: 50000,
                _pad: 0,
                laddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                raddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            },
        }
    }

    fn data(pid: u32, fd: u32, dir: u32, ts: u64, bytes: &[u8]) -> DataHeader {
        DataHeader {
            hdr: EventHeader { kind: KIND_DATA, tgid: pid, tid: pid + 1, _pad: 0, ts_ns: ts },
            fd,
            dir,
            total: bytes.len() as u64,
            captured: bytes.len() as u32,
            syscall: 0,
            sk: 0xabc,
        }
    }

    #[test]
    fn server_exchange_flows_out_with_its_connection() {
        let m = Metrics::default();
        let mut t = ConnTable::new(16, u64::MAX);
        let mut out = Vec::new();
        t.on_conn(&conn_ev(10, 5, ROLE_UNKNOWN_FOR_TEST, 1), &m, &mut out);
        let req = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
        t.on_data(&data(10, 5, DIR_READ, 100, req), req, &m, &mut out);
        // The head is announced as soon as it is read, with the reading thread.
        assert!(matches!(&out[..], [Finished::HttpStart { seq: 0, start_ns: 100, meta, .. }] if meta.tid == 11));
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        t.on_data(&data(10, 5, DIR_WRITE, 250, resp), resp, &m, &mut out);
        assert_eq!(out.len(), 2);
        let Finished::Http(meta, _, ex) = out.last().unwrap() else { panic!("{out:?}") };
        assert_eq!(meta.role, Role::Server);
        assert_eq!(meta.tuple.lport, 8080);
        assert_eq!(ex.request.method, "GET");
        assert_eq!(ex.response.as_ref().unwrap().status, 200);
        assert_eq!((ex.request_start_ns, ex.response_end_ns), (100, 250));
    }

    const ROLE_UNKNOWN_FOR_TEST: u32 = waybill_common::ROLE_UNKNOWN;

    #[test]
    fn unknown_protocol_is_counted_not_parsed() {
        let m = Metrics::default();
        let mut t = ConnTable::new(16, u64::MAX);
        let mut out = Vec::new();
        t.on_conn(&conn_ev(1, 3, ROLE_SERVER, 1), &m, &mut out);
        for i in 0..5 {
            let b = b"\x16\x03\x01garbage";
            t.on_data(&data(1, 3, DIR_READ, i, b), b, &m, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(m.connections_unknown_protocol.get(), 1);
    }

    #[test]
    fn table_is_bounded_and_idle_entries_expire() {
        let m = Metrics::default();
        let mut t = ConnTable::new(2, 1000);
        let mut out = Vec::new();
        for fd in 0..3 {
            t.on_conn(&conn_ev(1, fd, ROLE_SERVER, fd as u64), &m, &mut out);
        }
        assert_eq!(t.len(), 2);
        assert_eq!(m.connections_evicted.get(), 1);
        t.sweep(10_000, &m, &mut out);
        assert!(t.is_empty());
        assert_eq!(m.connections_evicted.get(), 3);
    }

    #[test]
    fn close_flushes_unanswered_request() {
        let m = Metrics::default();
        let mut t = ConnTable::new(16, u64::MAX);
        let mut out = Vec::new();
        t.on_conn(&conn_ev(1, 3, ROLE_SERVER, 1), &m, &mut out);
        let req = b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        t.on_data(&data(1, 3, DIR_READ, 5, req), req, &m, &mut out);
        t.on_close(
            &CloseEvent {
                hdr: EventHeader { kind: 202, tgid: 1, tid: 1, _pad: 0, ts_ns: 9 },
                fd: 3,
                _pad: 0,
                sk: 0xabc,
            },
            &m,
            &mut out,
        );
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[1], Finished::Http(_, 0, ex) if ex.response.is_none()));
        assert_eq!(m.requests_unpaired.get(), 1);
    }
}
