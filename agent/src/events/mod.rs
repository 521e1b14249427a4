//! Ring-buffer records → typed views. Decoding is zero-copy: a data record's payload is a slice
//! of the ring-buffer item, valid until the item is released.

use waybill_common::{
    CloseEvent, ConnEvent, CtxTrailer, DataHeader, EventHeader, InjectEvent, KIND_CLOSE, KIND_CONN, KIND_DATA,
    KIND_DATA_CTX, KIND_INJECT, KIND_PORT_MATCH, KIND_PROC_EXEC, KIND_PROC_EXIT, KIND_PROC_FORK, ProcEvent,
    ctx_trailer_offset,
};

pub mod pump;
mod timer;

/// One decoded record.
#[derive(Debug)]
pub enum Record<'a> {
    Conn(ConnEvent),
    /// `ctx`: the kernel-decided ids of the server request this payload starts (`KIND_DATA_CTX`).
    Data {
        head: DataHeader,
        payload: &'a [u8],
        ctx: Option<CtxTrailer>,
    },
    Close(CloseEvent),
    Exec(ProcEvent),
    Fork(ProcEvent),
    Exit(ProcEvent),
    PortMatch(ProcEvent),
    Inject(InjectEvent),
}

fn read<T: Copy>(buf: &[u8]) -> Option<T> {
    if buf.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a plain #[repr(C)] integer struct (any bit pattern is valid);
    // read_unaligned copes with the ring buffer's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer item. None for a truncated or unknown record (the caller counts it).
pub fn decode(buf: &[u8]) -> Option<Record<'_>> {
    let hdr: EventHeader = read(buf)?;
    Some(match hdr.kind {
        KIND_CONN => Record::Conn(read(buf)?),
        KIND_DATA | KIND_DATA_CTX => {
            let head: DataHeader = read(buf)?;
            let start = size_of::<DataHeader>();
            let end = start.checked_add(head.captured as usize)?;
            if end > buf.len() || head.captured as u64 > head.total {
                return None;
            }
            let ctx = if hdr.kind == KIND_DATA_CTX {
                Some(read(buf.get(start + ctx_trailer_offset(head.captured) as usize..)?)?)
            } else {
                None
            };
            Record::Data { head, payload: &buf[start..end], ctx }
        }
        KIND_CLOSE => Record::Close(read(buf)?),
        KIND_PROC_EXEC => Record::Exec(read(buf)?),
        KIND_PROC_FORK => Record::Fork(read(buf)?),
        KIND_PROC_EXIT => Record::Exit(read(buf)?),
        KIND_PORT_MATCH => Record::PortMatch(read(buf)?),
        KIND_INJECT => Record::Inject(read(buf)?),
        _ => return None,
    })
}

/// A process name from a fixed-size, NUL-padded `comm`.
pub fn comm(c: &[u8; 16]) -> String {
    let n = c.iter().position(|b| *b == 0).unwrap_or(16);
    String::from_utf8_lossy(&c[..n]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a plain struct's bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
    }

    /// A data record header of `kind` from pid 7 with 5 captured bytes of `total`.
    fn data_head(kind: u32, total: u64) -> DataHeader {
        DataHeader {
            hdr: EventHeader { kind, tgid: 7, tid: 8, _pad: 0, ts_ns: 99 },
            fd: 3,
            dir: 0,
            total,
            captured: 5,
            syscall: 0,
            sk: 1,
        }
    }

    #[test]
    fn decodes_data_with_payload_and_rejects_lies() {
        let mut b = bytes(&data_head(KIND_DATA, 10));
        b.extend_from_slice(b"GET /");
        match decode(&b) {
            Some(Record::Data { head, payload, ctx: None }) => {
                assert_eq!(head.hdr.tgid, 7);
                assert_eq!(payload, b"GET /");
            }
            other => panic!("{other:?}"),
        }
        // Claims more payload than present.
        assert!(decode(&b[..b.len() - 1]).is_none());
        // Unknown kind, truncated header.
        let mut u = b.clone();
        u[0] = 0xff;
        assert!(decode(&u).is_none());
        assert!(decode(&b[..10]).is_none());
    }

    #[test]
    fn decodes_the_context_trailer_after_the_padded_payload() {
        let trailer =
            CtxTrailer { flags: 2, _pad: 0, trace_id: [0xab; 16], span_id: [0xcd; 8], parent_span_id: [0; 8] };
        let mut b = bytes(&data_head(KIND_DATA_CTX, 20));
        b.extend_from_slice(b"GET /\0\0\0");
        b.extend_from_slice(&bytes(&trailer));
        match decode(&b) {
            Some(Record::Data { payload, ctx: Some(ctx), .. }) => {
                assert_eq!(payload, b"GET /");
                assert_eq!((ctx.flags, ctx.trace_id, ctx.span_id), (2, [0xab; 16], [0xcd; 8]));
            }
            other => panic!("{other:?}"),
        }
        // A trailer cut short is a malformed record, not a context of zeros.
        assert!(decode(&b[..b.len() - 1]).is_none());
        // The same bytes as a plain data record: no context.
        let mut plain = b.clone();
        plain[..4].copy_from_slice(&KIND_DATA.to_ne_bytes());
        assert!(matches!(decode(&plain), Some(Record::Data { ctx: None, .. })));
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut c = [0u8; 16];
        c[..5].copy_from_slice(b"nginx");
        assert_eq!(comm(&c), "nginx");
        assert_eq!(comm(&[b'a'; 16]), "a".repeat(16));
    }
}
