//! TLS connections in the connection table. The kernel sends the plaintext of a TLS connection
//! (from the `SSL_*` / Go `crypto/tls` uprobes) as ordinary data records of its socket fd with a
//! TLS `syscall` value; from the first such record on, the connection is TLS: parsers see only the
//! plaintext, any ciphertext record of the same fd (the handshake, shipped before the kernel knew)
//! is ignored, and spans say `tls.protocol.name = tls`.

use waybill_common::{DataHeader, is_tls_syscall};

use super::{Conn, ConnTable, Finished, L7};
use crate::metrics::Metrics;

impl ConnTable {
    /// First step of `on_data`. Returns true when the record is to be ignored: ciphertext of a
    /// connection whose plaintext comes from the TLS probes.
    pub(super) fn tls_gate(&mut self, head: &DataHeader, m: &Metrics, out: &mut Vec<Finished>) -> bool {
        let key = (head.hdr.tgid, head.fd);
        let plaintext = is_tls_syscall(head.syscall);
        match self.conns.get_mut(&key) {
            Some(c) if c.meta.tls => !plaintext,
            Some(c) => {
                if plaintext {
                    c.meta.tls = true;
                    // What was seen so far was handshake ciphertext: detect the protocol afresh.
                    if !matches!(c.l7, L7::Http(_)) {
                        c.l7 = L7::Undecided { chunks: 0 };
                    }
                }
                false
            }
            None if plaintext => {
                // Its KIND_CONN record was lost: track it without a tuple, as on_data does.
                self.make_room(head.hdr.ts_ns, m, out);
                m.connections_opened.inc();
                self.next_conn_id += 1;
                let mut c = Conn::first_data(self.next_conn_id, head);
                c.meta.tls = true;
                self.conns.insert(key, c);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Role;
    use waybill_common::{
        ConnEvent, DIR_READ, DIR_WRITE, EventHeader, KIND_CONN, KIND_DATA, ROLE_SERVER, SYS_READ, SYS_SSL_READ,
        SYS_SSL_WRITE, SYS_WRITE, Tuple,
    };

    use super::*;

    fn data(dir: u32, syscall: u32, ts: u64, bytes: &[u8]) -> DataHeader {
        DataHeader {
            hdr: EventHeader { kind: KIND_DATA, tgid: 1, tid: 2, _pad: 0, ts_ns: ts },
            fd: 3,
            dir,
            total: bytes.len() as u64,
            captured: bytes.len() as u32,
            syscall,
            sk: 0xabc,
        }
    }

    #[test]
    fn plaintext_after_handshake_ciphertext_is_parsed_and_later_ciphertext_ignored() {
        let m = Metrics::default();
        let mut t = ConnTable::new(16, u64::MAX);
        let mut out = Vec::new();
        let ev = ConnEvent {
            hdr: EventHeader { kind: KIND_CONN, tgid: 1, tid: 2, _pad: 0, ts_ns: 1 },
            fd: 3,
            role: ROLE_SERVER,
            sk: 0xabc,
            tuple: Tuple::default(),
        };
        t.on_conn(&ev, &m, &mut out);
        // Handshake ciphertext, enough to give up detection.
        for i in 0..4 {
            let b = b"\x16\x03\x01\x02\x00handshake";
            t.on_data(&data(if i % 2 == 0 { DIR_READ } else { DIR_WRITE }, SYS_READ, 10 + i, b), b, &m, &mut out);
        }
        let req = b"GET /secure HTTP/1.1\r\nHost: h\r\n\r\n";
        t.on_data(&data(DIR_READ, SYS_SSL_READ, 100, req), req, &m, &mut out);
        // Ciphertext of the same request must not disturb the parser.
        let junk = b"\x17\x03\x03\x00\x20garbage-garbage";
        t.on_data(&data(DIR_READ, SYS_READ, 101, junk), junk, &m, &mut out);
        t.on_data(&data(DIR_WRITE, SYS_WRITE, 102, junk), junk, &m, &mut out);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        t.on_data(&data(DIR_WRITE, SYS_SSL_WRITE, 250, resp), resp, &m, &mut out);
        let done: Vec<_> = out
            .iter()
            .filter_map(|f| match f {
                Finished::Http(meta, _, ex) => Some((meta, ex)),
                _ => None,
            })
            .collect();
        assert_eq!(done.len(), 1, "{out:?}");
        let (meta, ex) = done[0];
        assert!(meta.tls);
        assert_eq!(meta.role, Role::Server);
        assert_eq!(ex.request.path, "/secure");
        assert_eq!(ex.response.as_ref().unwrap().status, 200);
    }
}
