//! Redis (RESP2/RESP3) → [`DbCall`]s.
//!
//! # What it handles
//! * Commands: RESP arrays of bulk strings, and inline commands (`PING\r\n`, quoting as the
//!   server does). One call per command; replies are paired FIFO, so pipelines of N commands
//!   give N calls.
//! * Replies: every RESP2/RESP3 type — simple `+`, error `-`, integer `:`, bulk `$` (incl.
//!   `$-1`), array `*` (incl. `*-1`), null `_`, double `,`, boolean `#`, big number `(`, blob
//!   error `!`, verbatim `=`, map `%`, set `~`, push `>`, attribute `|` (precedes a value and is
//!   not itself one, at top level or nested), and streamed strings/aggregates (`$?`, `*?`…).
//! * Push frames (`>`) are never replies (client-tracking invalidations, pub/sub messages) —
//!   except subscription confirmations, which answer (P|S)(UN)SUBSCRIBE in RESP3. In RESP2,
//!   `message`/`pmessage`/`smessage` arrays are skipped while subscribed, and a (P|S)SUBSCRIBE
//!   with N channels completes after N confirmations (UNSUBSCRIBE without arguments: when the
//!   confirmation's count reaches 0).
//! * `MULTI`/`EXEC`/`DISCARD`: queued commands complete at their `+QUEUED`; `EXEC` gets
//!   `batch_size` = length of its reply array. `MONITOR`: after its `+OK` the connection is
//!   ignored. `RESET` resets the namespace to `0`.
//!
//! # Namespace (`db.namespace`)
//! Unknown (`None`) until a `SELECT n` succeeds (immediately, or at `EXEC` when queued), since a
//! connection adopted mid-stream may have selected any database. Exception: when the first
//! command seen on the connection starts at its first captured byte and is a handshake command
//! (`HELLO`, `AUTH`, `CLIENT …`, `SELECT`) the connection is taken as observed from its start and
//! the namespace is `0` until a `SELECT`. A call reports the namespace in force when it was
//! answered (for `SELECT` itself: the previous one).
//!
//! # Redaction
//! `query_text` is the command name (plus, for container commands such as `CONFIG`, `CLIENT`,
//! `ACL`, `XGROUP`, the subcommand when it is a known keyword) followed by one `?` per argument
//! (at most 32, then `…`): `SET ? ?`, `CONFIG SET ? ?`, `AUTH ?`. Argument bytes are never
//! stored, apart from the database index of `SELECT` (digits only). Errors: status = the
//! error's first word (`ERR`, `WRONGTYPE`, `MOVED`), message = redacted text (quoted parts and
//! numbers → `?`). When the server answers `unknown command`, the command's name is not
//! reported either.
//!
//! # Lost bytes and resynchronisation
//! Uncaptured bytes inside a bulk string are skipped using the syscall's `total`. When they cross
//! a value boundary, or bytes are not valid RESP, that direction is lost and resyncs at a later
//! line start (offset 0 of a chunk or after `\n`) from which a trial parse succeeds: for
//! replies, at offset 0 any valid value, elsewhere at least one complete value; for commands,
//! a `*N\r\n$M\r\n` command, or at offset 0 an inline line starting with a known command name.
//! Calls answered while anything was lost are `approximate`; new commands sent while the reply
//! direction is lost flush the outstanding calls as approximate.
//!
//! # Limits
//! At most 1024 commands in flight (more are counted as dropped and their replies skipped).
//! Not modelled: `CLIENT REPLY OFF|SKIP` (replies then pair with later commands until the
//! queue drains), RESP2 `PING` inside a subscription is treated as a normal reply (it is one).
use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;

use crate::db::{DbCall, DbSystem, ParserStats, redact_message};
use crate::{Chunk, FlowDir};

const MAX_INFLIGHT: usize = 1024;
const MAX_BULK: usize = 512 * 1024 * 1024;
const MAX_AGG: i64 = 1 << 32;
const MAX_ARGS: i64 = 1 << 20;
/// Longest inline command accepted (the server's limit is 64 KiB).
const MAX_INLINE: usize = 64 * 1024;
/// Bytes of a header line kept (simple strings/errors beyond this are cut).
const LINE_KEEP: usize = 256;
/// Longest header line for non-text types before it is judged garbage.
const MAX_NUM_LINE: usize = 64;
const MAX_QMARKS: u64 = 32;

/// Commands whose second word is a subcommand (kept when it is a known keyword).
const CONTAINERS: &[&str] = &[
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY", "MODULE", "OBJECT",
    "PUBSUB", "SCRIPT", "SLOWLOG", "XGROUP", "XINFO",
];

const SUBCOMMANDS: &[&str] = &[
    "ADDSLOTS",
    "ADDSLOTSRANGE",
    "CACHING",
    "CAT",
    "CHANNELS",
    "COUNT",
    "COUNTKEYSINSLOT",
    "CONSUMERS",
    "CREATE",
    "CREATECONSUMER",
    "DELCONSUMER",
    "DELETE",
    "DELSLOTS",
    "DELUSER",
    "DESTROY",
    "DOCS",
    "DOCTOR",
    "DRYRUN",
    "DUMP",
    "ENCODING",
    "EXISTS",
    "FAILOVER",
    "FLUSH",
    "FORGET",
    "FREQ",
    "GENPASS",
    "GET",
    "GETKEYS",
    "GETKEYSANDFLAGS",
    "GETKEYSINSLOT",
    "GETNAME",
    "GETREDIR",
    "GETUSER",
    "GRAPH",
    "GROUPS",
    "HELP",
    "HISTOGRAM",
    "HISTORY",
    "ID",
    "IDLETIME",
    "INFO",
    "JMAP",
    "KEYSLOT",
    "KILL",
    "LATEST",
    "LEN",
    "LINKS",
    "LIST",
    "LOAD",
    "LOADEX",
    "LOG",
    "MALLOC-STATS",
    "MEET",
    "MYID",
    "MYSHARDID",
    "NODES",
    "NO-EVICT",
    "NO-TOUCH",
    "NUMPAT",
    "NUMSUB",
    "OBJECT",
    "PAUSE",
    "PROTOCOL",
    "PURGE",
    "REFCOUNT",
    "RELOAD",
    "REPLICAS",
    "REPLICATE",
    "REPLY",
    "RESET",
    "RESETSTAT",
    "RESTORE",
    "REWRITE",
    "SAVE",
    "SET",
    "SETID",
    "SETINFO",
    "SETNAME",
    "SETSLOT",
    "SETUSER",
    "SHARDCHANNELS",
    "SHARDNUMSUB",
    "SHARDS",
    "SLEEP",
    "SLOTS",
    "STATS",
    "STREAM",
    "TRACKING",
    "TRACKINGINFO",
    "UNBLOCK",
    "UNLOAD",
    "UNPAUSE",
    "USAGE",
    "USERS",
    "WHOAMI",
];

