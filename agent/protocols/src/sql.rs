//! SQL text helpers: literal redaction, statement splitting and a light-weight description
//! (operation, first collection, summary) for `db.query.text` / `db.operation.name` /
//! `db.collection.name` / `db.query.summary`.
//!
//! # Lexer
//! A PostgreSQL-flavoured lexer (it also copes with common MySQL/SQLite spellings):
//! `'…'` strings with `''` escapes, `E'…'` strings with backslash escapes, `B'…'`, `X'…'`,
//! `N'…'`, `U&'…'`, dollar-quoted strings (`$$…$$`, `$tag$…$tag$`), `"…"` and `` `…` `` quoted
//! identifiers, `--` and nested `/* */` comments, numbers (`1`, `1.5`, `.5`, `1e-3`, `0x1F`,
//! `1_000`), `$1` parameters and `?` placeholders. Anything unterminated runs to the end of the
//! text (a truncated capture therefore never leaks the tail of a literal).
//!
//! # Redaction rules ([`redact`])
//! * every string literal (any prefix form, dollar-quoted included) → `?`;
//! * every numeric literal → `?` (a leading minus sign stays: `-?`);
//! * `TRUE` / `FALSE` → `?` except after `IS` / `IS NOT`;
//! * `$1`-style parameters, `?` placeholders, keywords, identifiers (quoted or not), operators
//!   and punctuation are kept;
//! * comments are removed (they may carry values or trace context) and every run of
//!   whitespace/comments becomes one space; the result is trimmed;
//! * `IN (?, ?, …)` collapses to `IN (?)` so query texts group well.
//!
//! # Limits
//! Pure function of its input, linear time. [`describe`] only looks at the text's tokens: it is a
//! heuristic, not a parser (documented per statement kind on the function).
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Space,
    Comment,
    /// String literal of any form (incl. dollar-quoted and prefixed ones).
    Str,
    Num,
    /// `$1` positional parameter.
    Param,
    /// Unquoted word: keyword or identifier.
    Word,
    /// `"quoted"` or `` `quoted` `` identifier.
    QIdent,
    /// Any other single character (operators, punctuation, `?`).
    Punct,
}

#[derive(Clone, Debug)]
struct Tok {
    kind: Kind,
    span: Range<usize>,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Index just past a `'`-quoted string starting at `i` (the opening quote).
fn scan_quoted(s: &[u8], i: usize, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'\\' if backslash => j += 2,
            b'\'' => {
                if s.get(j + 1) == Some(&b'\'') {
                    j += 2;
                } else {
                    return j + 1;
                }
            }
            _ => j += 1,
        }
    }
    s.len()
}

/// Index just past an identifier quoted with `q` (doubled `q` escapes it).
fn scan_qident(s: &[u8], i: usize, q: u8) -> usize {
    let mut j = i + 1;
    while j < s.len() {
        if s[j] == q {
            if s.get(j + 1) == Some(&q) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    s.len()
}

/// If a dollar-quote opening tag (`$$` or `$tag$`) starts at `i`, its length.
fn dollar_tag(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if j < s.len() && s[j] == b'$' {
        return Some(2);
    }
    if j >= s.len() || !(s[j].is_ascii_alphabetic() || s[j] == b'_' || s[j] >= 0x80) {
        return None;
    }
    while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == b'_' || s[j] >= 0x80) {
        j += 1;
    }
    (j < s.len() && s[j] == b'$').then_some(j + 1 - i)
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&k| &hay[k..k + needle.len()] == needle)
}

