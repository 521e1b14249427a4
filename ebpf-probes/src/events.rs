//! Building and sending ring-buffer records. Every record starts with `EventHeader`, kind first.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
};
use waybill_common::{
    CloseEvent, ConnEvent, EventHeader, KIND_CLOSE, KIND_CONN, LOST_RINGBUF_FULL, ProcEvent, Tuple, ringbuf_footprint,
    ringbuf_wake_due,
};

use crate::{
    helpers::count_lost,
    maps::{AGENT_SLEEPING, EVENTS},
};

/// Ring-buffer submit flags for a record of `size` bytes, `waiting` bytes already in the buffer
/// before it: no wake-up of the agent for each record (a wake-up costs the agent far more than the
/// record: ~20 µs of epoll round trip per request at moderate rates). The agent drains the buffer
/// on a short timer instead; the record whose end carries the waiting data across a multiple of
/// the wake step (an eighth of the buffer, `RING_WAKE_STEPS`) forces a wake-up, so a burst never waits for the timer and never fills the
/// buffer; and once half the buffer waits, every record does (the agent is behind: a wake-up per
/// record is cheaper than a lost one).
///
/// Only the crossing wakes below half: the kernel's wake-up is an irq_work, a self-IPI (an MSR
/// write, a VM exit under a hypervisor), and forcing it on every record while the agent is behind
/// cost the traced thread ~3 % of its CPU at nginx saturation and PostgreSQL a third of its
/// throughput. The crossing is judged on the record's footprint in the buffer (8-byte header,
/// 8-byte alignment): judged on `size` alone, a step of the buffer — a multiple of every
/// footprint that divides it — always fell on a record's header, and no record ever woke the
/// agent. A crossing missed by two CPUs racing is caught by the next step or the timer.
///
/// An agent that found the buffer empty and sleeps with no drain timer (idle) set
/// `AGENT_SLEEPING`: the first record after that wakes it and clears the flag, so an idle agent
/// costs no timer wake-ups and still sees the first record at once. (Two CPUs may both see the
/// flag: one extra wake-up.)
#[inline(always)]
pub fn wake_flags(waiting: u64, size: u64) -> u64 {
    if let Some(sleeping) = AGENT_SLEEPING.get_ptr_mut(0) {
        // SAFETY: a valid pointer into the array's only entry, from the lookup just above.
        unsafe {
            if *sleeping != 0 {
                *sleeping = 0;
                return BPF_RB_FORCE_WAKEUP as u64;
            }
        }
    }
    if ringbuf_wake_due(waiting, size, EVENTS.query(BPF_RB_RING_SIZE as u64)) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Flags for a record that is about to be written with `output` (not yet in the buffer).
#[inline(always)]
pub fn output_flags(size: u64) -> u64 {
    wake_flags(EVENTS.query(BPF_RB_AVAIL_DATA as u64), size)
}

/// Flags for a reserved record of `size` bytes (already counted in the buffer's waiting data).
#[inline(always)]
pub fn submit_flags(size: usize) -> u64 {
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    wake_flags(waiting.saturating_sub(ringbuf_footprint(size as u64)), size as u64)
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
            e.submit(submit_flags(core::mem::size_of::<ConnEvent>()));
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}

#[inline(always)]
pub fn emit_close(tgid: u32, tid: u32, fd: u32, sk: u64) {
    match EVENTS.reserve::<CloseEvent>(0) {
        Some(mut e) => {
            e.write(CloseEvent { hdr: header(KIND_CLOSE, tgid, tid), fd, _pad: 0, sk });
            e.submit(submit_flags(core::mem::size_of::<CloseEvent>()));
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
            e.submit(submit_flags(core::mem::size_of::<ProcEvent>()));
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}