/// Known command names (Redis 7/8, sorted for binary search). Any other name is not
/// reported: the first word a client sends could be anything, a secret included.
const KNOWN: &[&str] = &[
    "ACL",
    "APPEND",
    "ASKING",
    "AUTH",
    "BGREWRITEAOF",
    "BGSAVE",
    "BITCOUNT",
    "BITFIELD",
    "BITFIELD_RO",
    "BITOP",
    "BITPOS",
    "BLMOVE",
    "BLMPOP",
    "BLPOP",
    "BRPOP",
    "BRPOPLPUSH",
    "BZMPOP",
    "BZPOPMAX",
    "BZPOPMIN",
    "CLIENT",
    "CLUSTER",
    "COMMAND",
    "CONFIG",
    "COPY",
    "DBSIZE",
    "DEBUG",
    "DECR",
    "DECRBY",
    "DEL",
    "DISCARD",
    "DUMP",
    "ECHO",
    "EVAL",
    "EVALSHA",
    "EVALSHA_RO",
    "EVAL_RO",
    "EXEC",
    "EXISTS",
    "EXPIRE",
    "EXPIREAT",
    "EXPIRETIME",
    "FAILOVER",
    "FCALL",
    "FCALL_RO",
    "FLUSHALL",
    "FLUSHDB",
    "FUNCTION",
    "GEOADD",
    "GEODIST",
    "GEOHASH",
    "GEOPOS",
    "GEORADIUS",
    "GEORADIUSBYMEMBER",
    "GEORADIUSBYMEMBER_RO",
    "GEORADIUS_RO",
    "GEOSEARCH",
    "GEOSEARCHSTORE",
    "GET",
    "GETBIT",
    "GETDEL",
    "GETEX",
    "GETRANGE",
    "GETSET",
    "HDEL",
    "HELLO",
    "HEXISTS",
    "HEXPIRE",
    "HEXPIREAT",
    "HEXPIRETIME",
    "HGET",
    "HGETALL",
    "HGETDEL",
    "HGETEX",
    "HINCRBY",
    "HINCRBYFLOAT",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HMSET",
    "HPERSIST",
    "HPEXPIRE",
    "HPEXPIREAT",
    "HPEXPIRETIME",
    "HPTTL",
    "HRANDFIELD",
    "HSCAN",
    "HSET",
    "HSETEX",
    "HSETNX",
    "HSTRLEN",
    "HTTL",
    "HVALS",
    "INCR",
    "INCRBY",
    "INCRBYFLOAT",
    "INFO",
    "KEYS",
    "LASTSAVE",
    "LATENCY",
    "LCS",
    "LINDEX",
    "LINSERT",
    "LLEN",
    "LMOVE",
    "LMPOP",
    "LOLWUT",
    "LPOP",
    "LPOS",
    "LPUSH",
    "LPUSHX",
    "LRANGE",
    "LREM",
    "LSET",
    "LTRIM",
    "MEMORY",
    "MGET",
    "MIGRATE",
    "MODULE",
    "MONITOR",
    "MOVE",
    "MSET",
    "MSETNX",
    "MULTI",
    "OBJECT",
    "PERSIST",
    "PEXPIRE",
    "PEXPIREAT",
    "PEXPIRETIME",
    "PFADD",
    "PFCOUNT",
    "PFDEBUG",
    "PFMERGE",
    "PFSELFTEST",
    "PING",
    "PSETEX",
    "PSUBSCRIBE",
    "PSYNC",
    "PTTL",
    "PUBLISH",
    "PUBSUB",
    "PUNSUBSCRIBE",
    "QUIT",
    "RANDOMKEY",
    "READONLY",
    "READWRITE",
    "RENAME",
    "RENAMENX",
    "REPLCONF",
    "REPLICAOF",
    "RESET",
    "RESTORE",
    "RESTORE-ASKING",
    "ROLE",
    "RPOP",
    "RPOPLPUSH",
    "RPUSH",
    "RPUSHX",
    "SADD",
    "SAVE",
    "SCAN",
    "SCARD",
    "SCRIPT",
    "SDIFF",
    "SDIFFSTORE",
    "SELECT",
    "SET",
    "SETBIT",
    "SETEX",
    "SETNX",
    "SETRANGE",
    "SHUTDOWN",
    "SINTER",
    "SINTERCARD",
    "SINTERSTORE",
    "SISMEMBER",
    "SLAVEOF",
    "SLOWLOG",
    "SMEMBERS",
    "SMISMEMBER",
    "SMOVE",
    "SORT",
    "SORT_RO",
    "SPOP",
    "SPUBLISH",
    "SRANDMEMBER",
    "SREM",
    "SSCAN",
    "SSUBSCRIBE",
    "STRLEN",
    "SUBSCRIBE",
    "SUBSTR",
    "SUNION",
    "SUNIONSTORE",
    "SUNSUBSCRIBE",
    "SWAPDB",
    "SYNC",
    "TIME",
    "TOUCH",
    "TTL",
    "TYPE",
    "UNLINK",
    "UNSUBSCRIBE",
    "UNWATCH",
    "WAIT",
    "WAITAOF",
    "WATCH",
    "XACK",
    "XADD",
    "XAUTOCLAIM",
    "XCLAIM",
    "XDEL",
    "XGROUP",
    "XINFO",
    "XLEN",
    "XPENDING",
    "XRANGE",
    "XREAD",
    "XREADGROUP",
    "XREVRANGE",
    "XSETID",
    "XTRIM",
    "ZADD",
    "ZCARD",
    "ZCOUNT",
    "ZDIFF",
    "ZDIFFSTORE",
    "ZINCRBY",
    "ZINTER",
    "ZINTERCARD",
    "ZINTERSTORE",
    "ZLEXCOUNT",
    "ZMPOP",
    "ZMSCORE",
    "ZPOPMAX",
    "ZPOPMIN",
    "ZRANDMEMBER",
    "ZRANGE",
    "ZRANGEBYLEX",
    "ZRANGEBYSCORE",
    "ZRANGESTORE",
    "ZRANK",
    "ZREM",
    "ZREMRANGEBYLEX",
    "ZREMRANGEBYRANK",
    "ZREMRANGEBYSCORE",
    "ZREVRANGE",
    "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE",
    "ZREVRANK",
    "ZSCAN",
    "ZSCORE",
    "ZUNION",
    "ZUNIONSTORE",
];