fn lex(sql: &str) -> Vec<Tok> {
    let s = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        let start = i;
        let kind;
        if b.is_ascii_whitespace() || b == 0x0b {
            while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == 0x0b) {
                i += 1;
            }
            kind = Kind::Space;
        } else if b == b'-' && s.get(i + 1) == Some(&b'-') {
            while i < s.len() && s[i] != b'\n' {
                i += 1;
            }
            kind = Kind::Comment;
        } else if b == b'/' && s.get(i + 1) == Some(&b'*') {
            let mut depth = 0usize;
            while i < s.len() {
                if s[i] == b'/' && s.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == b'*' && s.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            kind = Kind::Comment;
        } else if b == b'\'' {
            i = scan_quoted(s, i, false);
            kind = Kind::Str;
        } else if b == b'"' || b == b'`' {
            i = scan_qident(s, i, b);
            kind = Kind::QIdent;
        } else if b == b'$' {
            if s.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
                while i < s.len() && s[i].is_ascii_digit() {
                    i += 1;
                }
                kind = Kind::Param;
            } else if let Some(n) = dollar_tag(s, i) {
                let tag = &s[i..i + n];
                i = match find(s, i + n, tag) {
                    Some(k) => k + n,
                    None => s.len(),
                };
                kind = Kind::Str;
            } else {
                i += 1;
                kind = Kind::Punct;
            }
        } else if b.is_ascii_digit() || (b == b'.' && s.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            if b == b'0' && s.get(i + 1).is_some_and(|c| matches!(c | 0x20, b'x' | b'o' | b'b')) {
                i += 2;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
                    i += 1;
                }
            } else {
                while i < s.len() && (s[i].is_ascii_digit() || s[i] == b'_' || s[i] == b'.') {
                    i += 1;
                }
                if i < s.len() && (s[i] | 0x20) == b'e' {
                    let mut j = i + 1;
                    if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
                        j += 1;
                    }
                    if j < s.len() && s[j].is_ascii_digit() {
                        i = j;
                        while i < s.len() && s[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
            }
            kind = Kind::Num;
        } else if is_ident_start(b) {
            // Prefixed string literals: E'..', B'..', X'..', N'..', U&'..'.
            let lower = b | 0x20;
            if s.get(i + 1) == Some(&b'\'') && matches!(lower, b'e' | b'b' | b'x' | b'n') {
                i = scan_quoted(s, i + 1, lower == b'e');
                kind = Kind::Str;
            } else if lower == b'u' && s.get(i + 1) == Some(&b'&') && s.get(i + 2) == Some(&b'\'') {
                i = scan_quoted(s, i + 2, false);
                kind = Kind::Str;
            } else if lower == b'u' && s.get(i + 1) == Some(&b'&') && s.get(i + 2) == Some(&b'"') {
                i = scan_qident(s, i + 2, b'"');
                kind = Kind::QIdent;
            } else {
                while i < s.len() && is_ident_cont(s[i]) {
                    i += 1;
                }
                kind = Kind::Word;
            }
        } else {
            i += 1;
            kind = Kind::Punct;
        }
        // Never split a UTF-8 sequence (all delimiters above are ASCII; this is belt and braces).
        while i < s.len() && !sql.is_char_boundary(i) {
            i += 1;
        }
        out.push(Tok { kind, span: start..i });
    }
    out
}

fn word_is(sql: &str, t: &Tok, kw: &str) -> bool {
    t.kind == Kind::Word && sql[t.span.clone()].eq_ignore_ascii_case(kw)
}

/// Replace literals with `?` (see the module docs for the exact rules).
pub fn redact(sql: &str) -> String {
    let toks = lex(sql);
    // (text, space before)
    let mut out: Vec<(&str, bool)> = Vec::with_capacity(toks.len());
    let mut space = false;
    let mut sig: Vec<&Tok> = Vec::new(); // significant tokens seen so far (for IS [NOT] TRUE)
    for t in &toks {
        let text: &str = match t.kind {
            Kind::Space | Kind::Comment => {
                space = true;
                continue;
            }
            Kind::Str | Kind::Num => "?",
            Kind::Word if word_is(sql, t, "true") || word_is(sql, t, "false") => {
                let n = sig.len();
                let after_is = (n >= 1 && word_is(sql, sig[n - 1], "is"))
                    || (n >= 2 && word_is(sql, sig[n - 1], "not") && word_is(sql, sig[n - 2], "is"));
                if after_is { &sql[t.span.clone()] } else { "?" }
            }
            _ => &sql[t.span.clone()],
        };
        out.push((text, space && !out.is_empty()));
        space = false;
        sig.push(t);
    }
    collapse_in_lists(&mut out);
    let mut s = String::with_capacity(sql.len().min(1 << 16));
    for (text, sp) in out {
        if sp {
            s.push(' ');
        }
        s.push_str(text);
    }
    s
}

