//! Building and sending ring-buffer records. Every record starts with `EventHeader`, kind first.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
};
use waybill_common::{CloseEvent, ConnEvent, EventHeader, KIND_CLOSE, KIND_CONN, LOST_RINGBUF_FULL, ProcEvent, Tuple};

use crate::{helpers::count_lost, maps::EVENTS};

/// Ring-buffer submit flags: no wake-up of the agent for each record (a wake-up costs the agent
/// far more than the record: ~20 µs of epoll round trip per request at moderate rates). The agent
/// drains the buffer on a short timer instead; once more than 1/16 of the buffer is waiting, the
/// record forces a wake-up so a burst never waits for the timer and never fills the buffer.
#[inline(always)]
pub fn submit_flags() -> u64 {
    let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= size / 16 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
pub fn header(kind: u32, tgid: u32, tid: u32) -> EventHeader {
    EventHeader { kind, tgid, tid, _pad: 0, ts_ns: unsafe { bpf_ktime_get_ns() } }
}

#[inline(always)]
pub fn emit_conn(tgid: u32, tid: u32, fd: u32, role: u32, sk: u64, t: &Tuple) {
    match EVENTS.reserve::<ConnEvent>(0) {
        Some(mut e) => {
            e.write(ConnEvent { hdr: header(KIND_CONN, tgid, tid), fd, role, sk, tuple: *t });
            e.submit(submit_flags());
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}

#[inline(always)]
pub fn emit_close(tgid: u32, tid: u32, fd: u32, sk: u64) {
    match EVENTS.reserve::<CloseEvent>(0) {
        Some(mut e) => {
            e.write(CloseEvent { hdr: header(KIND_CLOSE, tgid, tid), fd, _pad: 0, sk });
            e.submit(submit_flags());
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
            e.submit(submit_flags());
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}
