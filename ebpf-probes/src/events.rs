//! Building and sending ring-buffer records. Every record starts with `EventHeader`, kind first.

use aya_ebpf::helpers::{bpf_get_current_comm, bpf_ktime_get_ns};
use waybill_common::{CloseEvent, ConnEvent, EventHeader, KIND_CLOSE, KIND_CONN, LOST_RINGBUF_FULL, ProcEvent, Tuple};

use crate::{helpers::count_lost, maps::EVENTS};

#[inline(always)]
pub fn header(kind: u32, tgid: u32, tid: u32) -> EventHeader {
    EventHeader { kind, tgid, tid, _pad: 0, ts_ns: unsafe { bpf_ktime_get_ns() } }
}

#[inline(always)]
pub fn emit_conn(tgid: u32, tid: u32, fd: u32, role: u32, sk: u64, t: &Tuple) {
    match EVENTS.reserve::<ConnEvent>(0) {
        Some(mut e) => {
            e.write(ConnEvent { hdr: header(KIND_CONN, tgid, tid), fd, role, sk, tuple: *t });
            e.submit(0);
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}

#[inline(always)]
pub fn emit_close(tgid: u32, tid: u32, fd: u32, sk: u64) {
    match EVENTS.reserve::<CloseEvent>(0) {
        Some(mut e) => {
            e.write(CloseEvent { hdr: header(KIND_CLOSE, tgid, tid), fd, _pad: 0, sk });
            e.submit(0);
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}

#[inline(always)]
pub fn emit_proc(kind: u32, tgid: u32, tid: u32, other: u32) {
    match EVENTS.reserve::<ProcEvent>(0) {
        Some(mut e) => {
            let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
            e.write(ProcEvent { hdr: header(kind, tgid, tid), other, _pad: 0, comm });
            e.submit(0);
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}