/// `IN (?, ?, ?)` → `IN (?)`.
fn collapse_in_lists(out: &mut Vec<(&str, bool)>) {
    let mut i = 0;
    while i + 3 < out.len() {
        if out[i].0.eq_ignore_ascii_case("in") && out[i + 1].0 == "(" && out[i + 2].0 == "?" {
            // Find `? , ? , ... )`.
            let mut j = i + 3;
            let mut ok = false;
            while j + 1 < out.len() && out[j].0 == "," && out[j + 1].0 == "?" {
                j += 2;
            }
            if j < out.len() && out[j].0 == ")" {
                ok = true;
            }
            if ok && j > i + 3 {
                out.drain(i + 3..j);
            }
        }
        i += 1;
    }
}

/// Split a (simple-query) text into its statements at top-level `;`, ignoring ones inside
/// strings, quoted identifiers and comments. Statements that are empty (only whitespace or
/// comments) are dropped; each returned slice is trimmed.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let toks = lex(sql);
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut meaningful = false;
    for t in &toks {
        match t.kind {
            Kind::Punct if &sql[t.span.clone()] == ";" => {
                if meaningful {
                    out.push(sql[start..t.span.start].trim());
                }
                start = t.span.end;
                meaningful = false;
            }
            Kind::Space | Kind::Comment => {}
            _ => meaningful = true,
        }
    }
    if meaningful {
        out.push(sql[start..].trim());
    }
    out
}

/// Keywords accepted as the first word of a statement (anything else yields no operation, so
/// garbage or a mistyped secret never becomes a span name).
const COMMANDS: &[&str] = &[
    "ABORT",
    "ALTER",
    "ANALYZE",
    "ANALYSE",
    "BEGIN",
    "CALL",
    "CHECKPOINT",
    "CLOSE",
    "CLUSTER",
    "COMMENT",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DECLARE",
    "DELETE",
    "DISCARD",
    "DO",
    "DROP",
    "END",
    "EXECUTE",
    "EXPLAIN",
    "FETCH",
    "GRANT",
    "IMPORT",
    "INSERT",
    "LISTEN",
    "LOAD",
    "LOCK",
    "MERGE",
    "MOVE",
    "NOTIFY",
    "PREPARE",
    "REASSIGN",
    "REFRESH",
    "REINDEX",
    "RELEASE",
    "RESET",
    "REVOKE",
    "ROLLBACK",
    "SAVEPOINT",
    "SECURITY",
    "SELECT",
    "SET",
    "SHOW",
    "START",
    "TABLE",
    "TRUNCATE",
    "UNLISTEN",
    "UPDATE",
    "VACUUM",
    "VALUES",
    "WITH",
    "REPLACE",
    "UPSERT",
    "USE",
    "DESCRIBE",
];

/// Words skipped between `CREATE`/`ALTER`/`DROP` and the object type.
const DDL_MODIFIERS: &[&str] = &[
    "OR",
    "REPLACE",
    "GLOBAL",
    "LOCAL",
    "TEMP",
    "TEMPORARY",
    "UNLOGGED",
    "UNIQUE",
    "RECURSIVE",
    "TRUSTED",
    "PROCEDURAL",
    "DEFAULT",
    "CONSTRAINT",
];

/// Object types whose name is reported as the collection.
const DDL_TABLE_LIKE: &[&str] = &["TABLE", "VIEW", "SEQUENCE", "FOREIGN"];

/// Words that may not be taken for a table name.
const NOT_A_NAME: &[&str] = &[
    "SELECT", "LATERAL", "ONLY", "VALUES", "WITH", "IF", "NOT", "EXISTS", "TABLE", "ON", "WHERE", "SET", "AS", "USING",
    "DEFAULT", "INTO", "FROM", "JOIN",
];

struct Sig<'a> {
    sql: &'a str,
    toks: Vec<(Kind, Range<usize>, u32)>, // kind, span, paren depth at the token
}

