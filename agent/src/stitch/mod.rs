//! Request/response pairing, span building and parent links.

pub mod span;
