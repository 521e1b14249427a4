//! Database calls: the record the PostgreSQL ([`crate::postgres`]) and Redis ([`crate::redis`])
//! parsers emit, one per client request paired with its response.
//!
//! Every text field of a [`DbCall`] is safe to export: query texts are redacted (SQL literals →
//! `?`, every Redis argument → `?`), error messages are redacted (quoted parts and numbers →
//! `?`), and authentication payloads (PostgreSQL password/SASL messages, Redis `AUTH`/`HELLO …
//! AUTH` arguments) are never kept by the parsers, not even transiently in a field that `Debug`
//! would show.
//!
//! Field conventions (OpenTelemetry database semantic conventions):
//! * `operation` → `db.operation.name`, `collection` → `db.collection.name`, `query_text` →
//!   `db.query.text`, `summary` → `db.query.summary`, `namespace` → `db.namespace`,
//!   `status_code` → `db.response.status_code`, `rows` → `db.response.returned_rows`,
//!   `batch_size` → `db.operation.batch.size`.
//! * `start_ns`: timestamp of the chunk carrying the request's first byte; `end_ns`: timestamp of
//!   the chunk carrying the last byte of its response.
//! * `approximate`: the pairing or timing may be off — bytes were lost (uncaptured data crossing
//!   a message boundary, garbage, resynchronisation) while the call was in flight, or the call
//!   was flushed without a response (connection closed, or a new request arrived while the
//!   response stream was out of sync). An approximate call flushed without any response has
//!   `end_ns` set to the last response bytes seen (or the close time) and no status.
use std::borrow::Cow;

use crate::Chunk;

pub use crate::postgres::{PgConn, looks_like_postgres_frontend, looks_like_postgres_startup};
pub use crate::redis::{RedisConn, looks_like_resp};

/// `db.system.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbSystem {
    Postgresql,
    Redis,
}

impl DbSystem {
    /// The OpenTelemetry `db.system.name` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DbSystem::Postgresql => "postgresql",
            DbSystem::Redis => "redis",
        }
    }
}

/// One database call: a request and its response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbCall {
    pub system: DbSystem,
    /// `db.operation.name`: `SELECT`, `CREATE TABLE`, `BATCH INSERT`, `GET`, `CONFIG SET`…
    /// (a Redis command borrows its constant name: no allocation per call).
    pub operation: Option<Cow<'static, str>>,
    /// `db.collection.name`: first table named by the statement (PostgreSQL only).
    pub collection: Option<String>,
    /// `db.query.text`, already redacted.
    pub query_text: Option<String>,
    /// `db.query.summary`: `SELECT users`, `GET`.
    pub summary: Option<Cow<'static, str>>,
    /// `db.namespace`: PostgreSQL database (from the StartupMessage, else the user name, which
    /// is PostgreSQL's default database); Redis database index once known (see
    /// [`crate::redis`]).
    pub namespace: Option<String>,
    /// `db.response.status_code`: SQLSTATE, or the Redis error prefix (`ERR`, `WRONGTYPE`).
    pub status_code: Option<String>,
    /// Short redacted error description for the span status; `Some` iff the call failed.
    pub error_message: Option<String>,
    /// Rows returned/affected, from PostgreSQL's CommandComplete tag.
    pub rows: Option<u64>,
    /// Statements in a multi-statement simple query / replies in a Redis `EXEC`.
    pub batch_size: Option<u32>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub approximate: bool,
}

impl DbCall {
    /// A call of `system` that started at `start_ns`, nothing else known yet.
    pub fn new(system: DbSystem, start_ns: u64) -> Self {
        DbCall {
            system,
            operation: None,
            collection: None,
            query_text: None,
            summary: None,
            namespace: None,
            status_code: None,
            error_message: None,
            rows: None,
            batch_size: None,
            start_ns,
            end_ns: start_ns,
            approximate: false,
        }
    }
}

/// Parser health counters (monotonic; export as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParserStats {
    /// Bytes that could not be a message where one was expected (the stream then resyncs).
    pub parse_errors: u64,
    /// Times a direction lost its place in the stream (uncaptured bytes crossing a message
    /// boundary, or garbage).
    pub desyncs: u64,
    /// Times the parser found its footing again after losing it (or on mid-stream adoption).
    pub resyncs: u64,
    /// Requests not tracked because the in-flight queue was full.
    pub dropped: u64,
    /// Responses that matched no outstanding request (e.g. answers to requests sent before
    /// the agent attached).
    pub unmatched: u64,
}

/// The interface shared by [`PgConn`] and [`RedisConn`].
pub trait DbConn {
    /// Feed one syscall's worth of bytes; completed calls are appended to `out`.
    fn feed(&mut self, c: Chunk<'_>, out: &mut Vec<DbCall>);
    /// The connection closed: flush outstanding requests as approximate calls ending at `ts_ns`.
    fn close(&mut self, ts_ns: u64, out: &mut Vec<DbCall>);
    fn stats(&self) -> ParserStats;
}

impl DbConn for PgConn {
    fn feed(&mut self, c: Chunk<'_>, out: &mut Vec<DbCall>) {
        PgConn::feed(self, c, out)
    }
    fn close(&mut self, ts_ns: u64, out: &mut Vec<DbCall>) {
        PgConn::close(self, ts_ns, out)
    }
    fn stats(&self) -> ParserStats {
        PgConn::stats(self)
    }
}

impl DbConn for RedisConn {
    fn feed(&mut self, c: Chunk<'_>, out: &mut Vec<DbCall>) {
        RedisConn::feed(self, c, out)
    }
    fn close(&mut self, ts_ns: u64, out: &mut Vec<DbCall>) {
        RedisConn::close(self, ts_ns, out)
    }
    fn stats(&self) -> ParserStats {
        RedisConn::stats(self)
    }
}

/// Redact a server error message: quoted segments (`"…"`, `'…'`) and digit runs become `?`,
/// control characters are dropped, whitespace is collapsed and the result is capped at
/// `max` bytes (on a char boundary).
pub(crate) fn redact_message(msg: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(msg);
    let mut out = String::with_capacity(s.len().min(max + 4));
    let mut chars = s.chars().peekable();
    let mut last_space = true;
    while let Some(c) = chars.next() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        match c {
            '"' | '\'' => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                out.push('?');
                last_space = false;
            }
            '0'..='9' => {
                while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    chars.next();
                }
                out.push('?');
                last_space = false;
            }
            c if c.is_whitespace() => {
                if !last_space {
                    out.push(' ');
                    last_space = true;
                }
            }
            c if c.is_control() => {}
            c => {
                out.push(c);
                last_space = false;
            }
        }
    }
    let t = out.trim_end();
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_message_rules() {
        assert_eq!(redact_message(b"relation \"users\" does not exist", 100), "relation ? does not exist");
        assert_eq!(
            redact_message(b"invalid input syntax for type integer: \"abc\"", 100),
            "invalid input syntax for type integer: ?"
        );
        assert_eq!(
            redact_message(b"value too long for type character varying(10)\n", 100),
            "value too long for type character varying(?)"
        );
        assert_eq!(redact_message(b"'unterminated secret", 100), "?");
        assert_eq!(redact_message("x".repeat(300).as_bytes(), 10).chars().count(), 11);
    }
}
