//! Turns a fuzzer input into a sequence of chunks for the connection parsers.
//!
//! Input format, repeated until the bytes run out: one control byte
//! `d t l l l l l l` — `d` direction (1 = to client), `t` truncated, `l` length code
//! (0..=47: that many bytes; 48..=63: `(code - 47) * 64` bytes) — then, when `t` is set, one
//! byte `e` giving `e * 97` uncaptured bytes, then the chunk's captured bytes (fewer if the
//! input ends). Timestamps count up from 1.
use waybill_protocols::{Chunk, FlowDir};

pub struct Piece<'a> {
    pub dir: FlowDir,
    pub data: &'a [u8],
    pub total: usize,
    pub ts_ns: u64,
}

impl Piece<'_> {
    pub fn chunk(&self) -> Chunk<'_> {
        Chunk { dir: self.dir, data: self.data, total: self.total, ts_ns: self.ts_ns }
    }
}

pub fn pieces(mut input: &[u8]) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut ts = 0;
    while let Some((&ctl, rest)) = input.split_first() {
        input = rest;
        let code = (ctl & 0x3f) as usize;
        let len = if code < 48 { code } else { (code - 47) * 64 };
        let mut extra = 0;
        if ctl & 0x40 != 0 {
            if let Some((&e, rest)) = input.split_first() {
                extra = e as usize * 97;
                input = rest;
            }
        }
        let n = len.min(input.len());
        let (data, rest) = input.split_at(n);
        input = rest;
        ts += 1;
        out.push(Piece {
            dir: if ctl & 0x80 != 0 { FlowDir::ToClient } else { FlowDir::ToServer },
            data,
            total: n + extra,
            ts_ns: ts,
        });
    }
    out
}