/// Module command prefixes (`JSON.SET`, `FT.SEARCH`…): accepted with an alphabetic suffix.
const MODULE_PREFIXES: &[&str] =
    &["AI", "BF", "CF", "CMS", "FT", "GRAPH", "JSON", "RG", "SEARCH", "TDIGEST", "TOPK", "TS"];

/// `b` upper-cased into `buf` (at most 32 bytes).
fn upper<'a>(b: &[u8], buf: &'a mut [u8; 32]) -> Option<&'a [u8]> {
    if b.is_empty() || b.len() > buf.len() {
        return None;
    }
    let up = &mut buf[..b.len()];
    up.copy_from_slice(b);
    up.make_ascii_uppercase();
    Some(up)
}

/// Upper-cased command name if it is a known command: the table's own text (no allocation per
/// command), or an owned one for a module command (`JSON.SET`).
fn known_command(b: &[u8]) -> Option<Cow<'static, str>> {
    let mut buf = [0u8; 32];
    let up = upper(b, &mut buf)?;
    if let Ok(i) = KNOWN.binary_search_by(|k| k.as_bytes().cmp(up)) {
        return Some(Cow::Borrowed(KNOWN[i]));
    }
    let up = std::str::from_utf8(up).ok()?;
    let (prefix, rest) = up.split_once('.')?;
    let ok = MODULE_PREFIXES.contains(&prefix)
        && !rest.is_empty()
        && rest.bytes().all(|c| c.is_ascii_alphabetic() || c == b'_');
    ok.then(|| Cow::Owned(up.to_string()))
}

fn valid_name(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'|' | b':'))
}

fn parse_int(b: &[u8]) -> Option<i64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let (neg, digits) = match b[0] {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if neg { -v } else { v })
}

/// Accumulates a `\r\n`-terminated line across chunks, keeping at most `LINE_KEEP` bytes.
#[derive(Default)]
struct Line {
    buf: Vec<u8>,
    seen: usize,
    start_ts: u64,
}

