//! Redaction of URL query strings before they leave the agent.
//!
//! Two modes:
//! - [`redact_query`] (default): parameter names are kept; the value of a parameter whose name looks
//!   sensitive (case-insensitive substring match against [`SENSITIVE_NAME_PARTS`], or an exact match
//!   against [`SENSITIVE_NAMES`], checked on the percent-decoded name) becomes `REDACTED`, and so does
//!   any value that itself looks like a credential or personal data (a JWT, an e-mail address).
//!   Other values are kept verbatim.
//! - [`redact_all_query_values`] (strict): every value becomes `?`.
//!
//! Both keep the parameter order and the `&` separators, so the output stays a valid query string.

use std::borrow::Cow;

/// Replacement for a sensitive value in [`redact_query`].
pub const REDACTED: &str = "REDACTED";

/// A parameter whose (lower-cased, percent-decoded) name contains one of these has its value redacted.
/// Substring matching over-redacts a little ("author", "zipcode") on purpose: leaking is worse.
pub const SENSITIVE_NAME_PARTS: &[&str] = &[
    "token",
    "key",
    "secret",
    "passw",
    "passwd",
    "pwd",
    "auth",
    "session",
    "sess_id",
    "sessid",
    "sig",
    "code",
    "credential",
    "jwt",
    "bearer",
    "cookie",
    "email",
    "e-mail",
    "phone",
    "private",
];

/// Short names redacted only on an exact (case-insensitive) match, since as substrings they would
/// hit ordinary words ("side", "ping").
pub const SENSITIVE_NAMES: &[&str] = &["sid", "pin", "otp", "ssn", "cvv", "cvc", "iban", "pass", "ticket"];

/// Redact the values of sensitive query parameters (see the module docs). `q` is the query string
/// without the leading `?`.
pub fn redact_query(q: &str) -> String {
    map_params(q, |name, value| {
        if value.is_empty() {
            return None;
        }
        if name_is_sensitive(name) || value_looks_sensitive(value) { Some(REDACTED) } else { None }
    })
}

/// Strict mode: replace every parameter value with `?` (names are kept).
pub fn redact_all_query_values(q: &str) -> String {
    map_params(q, |_, _| Some("?"))
}

/// Rebuild `q` with each `name=value` pair's value replaced by what `f` returns (`None` keeps it).
/// A bare item without `=` is kept unless it looks like a credential itself.
fn map_params(q: &str, f: impl Fn(&str, &str) -> Option<&'static str>) -> String {
    let mut out = String::with_capacity(q.len());
    for (i, item) in q.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match item.split_once('=') {
            Some((name, value)) => {
                out.push_str(name);
                out.push('=');
                out.push_str(f(name, value).unwrap_or(value));
            }
            None if value_looks_sensitive(item) => out.push_str(REDACTED),
            None => out.push_str(item),
        }
    }
    out
}

/// True when a parameter name designates a secret or personal data.
pub fn name_is_sensitive(name: &str) -> bool {
    let decoded = percent_decode_lossy(name);
    // Lower-cased copy only for a name that has upper-case letters (most have none).
    let lower: Cow<'_, str> = if decoded.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(decoded.to_ascii_lowercase())
    } else {
        decoded
    };
    SENSITIVE_NAME_PARTS.iter().any(|p| lower.contains(p)) || SENSITIVE_NAMES.contains(&lower.as_ref())
}

/// True when a value looks like a credential or personal data whatever its name: a JWT
/// (`eyJ…` with two dots) or an e-mail address.
pub fn value_looks_sensitive(value: &str) -> bool {
    let v = percent_decode_lossy(value);
    let jwt = v.starts_with("eyJ") && v.matches('.').count() >= 2;
    let email = v.contains('@');
    jwt || email
}

/// Decode `%XX` escapes and `+` (as space) for matching purposes only. Borrowed when there is
/// nothing to decode (the usual case: no copy per parameter).
fn percent_decode_lossy(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_query_table() {
        let cases: &[(&str, &str)] = &[
            ("", ""),
            ("a=1&b=2", "a=1&b=2"),
            ("token=abc", "token=REDACTED"),
            ("access_token=abc&page=2", "access_token=REDACTED&page=2"),
            ("API_KEY=zzz", "API_KEY=REDACTED"),
            ("apiKey=zzz&q=rust", "apiKey=REDACTED&q=rust"),
            ("password=hunter2&user=bob", "password=REDACTED&user=bob"),
            ("passwd=x", "passwd=REDACTED"),
            ("X-Amz-Signature=deadbeef&X-Amz-Date=20240101", "X-Amz-Signature=REDACTED&X-Amz-Date=20240101"),
            ("sig=1&sigma=2", "sig=REDACTED&sigma=REDACTED"),
            ("code=4/0AX&state=xyz", "code=REDACTED&state=xyz"),
            ("session_id=1", "session_id=REDACTED"),
            ("client_secret=s", "client_secret=REDACTED"),
            ("auth=a&author=b", "auth=REDACTED&author=REDACTED"),
            ("sid=1&side=left", "sid=REDACTED&side=left"),
            ("api%5Fkey=1", "api%5Fkey=REDACTED"),
            ("token=", "token="),
            ("token", "token"),
            ("flag&x=1", "flag&x=1"),
            ("to=bob%40example.com", "to=REDACTED"),
            ("t=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "t=REDACTED"),
            ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "REDACTED"),
            ("a=1&&b=2", "a=1&&b=2"),
            ("a==b", "a==b"),
            ("%", "%"),
            ("x=%4", "x=%4"),
        ];
        for (q, want) in cases {
            assert_eq!(redact_query(q), *want, "query {q:?}");
        }
    }

    #[test]
    fn redact_all_table() {
        let cases: &[(&str, &str)] =
            &[("", ""), ("a=1&b=2", "a=?&b=?"), ("a=&b", "a=?&b"), ("token=x", "token=?"), ("a=b=c", "a=?")];
        for (q, want) in cases {
            assert_eq!(redact_all_query_values(q), *want, "query {q:?}");
        }
    }

    #[test]
    fn percent_decode() {
        assert_eq!(percent_decode_lossy("a%20b+c"), "a b c");
        assert_eq!(percent_decode_lossy("%zz%"), "%zz%");
        assert_eq!(percent_decode_lossy("%e2%82%ac"), "€");
    }
}