impl<'a> Sig<'a> {
    fn new(sql: &'a str) -> Self {
        let mut depth = 0u32;
        let mut toks = Vec::new();
        for t in lex(sql) {
            match t.kind {
                Kind::Space | Kind::Comment => continue,
                Kind::Punct if &sql[t.span.clone()] == ")" => {
                    depth = depth.saturating_sub(1);
                    toks.push((t.kind, t.span, depth));
                }
                Kind::Punct if &sql[t.span.clone()] == "(" => {
                    toks.push((t.kind, t.span, depth));
                    depth += 1;
                }
                _ => toks.push((t.kind, t.span, depth)),
            }
        }
        Sig { sql, toks }
    }
    fn text(&self, i: usize) -> &'a str {
        self.toks.get(i).map_or("", |t| &self.sql[t.1.clone()])
    }
    fn is_kw(&self, i: usize, kw: &str) -> bool {
        self.toks.get(i).is_some_and(|t| t.0 == Kind::Word && self.sql[t.1.clone()].eq_ignore_ascii_case(kw))
    }
    fn is_any(&self, i: usize, kws: &[&str]) -> bool {
        kws.iter().any(|k| self.is_kw(i, k))
    }
    fn upper(&self, i: usize) -> String {
        self.text(i).to_ascii_uppercase()
    }
    fn depth(&self, i: usize) -> u32 {
        self.toks.get(i).map_or(0, |t| t.2)
    }
    fn is_punct(&self, i: usize, p: &str) -> bool {
        self.toks.get(i).is_some_and(|t| t.0 == Kind::Punct && &self.sql[t.1.clone()] == p)
    }

    /// A (possibly qualified) table name starting at `i`, skipping `ONLY`/`LATERAL`/`IF [NOT]
    /// EXISTS`. `None` if what follows is not a name (a subquery, a function call, a literal).
    fn name_at(&self, mut i: usize, allow_paren: bool) -> Option<String> {
        loop {
            if self.is_any(i, &["ONLY", "LATERAL"]) {
                i += 1;
            } else if self.is_kw(i, "IF") {
                i += 1;
                if self.is_kw(i, "NOT") {
                    i += 1;
                }
                if self.is_kw(i, "EXISTS") {
                    i += 1;
                }
            } else {
                break;
            }
        }
        let part = |i: usize| -> bool {
            self.toks.get(i).is_some_and(|t| t.0 == Kind::QIdent || (t.0 == Kind::Word && !self.is_any(i, NOT_A_NAME)))
        };
        if !part(i) {
            return None;
        }
        let mut name = String::from(self.text(i));
        let mut j = i + 1;
        while self.is_punct(j, ".") && part(j + 1) {
            name.push('.');
            name.push_str(self.text(j + 1));
            j += 2;
        }
        if !allow_paren && self.is_punct(j, "(") {
            return None; // function call (unnest(...), generate_series(...))
        }
        if name.len() > 128 {
            return None;
        }
        Some(name)
    }

    /// First table following one of `kws` at or after `from`, shallowest nesting first.
    fn table_after(&self, from: usize, kws: &[&str], allow_paren: bool) -> Option<String> {
        let mut cands: Vec<(u32, usize)> =
            (from..self.toks.len()).filter(|&i| self.is_any(i, kws)).map(|i| (self.depth(i), i)).collect();
        cands.sort();
        cands.into_iter().find_map(|(_, i)| self.name_at(i + 1, allow_paren))
    }
}