impl Line {
    /// Consume from `data[*i..]`; true when the line is complete (content without CRLF in
    /// `buf`). `limit` bounds the whole line length: `None` from the outer `Option` = too long.
    fn read(&mut self, data: &[u8], i: &mut usize, ts: u64, limit: usize) -> Option<bool> {
        if self.seen == 0 {
            self.start_ts = ts;
        }
        let rest = &data[*i..];
        let (part, done) = match rest.iter().position(|&c| c == b'\n') {
            Some(n) => (&rest[..n], true),
            None => (rest, false),
        };
        let room = LINE_KEEP.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&part[..room.min(part.len())]);
        self.seen += part.len();
        *i += part.len() + usize::from(done);
        if self.seen > limit {
            return None;
        }
        if done {
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            Some(true)
        } else {
            Some(false)
        }
    }
    fn reset(&mut self) {
        self.buf.clear();
        self.seen = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// Replies

/// A small view of a direct child of a top-level aggregate.
#[derive(Clone, Debug, PartialEq)]
enum Small {
    Str(Vec<u8>),
    Int(i64),
    Other,
}

#[derive(Debug)]
enum ReplyKind {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    /// `*`, `%`, `~`, `>` with declared length and the first three direct children.
    Agg {
        ty: u8,
        len: i64,
        elems: Vec<Small>,
    },
    Other,
}

#[derive(Debug)]
struct Reply {
    kind: ReplyKind,
    after_resync: bool,
    end_ts: u64,
}

struct Frame {
    /// Values still expected; `None` for streamed aggregates (end at `.`).
    remaining: Option<i64>,
    attr: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BulkKind {
    Plain,
    Error,
    /// A chunk of a streamed string (`;n`).
    StreamPart,
}

enum RMode {
    Lost,
    Line,
    Bulk { remaining: usize, kind: BulkKind },
}

struct Top {
    ty: u8,
    len: i64,
    elems: Vec<Small>,
}

struct ReplyParser {
    mode: RMode,
    line: Line,
    stack: Vec<Frame>,
    top: Option<Top>,
    bulk: Vec<u8>,
    /// Inside a streamed string (`$?`), between its parts.
    streamed: bool,
    /// Never synced yet: the first chunk is trusted to start at a value boundary.
    fresh: bool,
    /// A resync happened and no value has completed since.
    resync_pending: bool,
    /// Trial parse (resync candidate): stop at the first error instead of resyncing.
    trial: bool,
    /// Finished top-level values (used by trial parses).
    complete: u32,
}

enum Step {
    Ok,
    Err,
}

impl ReplyParser {
    fn new() -> Self {
        ReplyParser {
            mode: RMode::Lost,
            line: Line::default(),
            stack: Vec::new(),
            top: None,
            bulk: Vec::new(),
            streamed: false,
            fresh: true,
            resync_pending: false,
            trial: false,
            complete: 0,
        }
    }

    fn reset_value(&mut self) {
        self.line.reset();
        self.stack.clear();
        self.top = None;
        self.bulk.clear();
        self.streamed = false;
    }

    fn lose(&mut self) -> bool {
        let was = !matches!(self.mode, RMode::Lost);
        self.mode = RMode::Lost;
        self.reset_value();
        was
    }

    /// Start over as if the connection were new (the next chunk starts a reply).
    fn restart(&mut self) {
        self.lose();
        self.fresh = true;
        self.resync_pending = false;
    }

    /// Feed one chunk; returns whether sync was lost during it.
    fn feed(&mut self, data: &[u8], mut gap: usize, ts: u64, stats: &mut ParserStats, out: &mut Vec<Reply>) -> bool {
        let mut lost = false;
        let mut i = 0;
        loop {
            match &mut self.mode {
                RMode::Lost => {
                    if i >= data.len() || self.trial {
                        break;
                    }
                    if self.fresh && i == 0 && REPLY_TYPES.contains(&data[0]) {
                        // First bytes seen: trust the boundary.
                        self.fresh = false;
                        self.mode = RMode::Line;
                        continue;
                    }
                    self.fresh = false;
                    match find_reply_resync(&data[i..], i == 0) {
                        Some(o) => {
                            i += o;
                            self.mode = RMode::Line;
                            self.resync_pending = true;
                            stats.resyncs += 1;
                        }
                        None => break,
                    }
                }
                RMode::Line => {
                    if i >= data.len() {
                        break;
                    }
                    let first = self.line.seen == 0 && self.line.buf.is_empty();
                    let ty = if first { data[i] } else { self.line.buf[0] };
                    let limit = if matches!(ty, b'+' | b'-') { usize::MAX } else { MAX_NUM_LINE };
                    match self.line.read(data, &mut i, ts, limit) {
                        None => {
                            stats.parse_errors += 1;
                            lost |= self.lose();
                        }
                        Some(false) => break,
                        Some(true) => {
                            let line = std::mem::take(&mut self.line.buf);
                            self.line.reset();
                            if let Step::Err = self.on_line(&line, ts, out) {
                                stats.parse_errors += 1;
                                lost |= self.lose();
                            }
                            self.line.buf = line;
                            self.line.buf.clear();
                        }
                    }
                }
                RMode::Bulk { remaining, kind } => {
                    if i >= data.len() {
                        break;
                    }
                    let take = (*remaining).min(data.len() - i);
                    let kind = *kind;
                    let keep: usize = if kind == BulkKind::Error { 128 } else { 32 };
                    // Keep a prefix of the payload (CRLF excluded below).
                    let room = keep.saturating_sub(self.bulk.len());
                    self.bulk.extend_from_slice(&data[i..i + room.min(take)]);
                    *remaining -= take;
                    let done = *remaining == 0;
                    // Validate the CRLF when it was captured.
                    if done && take >= 2 && &data[i + take - 2..i + take] != b"\r\n" {
                        i += take;
                        stats.parse_errors += 1;
                        lost |= self.lose();
                        continue;
                    }
                    i += take;
                    if done {
                        self.end_bulk(kind, ts, out);
                    } else {
                        break;
                    }
                }
            }
        }
        if gap > 0 {
            if let RMode::Bulk { remaining, kind } = &mut self.mode {
                let t = gap.min(*remaining);
                *remaining -= t;
                gap -= t;
                let kind = *kind;
                if *remaining == 0 {
                    self.end_bulk(kind, ts, out);
                }
            }
            if gap > 0 {
                lost |= self.lose();
            }
        }
        lost
    }

    fn end_bulk(&mut self, kind: BulkKind, ts: u64, out: &mut Vec<Reply>) {
        self.mode = RMode::Line;
        let mut b = std::mem::take(&mut self.bulk);
        // The kept prefix may include the trailing CRLF of short values.
        if b.ends_with(b"\r\n") {
            b.truncate(b.len() - 2);
        } else if b.ends_with(b"\r") {
            b.pop();
        }
        match kind {
            BulkKind::StreamPart => {}
            BulkKind::Plain => self.value(Small::Str(b), None, ts, out),
            BulkKind::Error => self.value(Small::Other, Some(ReplyKind::Error(b)), ts, out),
        }
    }

    fn on_line(&mut self, line: &[u8], ts: u64, out: &mut Vec<Reply>) -> Step {
        let Some((&ty, rest)) = line.split_first() else {
            return Step::Err;
        };
        if self.streamed {
            // Only `;n` parts are valid inside a streamed string.
            if ty != b';' {
                return Step::Err;
            }
            let Some(n) = parse_int(rest).filter(|n| (0..=MAX_BULK as i64).contains(n)) else {
                return Step::Err;
            };
            if n == 0 {
                self.streamed = false;
                self.value(Small::Other, None, ts, out);
            } else {
                self.mode = RMode::Bulk { remaining: n as usize + 2, kind: BulkKind::StreamPart };
            }
            return Step::Ok;
        }
        if self.stack.is_empty() && self.top.is_none() {
            self.top = Some(Top { ty, len: 0, elems: Vec::new() });
        }
        match ty {
            b'+' => self.value(Small::Str(rest.to_vec()), Some(ReplyKind::Simple(rest.to_vec())), ts, out),
            b'-' => self.value(Small::Other, Some(ReplyKind::Error(rest.to_vec())), ts, out),
            b':' => match parse_int(rest) {
                Some(v) => self.value(Small::Int(v), None, ts, out),
                None => return Step::Err,
            },
            b'_' => {
                if !rest.is_empty() {
                    return Step::Err;
                }
                self.value(Small::Other, None, ts, out)
            }
            b',' => {
                let ok = !rest.is_empty()
                    && rest.iter().all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-'))
                    || matches!(rest, b"inf" | b"-inf" | b"nan" | b"-nan");
                if !ok {
                    return Step::Err;
                }
                self.value(Small::Other, None, ts, out)
            }
            b'#' => {
                if !matches!(rest, b"t" | b"f") {
                    return Step::Err;
                }
                self.value(Small::Other, None, ts, out)
            }
            b'(' => {
                let digits = rest.strip_prefix(b"-").unwrap_or(rest);
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                    return Step::Err;
                }
                self.value(Small::Other, None, ts, out)
            }
            b'$' | b'=' | b'!' => {
                if ty == b'$' && rest == b"?" {
                    self.streamed = true;
                    return Step::Ok;
                }
                match parse_int(rest) {
                    Some(-1) if ty == b'$' => self.value(Small::Other, None, ts, out),
                    Some(n) if (0..=MAX_BULK as i64).contains(&n) => {
                        self.bulk.clear();
                        self.mode = RMode::Bulk {
                            remaining: n as usize + 2,
                            kind: if ty == b'!' { BulkKind::Error } else { BulkKind::Plain },
                        };
                    }
                    _ => return Step::Err,
                }
            }
            b'*' | b'%' | b'~' | b'>' | b'|' => {
                let streamed = rest == b"?" && ty != b'|';
                let n = if streamed {
                    None
                } else {
                    match parse_int(rest) {
                        Some(-1) if ty == b'*' => {
                            self.value(Small::Other, None, ts, out);
                            return Step::Ok;
                        }
                        Some(n) if (0..=MAX_AGG).contains(&n) => Some(n),
                        _ => return Step::Err,
                    }
                };
                if self.stack.is_empty() {
                    if let Some(t) = &mut self.top {
                        t.len = n.unwrap_or(-1);
                    }
                }
                let remaining = n.map(|n| if matches!(ty, b'%' | b'|') { n * 2 } else { n });
                self.stack.push(Frame { remaining, attr: ty == b'|' });
                if remaining == Some(0) {
                    self.close_frame(ts, out);
                }
            }
            b'.' => {
                if !rest.is_empty() || self.stack.last().is_none_or(|f| f.remaining.is_some()) {
                    return Step::Err;
                }
                self.close_frame(ts, out);
            }
            _ => return Step::Err,
        }
        Step::Ok
    }

    /// The innermost aggregate is complete.
    fn close_frame(&mut self, ts: u64, out: &mut Vec<Reply>) {
        if let Some(f) = self.stack.pop() {
            if f.attr {
                if self.stack.is_empty() {
                    // A top-level attribute: the reply proper follows.
                    self.top = None;
                }
                return;
            }
            self.value(Small::Other, None, ts, out);
        }
    }

    /// A value (scalar, or an aggregate that just closed) is complete.
    fn value(&mut self, v: Small, top_kind: Option<ReplyKind>, ts: u64, out: &mut Vec<Reply>) {
        match self.stack.last_mut() {
            None => {
                let top = self.top.take();
                self.complete += 1;
                let kind = match (top_kind, top) {
                    (Some(k), _) => k,
                    (None, Some(t)) if matches!(t.ty, b'*' | b'%' | b'~' | b'>') => {
                        ReplyKind::Agg { ty: t.ty, len: t.len, elems: t.elems }
                    }
                    _ => ReplyKind::Other,
                };
                out.push(Reply { kind, after_resync: std::mem::take(&mut self.resync_pending), end_ts: ts });
            }
            Some(f) => {
                let direct = !f.attr;
                if direct && self.stack.len() == 1 {
                    if let Some(t) = &mut self.top {
                        if t.elems.len() < 3 {
                            t.elems.push(v);
                        }
                    }
                }
                let Some(f) = self.stack.last_mut() else {
                    return;
                };
                if let Some(r) = &mut f.remaining {
                    *r -= 1;
                    if *r <= 0 {
                        self.close_frame(ts, out);
                    }
                }
            }
        }
    }
}

/// Line starts of `data` from which a trial parse of replies succeeds.
const REPLY_TYPES: &[u8] = b"+-:$*%~>_,#(=!|";

fn find_reply_resync(data: &[u8], chunk_start: bool) -> Option<usize> {
    let mut tries = 0;
    for o in 0..data.len() {
        if !(o == 0 || data[o - 1] == b'\n') || !REPLY_TYPES.contains(&data[o]) {
            continue;
        }
        tries += 1;
        if tries > 256 {
            return None;
        }
        let mut p = ReplyParser::new();
        p.mode = RMode::Line;
        p.fresh = false;
        p.trial = true;
        let mut stats = ParserStats::default();
        let mut sink = Vec::new();
        let lost = p.feed(&data[o..], 0, 0, &mut stats, &mut sink);
        if lost || stats.parse_errors > 0 {
            continue;
        }
        if (o == 0 && chunk_start) || p.complete > 0 {
            return Some(o);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Commands

#[derive(Debug)]
struct Cmd {
    /// Upper-cased, validated command name.
    name: Option<Cow<'static, str>>,
    /// Upper-cased known subcommand of a container command.
    sub: Option<&'static str>,
    /// `SELECT`'s database index (digits only).
    db: Option<String>,
    /// Arguments after the name (subcommand included).
    args: u64,
    start_ts: u64,
    after_resync: bool,
}

enum CMode {
    Lost,
    Idle,
    ArrayHeader,
    ArgHeader,
    ArgBody { remaining: usize },
    Inline,
}

#[derive(Default)]
struct Inline {
    quote: Option<u8>,
    escape: bool,
    in_word: bool,
    words: u64,
    seen: usize,
}

struct CmdParser {
    mode: CMode,
    line: Line,
    nargs: i64,
    argi: i64,
    /// Bytes of the argument being kept (name, subcommand, SELECT index), at most 32.
    cur: Vec<u8>,
    keep_cur: bool,
    name: Option<Cow<'static, str>>,
    sub: Option<&'static str>,
    db: Option<String>,
    start_ts: u64,
    inline: Inline,
    /// Never synced yet: the first chunk is trusted to start at a command boundary.
    fresh: bool,
    /// The first sync was that trusted start (not a resync).
    started_clean: bool,
    /// A resync happened and no command has completed since.
    resync_pending: bool,
    /// Trial parse: stop at the first error instead of resyncing.
    trial: bool,
    complete: u32,
}

fn keep_arg(name: Option<&str>, argi: i64) -> bool {
    argi == 0 || (argi == 1 && name.is_some_and(|n| n == "SELECT" || CONTAINERS.contains(&n)))
}

impl CmdParser {
    fn new() -> Self {
        CmdParser {
            mode: CMode::Lost,
            line: Line::default(),
            nargs: 0,
            argi: 0,
            cur: Vec::new(),
            keep_cur: false,
            name: None,
            sub: None,
            db: None,
            start_ts: 0,
            inline: Inline::default(),
            fresh: true,
            started_clean: false,
            resync_pending: false,
            trial: false,
            complete: 0,
        }
    }

    fn reset_cmd(&mut self) {
        self.line.reset();
        self.cur.clear();
        self.name = None;
        self.sub = None;
        self.db = None;
        self.argi = 0;
        self.nargs = 0;
        self.inline = Inline::default();
    }

    fn lose(&mut self) -> bool {
        let was = !matches!(self.mode, CMode::Lost);
        self.mode = CMode::Lost;
        self.reset_cmd();
        was
    }

    /// An argument (`self.cur`) is complete.
    fn end_arg(&mut self) {
        // Taken to read it while `self` changes, and put back empty below: its capacity (≤ 33
        // bytes are kept) serves every argument of the connection.
        let mut a = std::mem::take(&mut self.cur);
        if self.argi == 0 {
            self.name = known_command(&a);
        } else if self.argi == 1 && self.keep_cur {
            match self.name.as_deref() {
                Some("SELECT") => {
                    if !a.is_empty() && a.len() <= 5 && a.iter().all(u8::is_ascii_digit) {
                        self.db = Some(String::from_utf8_lossy(&a).into_owned());
                    }
                }
                _ => {
                    let mut buf = [0u8; 32];
                    if let Some(up) = upper(&a, &mut buf) {
                        self.sub = SUBCOMMANDS.iter().copied().find(|s| s.as_bytes() == up);
                    }
                }
            }
        }
        a.clear();
        self.cur = a;
        self.argi += 1;
        self.keep_cur = keep_arg(self.name.as_deref(), self.argi);
    }

    fn end_cmd(&mut self, args: u64, out: &mut Vec<Cmd>) {
        self.complete += 1;
        out.push(Cmd {
            name: self.name.take(),
            sub: self.sub.take(),
            db: self.db.take(),
            args,
            start_ts: self.start_ts,
            after_resync: std::mem::take(&mut self.resync_pending),
        });
        self.reset_cmd();
        self.mode = CMode::Idle;
    }

    fn feed(&mut self, data: &[u8], mut gap: usize, ts: u64, stats: &mut ParserStats, out: &mut Vec<Cmd>) -> bool {
        let mut lost = false;
        let mut i = 0;
        while i < data.len() {
            match &mut self.mode {
                CMode::Lost => {
                    if self.trial {
                        break;
                    }
                    if self.fresh && i == 0 && (data[0] == b'*' || starts_with_known_inline(data)) {
                        self.fresh = false;
                        self.started_clean = true;
                        self.mode = CMode::Idle;
                        continue;
                    }
                    self.fresh = false;
                    match find_cmd_resync(&data[i..], i == 0) {
                        Some(o) => {
                            i += o;
                            self.mode = CMode::Idle;
                            self.resync_pending = true;
                            stats.resyncs += 1;
                        }
                        None => break,
                    }
                }
                CMode::Idle => {
                    self.start_ts = ts;
                    match data[i] {
                        b'*' => self.mode = CMode::ArrayHeader,
                        b'\r' | b'\n' => i += 1,
                        _ => {
                            self.reset_cmd();
                            self.keep_cur = true;
                            self.mode = CMode::Inline;
                        }
                    }
                }
                CMode::ArrayHeader | CMode::ArgHeader => {
                    let array = matches!(self.mode, CMode::ArrayHeader);
                    match self.line.read(data, &mut i, ts, MAX_NUM_LINE) {
                        None => {
                            stats.parse_errors += 1;
                            lost |= self.lose();
                        }
                        Some(false) => break,
                        Some(true) => {
                            let line = std::mem::take(&mut self.line.buf);
                            self.line.reset();
                            let want = if array { b'*' } else { b'$' };
                            let n = match line.split_first() {
                                Some((&t, rest)) if t == want => parse_int(rest),
                                _ => None,
                            };
                            match (array, n) {
                                // `*0` / `*-1`: ignored by the server, no reply.
                                (true, Some(n)) if n <= 0 => self.mode = CMode::Idle,
                                (true, Some(n)) if n <= MAX_ARGS => {
                                    self.nargs = n;
                                    self.argi = 0;
                                    self.keep_cur = true;
                                    self.mode = CMode::ArgHeader;
                                }
                                (false, Some(n)) if (0..=MAX_BULK as i64).contains(&n) => {
                                    self.cur.clear();
                                    self.mode = CMode::ArgBody { remaining: n as usize + 2 };
                                }
                                _ => {
                                    stats.parse_errors += 1;
                                    lost |= self.lose();
                                }
                            }
                        }
                    }
                }
                CMode::ArgBody { remaining } => {
                    let take = (*remaining).min(data.len() - i);
                    let payload_left = remaining.saturating_sub(2);
                    if self.keep_cur {
                        let n = take.min(payload_left).min(33usize.saturating_sub(self.cur.len()));
                        self.cur.extend_from_slice(&data[i..i + n]);
                    }
                    *remaining -= take;
                    i += take;
                    if *remaining == 0 {
                        if take >= 2 && &data[i - 2..i] != b"\r\n" {
                            stats.parse_errors += 1;
                            lost |= self.lose();
                            continue;
                        }
                        self.end_arg();
                        if self.argi >= self.nargs {
                            let args = (self.nargs - 1) as u64;
                            self.end_cmd(args, out);
                        } else {
                            self.mode = CMode::ArgHeader;
                        }
                    }
                }
                CMode::Inline => {
                    if !self.inline_bytes(data, &mut i, out) {
                        stats.parse_errors += 1;
                        lost |= self.lose();
                    }
                }
            }
        }
        if gap > 0 {
            if let CMode::ArgBody { remaining } = &mut self.mode {
                let t = gap.min(*remaining);
                *remaining -= t;
                gap -= t;
                if *remaining == 0 {
                    // Inside an argument nothing we keep was lost except possibly the name.
                    self.end_arg();
                    if self.argi >= self.nargs {
                        let args = (self.nargs - 1) as u64;
                        self.end_cmd(args, out);
                    } else {
                        self.mode = CMode::ArgHeader;
                    }
                }
            }
            if gap > 0 {
                lost |= self.lose();
            }
        }
        lost
    }

    /// Tokenise an inline command the way the server does (whitespace-separated, `"…"` with
    /// backslash escapes, `'…'`); only the first two words may be kept. False on garbage.
    fn inline_bytes(&mut self, data: &[u8], i: &mut usize, out: &mut Vec<Cmd>) -> bool {
        while *i < data.len() {
            let c = data[*i];
            *i += 1;
            self.inline.seen += 1;
            if self.inline.seen > MAX_INLINE {
                return false;
            }
            let st = &mut self.inline;
            if let Some(q) = st.quote {
                if st.escape {
                    st.escape = false;
                } else if q == b'"' && c == b'\\' {
                    st.escape = true;
                    continue;
                } else if c == q {
                    st.quote = None;
                    continue;
                }
                if c == b'\n' {
                    return false; // unbalanced quotes: the server rejects the line
                }
                if self.keep_cur && self.cur.len() < 33 {
                    self.cur.push(c);
                }
                continue;
            }
            match c {
                b'\n' => {
                    if st.in_word {
                        st.in_word = false;
                        st.words += 1;
                        self.end_arg();
                    }
                    let words = self.inline.words;
                    if words == 0 {
                        // Empty line: no command, no reply.
                        self.reset_cmd();
                        self.mode = CMode::Idle;
                    } else {
                        self.end_cmd(words - 1, out);
                    }
                    return true;
                }
                b' ' | b'\t' | b'\r' => {
                    if st.in_word {
                        st.in_word = false;
                        st.words += 1;
                        self.end_arg();
                    }
                }
                b'"' | b'\'' if !st.in_word => {
                    st.in_word = true;
                    st.quote = Some(c);
                }
                0 => return false,
                _ => {
                    st.in_word = true;
                    if self.keep_cur && self.cur.len() < 33 {
                        self.cur.push(c);
                    }
                }
            }
        }
        true
    }
}

fn starts_with_known_inline(data: &[u8]) -> bool {
    let end = data.iter().position(|&c| c == b' ' || c == b'\r' || c == b'\n').unwrap_or(data.len());
    if end == data.len() && data.len() > 16 {
        return false;
    }
    if known_command(&data[..end]).is_none() {
        return false;
    }
    // Not an HTTP request line (`GET / HTTP/1.1`).
    let line_end = data.iter().position(|&c| c == b'\n').unwrap_or(data.len());
    !data[..line_end].windows(6).any(|w| w == b" HTTP/")
}

/// Line starts of `data` from which commands parse.
fn find_cmd_resync(data: &[u8], chunk_start: bool) -> Option<usize> {
    let mut tries = 0;
    for o in 0..data.len() {
        if !(o == 0 || data[o - 1] == b'\n') {
            continue;
        }
        if data[o] != b'*' {
            if o == 0 && chunk_start && starts_with_known_inline(data) {
                return Some(0);
            }
            continue;
        }
        tries += 1;
        if tries > 256 {
            return None;
        }
        if trial_command(&data[o..]) {
            return Some(o);
        }
    }
    None
}

/// A RESP command parses from the start of `data` (to its end or to a complete command whose
/// name is valid), with at least `*N\r\n$M\r\n` present.
fn trial_command(data: &[u8]) -> bool {
    let Some(nl) = data.iter().position(|&c| c == b'\n') else {
        return false;
    };
    if data.get(nl + 1) != Some(&b'$') {
        return false;
    }
    let mut p = CmdParser::new();
    p.mode = CMode::Idle;
    p.fresh = false;
    p.trial = true;
    let mut stats = ParserStats::default();
    let mut sink = Vec::new();
    let lost = p.feed(data, 0, 0, &mut stats, &mut sink);
    !lost && stats.parse_errors == 0 && sink.iter().all(|c| c.name.is_some())
}

/// A RESP command (array of bulk strings whose first element is a plausible command name) or
/// an inline command starting with a well-known command name.
pub fn looks_like_resp(data: &[u8]) -> bool {
    match data.first() {
        Some(b'*') => {
            // `*N\r\n$M\r\nNAME`
            let mut p = CmdParser::new();
            p.mode = CMode::Idle;
            p.fresh = false;
            p.trial = true;
            let mut stats = ParserStats::default();
            let mut sink = Vec::new();
            let lost = p.feed(data, 0, 0, &mut stats, &mut sink);
            if lost || stats.parse_errors > 0 {
                return false;
            }
            if let Some(c) = sink.first() {
                return c.name.is_some();
            }
            // Incomplete: require the name's header and (a prefix of) a valid name.
            let Some(nl) = data.iter().position(|&c| c == b'\n') else {
                return false;
            };
            let rest = &data[nl + 1..];
            let Some(nl2) = rest.iter().position(|&c| c == b'\n') else {
                return false;
            };
            let name = &rest[nl2 + 1..];
            let name = &name[..name.iter().position(|&c| c == b'\r').unwrap_or(name.len())];
            rest.first() == Some(&b'$') && !name.is_empty() && valid_name(&name[..name.len().min(32)])
        }
        Some(_) => starts_with_known_inline(data),
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Pairing

#[derive(Debug)]
struct PendingCmd {
    cmd: Cmd,
    /// Subscription confirmations still expected; `Some(0)`-style completion; `None` = until
    /// a confirmation with count 0 (argument-less UNSUBSCRIBE).
    confirms: Option<u64>,
    is_sub: bool,
}

#[derive(Debug)]
enum Pending {
    Cmd(Box<PendingCmd>),
    /// Replies to swallow (untracked commands).
    Skip(u64),
}

/// Redis connection parser. See the module docs.
pub struct RedisConn {
    cmds: CmdParser,
    replies: ReplyParser,
    pending: VecDeque<Pending>,
    namespace: Option<String>,
    tx_select: Option<String>,
    subscribed: bool,
    monitor: bool,
    first_cmd_done: bool,
    uncertain: bool,
    /// Reply bytes were lost while commands were outstanding: replies are not paired until
    /// the next command, which flushes the outstanding ones as approximate.
    reply_suspect: bool,
    last_reply_ts: u64,
    stats: ParserStats,
    cmd_buf: Vec<Cmd>,
    reply_buf: Vec<Reply>,
}

impl Default for RedisConn {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RedisConn {
    /// Never prints buffered bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConn")
            .field("namespace", &self.namespace)
            .field("in_flight", &self.pending.len())
            .field("subscribed", &self.subscribed)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

const SUB_CMDS: &[&str] = &["SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"];

fn is_confirmation(elems: &[Small]) -> Option<i64> {
    match elems {
        [Small::Str(kind), _, Small::Int(n)] => {
            let k = String::from_utf8_lossy(kind).to_ascii_uppercase();
            SUB_CMDS.contains(&k.as_str()).then_some(*n)
        }
        _ => None,
    }
}

fn is_pubsub_message(len: i64, elems: &[Small]) -> bool {
    match elems.first() {
        Some(Small::Str(k)) => (len == 3 && (k == b"message" || k == b"smessage")) || (len == 4 && k == b"pmessage"),
        _ => false,
    }
}

impl RedisConn {
    pub fn new() -> Self {
        RedisConn {
            cmds: CmdParser::new(),
            replies: ReplyParser::new(),
            pending: VecDeque::new(),
            namespace: None,
            tx_select: None,
            subscribed: false,
            monitor: false,
            first_cmd_done: false,
            uncertain: false,
            reply_suspect: false,
            last_reply_ts: 0,
            stats: ParserStats::default(),
            cmd_buf: Vec::new(),
            reply_buf: Vec::new(),
        }
    }

    /// The selected database index, once known.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    pub fn stats(&self) -> ParserStats {
        self.stats
    }

    pub fn feed(&mut self, c: Chunk<'_>, out: &mut Vec<DbCall>) {
        if self.monitor {
            return;
        }
        let gap = c.total.saturating_sub(c.data.len());
        match c.dir {
            FlowDir::ToServer => {
                let mut cmds = std::mem::take(&mut self.cmd_buf);
                if self.cmds.feed(c.data, gap, c.ts_ns, &mut self.stats, &mut cmds) {
                    self.stats.desyncs += 1;
                    self.uncertain = true;
                }
                for cmd in cmds.drain(..) {
                    if !self.first_cmd_done {
                        self.first_cmd_done = true;
                        let handshake = matches!(cmd.name.as_deref(), Some("HELLO" | "AUTH" | "CLIENT" | "SELECT"));
                        if self.cmds.started_clean && !cmd.after_resync && handshake {
                            self.namespace = Some("0".into());
                        }
                    }
                    self.on_command(cmd, out);
                }
                self.cmd_buf = cmds;
            }
            FlowDir::ToClient => {
                self.last_reply_ts = c.ts_ns;
                if self.reply_suspect {
                    return; // see on_command
                }
                let mut replies = std::mem::take(&mut self.reply_buf);
                let lost = self.replies.feed(c.data, gap, c.ts_ns, &mut self.stats, &mut replies);
                for r in replies.drain(..) {
                    if self.monitor {
                        break;
                    }
                    self.on_reply(r, out);
                }
                self.reply_buf = replies;
                if lost {
                    self.stats.desyncs += 1;
                }
                if lost && !self.pending.is_empty() {
                    // RESP aggregates have element counts, not byte lengths: once bytes of an
                    // answer are lost its end cannot be found. Stop pairing until the client
                    // sends again (it normally waits for the whole answer first).
                    self.reply_suspect = true;
                }
            }
        }
    }

    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<DbCall>) {
        let end = if self.reply_suspect { self.last_reply_ts } else { ts_ns };
        self.flush_all(end, out);
        self.monitor = true; // ignore anything after close
    }

    fn flush_all(&mut self, ts: u64, out: &mut Vec<DbCall>) {
        while let Some(p) = self.pending.pop_front() {
            if let Pending::Cmd(pc) = p {
                let ns = self.namespace.clone();
                out.push(make_call(&pc.cmd, ns, ts, true));
            }
        }
        self.uncertain = false;
    }

    fn on_command(&mut self, cmd: Cmd, out: &mut Vec<DbCall>) {
        if cmd.after_resync {
            self.uncertain = true;
        }
        if self.reply_suspect {
            let ts = self.last_reply_ts;
            self.flush_all(ts, out);
            self.reply_suspect = false;
            self.replies.restart();
        }
        if self.pending.len() >= MAX_INFLIGHT {
            self.stats.dropped += 1;
            match self.pending.back_mut() {
                Some(Pending::Skip(n)) => *n += 1,
                _ => self.pending.push_back(Pending::Skip(1)),
            }
            return;
        }
        let is_sub = cmd.name.as_deref().is_some_and(|n| SUB_CMDS.contains(&n));
        let confirms = if is_sub { (cmd.args > 0).then_some(cmd.args) } else { Some(1) };
        self.pending.push_back(Pending::Cmd(Box::new(PendingCmd { cmd, confirms, is_sub })));
    }

    fn on_reply(&mut self, r: Reply, out: &mut Vec<DbCall>) {
        if r.after_resync {
            self.uncertain = true;
        }
        // Pub/sub confirmations (RESP2 arrays or RESP3 pushes) answer a subscribe-family command.
        if let ReplyKind::Agg { ty: b'*' | b'>', len: 3, elems } = &r.kind {
            if let Some(count) = is_confirmation(elems) {
                if let Some(Pending::Cmd(pc)) = self.pending.front_mut() {
                    if pc.is_sub {
                        self.subscribed = count > 0;
                        let done = match &mut pc.confirms {
                            Some(n) => {
                                *n -= 1;
                                *n == 0
                            }
                            None => count == 0,
                        };
                        if done {
                            self.complete(r, out);
                        }
                        return;
                    }
                }
                if r_is_push(&r) {
                    return;
                }
            }
        }
        match &r.kind {
            ReplyKind::Agg { ty: b'>', .. } => return, // out-of-band push
            ReplyKind::Agg { ty: b'*', len, elems } if self.subscribed && is_pubsub_message(*len, elems) => {
                return;
            }
            _ => {}
        }
        self.complete(r, out);
    }

    /// `r` answers the oldest pending command.
    fn complete(&mut self, r: Reply, out: &mut Vec<DbCall>) {
        let pc = match self.pending.pop_front() {
            None => {
                if !self.uncertain {
                    self.stats.unmatched += 1;
                }
                return;
            }
            Some(Pending::Skip(n)) => {
                if n > 1 {
                    self.pending.push_front(Pending::Skip(n - 1));
                }
                return;
            }
            Some(Pending::Cmd(pc)) => pc,
        };
        let ns_before = self.namespace.clone();
        let mut call = make_call(&pc.cmd, ns_before, r.end_ts, self.uncertain);
        match &r.kind {
            ReplyKind::Error(text) => {
                let word_end = text.iter().position(|c| !c.is_ascii_uppercase()).unwrap_or(text.len());
                let word = &text[..word_end.min(32)];
                if !word.is_empty() {
                    call.status_code = Some(String::from_utf8_lossy(word).into_owned());
                }
                let mut msg = redact_message(text, 120);
                if msg.is_empty() {
                    msg = "error".into();
                }
                if text.windows(15).any(|w| w == b"unknown command") {
                    call.operation = None;
                    call.summary = None;
                    call.query_text = None;
                }
                call.error_message = Some(msg);
                if pc.cmd.name.as_deref() == Some("EXEC") {
                    self.tx_select = None;
                }
            }
            ReplyKind::Simple(s) => match (pc.cmd.name.as_deref(), s.as_slice()) {
                (Some("SELECT"), b"OK") if pc.cmd.db.is_some() => self.namespace = pc.cmd.db.clone(),
                (Some("SELECT"), b"QUEUED") => self.tx_select = pc.cmd.db.clone(),
                (Some("DISCARD"), _) => self.tx_select = None,
                (Some("MONITOR"), b"OK") => self.monitor = true,
                (Some("RESET"), b"RESET") => {
                    self.namespace = Some("0".into());
                    self.subscribed = false;
                    self.tx_select = None;
                }
                _ => {}
            },
            ReplyKind::Agg { ty: b'*', len, .. } if pc.cmd.name.as_deref() == Some("EXEC") => {
                call.batch_size = Some((*len).clamp(0, u32::MAX as i64) as u32);
                if let Some(db) = self.tx_select.take() {
                    self.namespace = Some(db);
                }
            }
            _ => {
                if pc.cmd.name.as_deref() == Some("EXEC") {
                    self.tx_select = None; // null reply: aborted by WATCH
                }
            }
        }
        out.push(call);
        if self.pending.is_empty() {
            self.uncertain = false;
        }
    }
}

fn r_is_push(r: &Reply) -> bool {
    matches!(r.kind, ReplyKind::Agg { ty: b'>', .. })
}

fn make_call(cmd: &Cmd, namespace: Option<String>, end_ts: u64, approximate: bool) -> DbCall {
    let mut c = DbCall::new(DbSystem::Redis, cmd.start_ts);
    c.end_ns = end_ts.max(cmd.start_ts);
    c.approximate = approximate;
    c.namespace = namespace;
    if let Some(name) = &cmd.name {
        let (op, rest): (Cow<'static, str>, u64) = match &cmd.sub {
            Some(sub) => (Cow::Owned(format!("{name} {sub}")), cmd.args.saturating_sub(1)),
            None => (name.clone(), cmd.args),
        };
        let mut text = String::with_capacity(op.len() + 2 * rest.min(MAX_QMARKS) as usize + 4);
        text.push_str(&op);
        for _ in 0..rest.min(MAX_QMARKS) {
            text.push_str(" ?");
        }
        if rest > MAX_QMARKS {
            text.push_str(" …");
        }
        c.query_text = Some(text);
        c.summary = Some(op.clone());
        c.operation = Some(op);
    }
    c
}