/// Describe one statement: `(operation, collection, summary)`.
///
/// * operation: the first keyword, upper-cased, if it is a known SQL command; `WITH … ` reports
///   the main statement's verb; `CREATE`/`ALTER`/`DROP` include the object type
///   (`CREATE TABLE`, `DROP INDEX`); leading `(` are skipped.
/// * collection: the first table of the statement — `SELECT`: after the shallowest `FROM`/`JOIN`;
///   `INSERT`/`MERGE`: after `INTO`; `UPDATE`, `COPY`, `TRUNCATE`, `LOCK`, `TABLE`: the next name;
///   `DELETE`: after `FROM`; DDL on tables/views/sequences: the object name; `CREATE INDEX`: the
///   table after `ON`. Written as in the text (schema prefix and quotes kept).
/// * summary: `"{operation} {collection}"`, `"{operation}"`, or `""` when there is no operation.
///
/// For a text holding several statements only the first is described (use
/// [`split_statements`] first).
pub fn describe(sql: &str) -> (Option<String>, Option<String>, String) {
    let s = Sig::new(sql);
    let mut i = 0;
    while s.is_punct(i, "(") {
        i += 1;
    }
    let first = s.upper(i);
    if !COMMANDS.contains(&first.as_str()) || s.toks.get(i).is_none_or(|t| t.0 != Kind::Word) {
        return (None, None, String::new());
    }
    let mut op = first;
    if op == "WITH" {
        // The main statement is the first DML verb at the WITH's own depth.
        let d = s.depth(i);
        let main = (i + 1..s.toks.len())
            .find(|&j| s.depth(j) == d && s.is_any(j, &["SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"]));
        match main {
            Some(j) => {
                i = j;
                op = s.upper(j);
            }
            None => return (Some(op.clone()), None, op),
        }
    }
    let collection = match op.as_str() {
        "SELECT" => s.table_after(i + 1, &["FROM", "JOIN"], false),
        "INSERT" | "MERGE" | "REPLACE" | "UPSERT" => s.table_after(i + 1, &["INTO"], true),
        "DELETE" => s.table_after(i + 1, &["FROM"], false),
        "UPDATE" | "TABLE" => s.name_at(i + 1, false),
        "COPY" => {
            if s.is_punct(i + 1, "(") {
                s.table_after(i + 2, &["FROM", "JOIN"], false)
            } else {
                s.name_at(i + 1, true)
            }
        }
        "TRUNCATE" | "LOCK" => {
            let j = if s.is_kw(i + 1, "TABLE") { i + 2 } else { i + 1 };
            s.name_at(j, false)
        }
        "CREATE" | "ALTER" | "DROP" => {
            let mut j = i + 1;
            while s.is_any(j, DDL_MODIFIERS) {
                j += 1;
            }
            let mut obj = s.upper(j);
            if s.toks.get(j).is_some_and(|t| t.0 == Kind::Word) && obj.len() <= 32 {
                if obj == "MATERIALIZED" || obj == "FOREIGN" {
                    j += 1;
                    obj = format!("{obj} {}", s.upper(j));
                }
                let coll = if DDL_TABLE_LIKE.iter().any(|t| obj.ends_with(t)) {
                    s.name_at(j + 1, true)
                } else if obj == "INDEX" {
                    s.table_after(j + 1, &["ON"], true)
                } else {
                    None
                };
                if obj.bytes().all(|b| b.is_ascii_alphabetic() || b == b' ') {
                    op = format!("{op} {obj}");
                }
                coll
            } else {
                None
            }
        }
        _ => None,
    };
    let summary = match &collection {
        Some(c) => format!("{op} {c}"),
        None => op.clone(),
    };
    (Some(op), collection, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_table() {
        let cases: &[(&str, &str)] = &[
            ("SELECT 1", "SELECT ?"),
            ("select * from t where a = 'x' and b = 42", "select * from t where a = ? and b = ?"),
            ("SELECT 'it''s', E'a\\'b', $$x$$, $tag$ y $ $tag$", "SELECT ?, ?, ?, ?"),
            ("SELECT -1.5e10, .5, 0x1F, 1_000", "SELECT -?, ?, ?, ?"),
            ("SELECT \"col\"\"x\", t1.c2 FROM s.t1", "SELECT \"col\"\"x\", t1.c2 FROM s.t1"),
            ("SELECT * FROM t WHERE id = $1 AND x = ?", "SELECT * FROM t WHERE id = $1 AND x = ?"),
            ("SELECT a -- secret 'x'\n FROM t /* 42 /* nested */ */ WHERE b", "SELECT a FROM t WHERE b"),
            ("WHERE x IN (1, 2, 3) AND y IN ($1, $2)", "WHERE x IN (?) AND y IN ($1, $2)"),
            ("WHERE flag = true AND f IS NOT FALSE AND g IS TRUE", "WHERE flag = ? AND f IS NOT FALSE AND g IS TRUE"),
            ("SELECT B'0101', X'ff', N'n', U&'d\\0061t'", "SELECT ?, ?, ?, ?"),
            ("SELECT DATE '2020-01-01', INTERVAL '1 day'", "SELECT DATE ?, INTERVAL ?"),
            ("SELECT 'unterminated secret", "SELECT ?"),
            ("SELECT $q$ never closed", "SELECT ?"),
            ("SELECT '{1,2}'::int[], ARRAY[1,2]", "SELECT ?::int[], ARRAY[?,?]"),
            ("INSERT INTO t(a) VALUES ('é中文'), (2)", "INSERT INTO t(a) VALUES (?), (?)"),
            ("SELECT col_1, t2 FROM tab3", "SELECT col_1, t2 FROM tab3"),
            ("  \n ", ""),
            ("SELECT 'a' /* unterminated", "SELECT ?"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), *want, "input: {input:?}");
        }
    }

    #[test]
    fn describe_table() {
        let cases: &[(&str, Option<&str>, Option<&str>, &str)] = &[
            ("SELECT * FROM users WHERE id = 1", Some("SELECT"), Some("users"), "SELECT users"),
            (
                "select a from public.users u join orders o on true",
                Some("SELECT"),
                Some("public.users"),
                "SELECT public.users",
            ),
            ("SELECT 1", Some("SELECT"), None, "SELECT"),
            ("SELECT (SELECT 1 FROM inner_t) FROM outer_t", Some("SELECT"), Some("outer_t"), "SELECT outer_t"),
            ("SELECT * FROM (SELECT * FROM deep) x", Some("SELECT"), Some("deep"), "SELECT deep"),
            ("INSERT INTO orders (a) VALUES (1)", Some("INSERT"), Some("orders"), "INSERT orders"),
            ("UPDATE ONLY accounts SET x = 1", Some("UPDATE"), Some("accounts"), "UPDATE accounts"),
            ("DELETE FROM \"Weird\" WHERE 1=1", Some("DELETE"), Some("\"Weird\""), "DELETE \"Weird\""),
            (
                "WITH x AS (SELECT * FROM a), y AS (DELETE FROM b RETURNING *) INSERT INTO c SELECT * FROM x",
                Some("INSERT"),
                Some("c"),
                "INSERT c",
            ),
            (
                "WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n+1 FROM r) SELECT * FROM r",
                Some("SELECT"),
                Some("r"),
                "SELECT r",
            ),
            ("CREATE TABLE IF NOT EXISTS t1 (id int)", Some("CREATE TABLE"), Some("t1"), "CREATE TABLE t1"),
            ("create unique index i on only t2 (a)", Some("CREATE INDEX"), Some("t2"), "CREATE INDEX t2"),
            ("DROP TABLE IF EXISTS s.t3", Some("DROP TABLE"), Some("s.t3"), "DROP TABLE s.t3"),
            (
                "CREATE MATERIALIZED VIEW mv AS SELECT 1",
                Some("CREATE MATERIALIZED VIEW"),
                Some("mv"),
                "CREATE MATERIALIZED VIEW mv",
            ),
            ("BEGIN", Some("BEGIN"), None, "BEGIN"),
            ("COPY items (a, b) FROM STDIN", Some("COPY"), Some("items"), "COPY items"),
            ("COPY (SELECT * FROM items) TO STDOUT", Some("COPY"), Some("items"), "COPY items"),
            ("TRUNCATE TABLE ONLY logs", Some("TRUNCATE"), Some("logs"), "TRUNCATE logs"),
            ("SELECT * FROM generate_series(1, 3)", Some("SELECT"), None, "SELECT"),
            ("/* c */ (SELECT 1 FROM t) UNION (SELECT 2)", Some("SELECT"), Some("t"), "SELECT t"),
            ("hunter2 is not sql", None, None, ""),
            ("", None, None, ""),
            ("SET search_path = x", Some("SET"), None, "SET"),
            ("MERGE INTO tgt USING src ON true WHEN MATCHED THEN DO NOTHING", Some("MERGE"), Some("tgt"), "MERGE tgt"),
        ];
        for (sql, op, coll, summary) in cases {
            let (o, c, s) = describe(sql);
            assert_eq!(o.as_deref(), *op, "op of {sql:?}");
            assert_eq!(c.as_deref(), *coll, "collection of {sql:?}");
            assert_eq!(s, *summary, "summary of {sql:?}");
        }
    }

    #[test]
    fn split_table() {
        assert_eq!(split_statements("SELECT 1; SELECT ';' ; -- x\n ;"), vec!["SELECT 1", "SELECT ';'"]);
        assert_eq!(split_statements(""), Vec::<&str>::new());
        assert_eq!(
            split_statements("BEGIN;INSERT INTO t VALUES ($$;$$);COMMIT"),
            vec!["BEGIN", "INSERT INTO t VALUES ($$;$$)", "COMMIT"]
        );
    }
}
