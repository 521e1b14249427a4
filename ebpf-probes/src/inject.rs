//! Trace-context propagation across hosts: the kernel decides trace and span ids and inserts a
//! W3C `traceparent` header into outgoing plaintext HTTP/1.x requests of traced processes.
//!
//! | operation | hook | notes |
//! |-----------|------|-------|
//! | decide a server request's ids | `sys_exit_read*` (syscalls.rs → [`on_server_read`]) | trace id from the request's own `traceparent` (bounded scan) or random; SERVER span id random; kept per thread in `THREAD_CTX` and sent in the read's own record (`KIND_DATA_CTX`, a `CtxTrailer` after the payload) |
//! | end a thread's current request | `sys_exit_write*` → [`on_server_write`] | a response head written on that connection |
//! | select sockets | `sys_enter_connect` → [`on_connect`], `sock_ops` [`sock_ops_inject`] | destination + age of a traced process's connect(); sock_ops may run outside the process |
//! | request boundaries | sk_msg + `sys_exit_read*` → [`on_client_read`] | a request may start only after the previous one's final response was read |
//! | insert the header | `sk_msg` [`sk_msg_inject`] | runs in the sender's send call: looks up the sending thread's context, adds a CLIENT span id, `bpf_msg_push_data`, reports `KIND_INJECT` |
//!
//! Fallbacks: without cgroup2 or when sk_msg cannot attach (EBUSY: the socket belongs to another
//! sockmap user), user space leaves `INJECT_ACTIVE` at 0 and nothing here runs; spans are then
//! linked by the user-space rules only. Connections opened before attach are never in the hash.
//!
//! Verifier notes: the head scan keeps its results in map memory (one state at every loop exit),
//! hex formatting is branchless, and packet pointers are re-read after `bpf_msg_push_data`.

use aya_ebpf::{
    bindings::{BPF_ANY, sk_action::SK_PASS},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_msg_pull_data, bpf_probe_read_kernel_buf},
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use waybill_common::*;

use crate::{
    helpers::{count_inject, current, opaque, sock_key, target_flags},
    maps::{
        EVENTS, HEAD_BUF, HeadScan, INJECT_ACTIVE, INJECT_SOCKS, MSG_AWAITING_RESPONSE, MSG_BOUNDARY, MSG_NOT_HTTP,
        MSG_STATE, PENDING_CONNECT, SOCKS, THREAD_CTX, ThreadCtx,
    },
};

/// A connect() older than this is not matched to a newly established socket.
const CONNECT_FRESH_NS: u64 = 5_000_000_000;
const MASK: usize = HEAD_SCAN - 1;
const LINE: usize = TRACEPARENT_LINE as usize;

#[inline(always)]
pub fn active() -> bool {
    INJECT_ACTIVE.get(0).is_some_and(|v| *v != 0)
}

#[inline(always)]
fn rnd64() -> u64 {
    // SAFETY: no preconditions.
    let (a, b) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let v = ((a as u64) << 32) | b as u64;
    // An all-zero id is invalid in W3C trace context.
    v | ((v == 0) as u64)
}

#[inline(always)]
const fn word(b: &[u8]) -> u64 {
    let mut v = 0u64;
    let mut i = 0;
    while i < b.len() {
        v |= (b[i] as u64) << (8 * i);
        i += 1;
    }
    v
}

#[inline(always)]
const fn mask(n: usize) -> u64 {
    if n >= 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 }
}

/// Does the 8-byte little-endian word `w` start with `pat`? (integer compares: no memcmp)
#[inline(always)]
fn starts(w: u64, pat: &[u8]) -> bool {
    w & mask(pat.len()) == word(pat)
}

/// Length of `METHOD SP` when `p` starts with a known method, a space and `/`; else 0.
/// `p` points at least 16 readable bytes of map memory; `n` of them are valid.
#[inline(always)]
pub unsafe fn method_len(p: *const u8, n: u32) -> u32 {
    if n < 16 {
        return 0;
    }
    // SAFETY: 16 readable bytes (caller).
    let w = u64::from_le_bytes(unsafe { core::ptr::read_unaligned(p as *const [u8; 8]) });
    let m: usize = if starts(w, b"GET ") || starts(w, b"PUT ") {
        4
    } else if starts(w, b"POST ") || starts(w, b"HEAD ") {
        5
    } else if starts(w, b"PATCH ") || starts(w, b"TRACE ") {
        6
    } else if starts(w, b"DELETE ") {
        7
    } else if starts(w, b"OPTIONS ") {
        8
    } else {
        return 0;
    };
    // SAFETY: m < 16.
    if unsafe { *p.add(m) } == b'/' { m as u32 } else { 0 }
}

/// Scans the first `n` (≤ HEAD_SCAN) bytes at `p` for the request line end, the head end and a
/// `traceparent:` line, writing the offsets into `out` (map memory). `p` has HEAD_SCAN + 16
/// readable bytes.
#[inline(always)]
unsafe fn scan_head(p: *const u8, n: u32, out: *mut HeadScan) {
    // SAFETY: `out` is map memory owned by this CPU.
    unsafe {
        core::ptr::write_volatile(out, HeadScan { line_end: 0, head_end: 0, tp: 0, n });
    }
    let mut i: usize = 0;
    while i < HEAD_SCAN {
        // SAFETY: as above. A fresh load each time: comparing it does not narrow a live register.
        let n = unsafe { core::ptr::read_volatile(&(*out).n) } as usize;
        if i + 4 > n {
            break;
        }
        // SAFETY: i + 15 < HEAD_SCAN + 16.
        let w: [u8; 16] = unsafe { core::ptr::read_unaligned(p.add(i) as *const [u8; 16]) };
        if w[0] == b'\r' && w[1] == b'\n' {
            // SAFETY: as above.
            unsafe {
                if core::ptr::read_volatile(&(*out).line_end) == 0 {
                    core::ptr::write_volatile(&mut (*out).line_end, (i + 2) as u32);
                }
            }
            if w[2] == b'\r' && w[3] == b'\n' {
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(&mut (*out).head_end, (i + 4) as u32) };
                break;
            }
            // "traceparent:" at the next line start, ASCII case-insensitive, branchless.
            let pat = b"traceparent:";
            let mut d: u8 = 0;
            let mut k = 0;
            while k < 12 {
                d |= (w[2 + k] | 0x20) ^ pat[k];
                k += 1;
            }
            if d == 0 {
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(&mut (*out).tp, (i + 2) as u32) };
                break;
            }
        }
        i += 1;
    }
}

/// 1 when `c` is an ASCII hex digit, branchless.
#[inline(always)]
fn is_hex(c: u8) -> u32 {
    let dig = (((c.wrapping_sub(b'0')) as i32 - 10) >> 31) & 1;
    let alp = ((((c | 0x20).wrapping_sub(b'a')) as i32 - 6) >> 31) & 1;
    (dig | alp) as u32
}

#[inline(always)]
fn hex_val(c: u8) -> u8 {
    (c & 0xf) + 9 * (c >> 6)
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>` at `p` (after `traceparent:` and optional spaces).
/// Returns (trace id, parent id, flags byte) or None when malformed. Reads in place (the BPF
/// stack is small) and validates without data-dependent branches.
#[inline(always)]
unsafe fn parse_traceparent(p: *const u8) -> Option<([u8; 16], [u8; 8], u8)> {
    // SAFETY (whole function): the caller guarantees 64 readable bytes at p.
    let c0 = unsafe { *p };
    let c1 = unsafe { *p.add(1) };
    let skip = if c0 != b' ' {
        0
    } else if c1 != b' ' {
        1
    } else {
        2
    };
    let q = unsafe { p.add(skip) };
    let at = |i: usize| unsafe { *q.add(i) };
    let mut ok = 1u32;
    ok &= (at(0) == b'0') as u32;
    ok &= (at(1) == b'0') as u32;
    ok &= (at(2) == b'-') as u32;
    ok &= (at(35) == b'-') as u32;
    ok &= (at(52) == b'-') as u32;
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    let mut j = 0;
    while j < 16 {
        let (h, l) = (at(3 + 2 * j), at(4 + 2 * j));
        ok &= is_hex(h) & is_hex(l);
        trace[j] = (hex_val(h) << 4) | hex_val(l);
        j += 1;
    }
    let mut j = 0;
    while j < 8 {
        let (h, l) = (at(36 + 2 * j), at(37 + 2 * j));
        ok &= is_hex(h) & is_hex(l);
        span[j] = (hex_val(h) << 4) | hex_val(l);
        j += 1;
    }
    let (h, l) = (at(53), at(54));
    ok &= is_hex(h) & is_hex(l);
    let flags = (hex_val(h) << 4) | hex_val(l);
    let t = u64::from_ne_bytes([trace[0], trace[1], trace[2], trace[3], trace[4], trace[5], trace[6], trace[7]])
        | u64::from_ne_bytes([trace[8], trace[9], trace[10], trace[11], trace[12], trace[13], trace[14], trace[15]]);
    if ok == 0 || t == 0 || u64::from_ne_bytes(span) == 0 {
        return None;
    }
    Some((trace, span, flags))
}

/// Hook of `sys_exit_*` data syscalls, with the record already assembled in `ev` (`SCRATCH`).
/// Everything is read back from map memory so that the verifier checks the scans below once,
/// not once per path through the copy code before.
#[inline(always)]
pub fn on_data(ev: *mut DataEvent, pid_tgid: u64, role: u32) {
    // SAFETY: `ev` is this CPU's scratch record; its data array is 2·MAX_CAPTURE bytes.
    let (h, p) = unsafe { (core::ptr::read_volatile(&(*ev).head), (*ev).data.as_ptr()) };
    let c = h.captured;
    if c == 0 {
        return;
    }
    if h.dir == DIR_READ {
        if role == ROLE_CLIENT {
            on_client_read(p, c, h.sk);
        } else {
            on_server_read(ev, c, pid_tgid, h.sk, h.hdr.ts_ns, sock_key(h.hdr.tgid, h.fd));
        }
    } else if role != ROLE_CLIENT {
        on_server_write(p, c, pid_tgid, h.sk, sock_key(h.hdr.tgid, h.fd));
    }
}

/// A traced process read bytes on a socket that is not its client side: if they start an HTTP
/// request, decide the request's ids and make them the thread's current context. Called from
/// `sys_exit_read*` with the record assembled in `ev` (`SCRATCH`: `captured` payload bytes, the
/// data array ≥ HEAD_SCAN + 64 readable) before it is sent. The ids ride in the same record: a
/// [`CtxTrailer`] after the payload and the kind `KIND_DATA_CTX` (no second reservation).
#[inline(always)]
fn on_server_read(ev: *mut DataEvent, captured: u32, pid_tgid: u64, sk: u64, ts: u64, sock: u64) {
    // SAFETY: `ev` is this CPU's scratch record.
    let p = unsafe { (*ev).data.as_ptr() };
    // SAFETY: p has ≥ 16 readable bytes; `captured` says how many are valid.
    if unsafe { method_len(p, captured) } == 0 {
        return;
    }
    let Some(hb) = HEAD_BUF.get_ptr_mut(0) else { return };
    let n = if captured > HEAD_SCAN as u32 { HEAD_SCAN as u32 } else { captured };
    // SAFETY: hb is this CPU's scratch; p has HEAD_SCAN + 16 readable bytes.
    unsafe { scan_head(p, n, &mut (*hb).tp_scan) };
    // SAFETY: read back from map memory (an unknown scalar for the verifier, bounded below).
    let tp = unsafe { core::ptr::read_volatile(&(*hb).tp_scan.tp) } as usize & MASK;
    let mut ctx = ThreadCtx { trace_id: [0; 16], span_id: [0; 8], sk, ts_ns: ts, flags: CTX_SAMPLED, _pad: 0 };
    let mut parent = [0u8; 8];
    let mut parsed = None;
    if tp != 0 {
        // SAFETY: tp + 12 + 58 < HEAD_SCAN + 64.
        parsed = unsafe { parse_traceparent(p.add(tp + 12)) };
    }
    match parsed {
        Some((trace, span, flags)) => {
            ctx.trace_id = trace;
            parent = span;
            ctx.flags = CTX_FROM_HEADER | if flags & 1 != 0 { CTX_SAMPLED } else { 0 };
        }
        None => {
            ctx.trace_id[..8].copy_from_slice(&rnd64().to_ne_bytes());
            ctx.trace_id[8..].copy_from_slice(&rnd64().to_ne_bytes());
        }
    }
    ctx.span_id = rnd64().to_ne_bytes();
    // Written in place when the thread / connection already has an entry (a keep-alive server
    // reuses both for every request): an LRU map update allocates a new element and frees the old.
    match THREAD_CTX.get_ptr_mut(&pid_tgid) {
        // SAFETY: a map value of this type; a concurrent reader sees the old or the new context.
        Some(c) => unsafe { *c = ctx },
        None => {
            let _ = THREAD_CTX.insert(&pid_tgid, &ctx, BPF_ANY as u64);
        }
    }
    // The connection's socket-cache entry, which the first half of this syscall's hook has just
    // looked up (a warm line): it names the owner for a response written by another thread.
    if let Some(s) = SOCKS.get_ptr_mut(&sock) {
        // SAFETY: a map value of this type.
        unsafe { (*s).owner = pid_tgid };
    }
    // The trailer sits at the first 8-byte boundary after the payload (`ctx_trailer_offset`).
    // `opaque` + clamp: the verifier needs the offset's bound (captured ≤ MAX_CAPTURE, and the
    // data array is 2·MAX_CAPTURE long).
    let mut off = opaque(ctx_trailer_offset(captured) as u64);
    if off > MAX_CAPTURE as u64 {
        off = MAX_CAPTURE as u64;
    }
    let trailer =
        CtxTrailer { flags: ctx.flags, _pad: 0, trace_id: ctx.trace_id, span_id: ctx.span_id, parent_span_id: parent };
    // SAFETY: off + 40 ≤ MAX_CAPTURE + 40 < 2·MAX_CAPTURE bytes of this CPU's scratch record.
    unsafe {
        core::ptr::write_unaligned((*ev).data.as_mut_ptr().add(off as usize).cast::<CtxTrailer>(), trailer);
        core::ptr::write_volatile(&mut (*ev).head.hdr.kind, KIND_DATA_CTX);
    }
}

/// A traced process wrote on a server connection: a response head ends the current request of
/// the thread that read it.
#[inline(always)]
fn on_server_write(p: *const u8, captured: u32, pid_tgid: u64, sk: u64, sock: u64) {
    if captured < 8 {
        return;
    }
    // SAFETY: ≥ 8 readable bytes.
    let w = u64::from_le_bytes(unsafe { core::ptr::read_unaligned(p as *const [u8; 8]) });
    if !starts(w, b"HTTP/1.") {
        return;
    }
    // Both entries stay for the connection's and the thread's next request; "none" is written in
    // place (context sk 0, owner 0) instead of deleting and re-inserting them per request.
    // Usually the thread that read the request writes the response: one lookup. A stale owner
    // left by that path is harmless, the context's `sk` is checked before it is ended.
    if let Some(c) = THREAD_CTX.get_ptr_mut(&pid_tgid) {
        // SAFETY: a map value of this type.
        unsafe {
            if (*c).sk == sk {
                (*c).sk = 0;
                return;
            }
        }
    }
    let Some(s) = SOCKS.get_ptr_mut(&sock) else { return };
    // SAFETY: a map value of this type.
    let owner = unsafe { core::ptr::replace(&mut (*s).owner, 0) };
    if owner == 0 {
        return;
    }
    if let Some(c) = THREAD_CTX.get_ptr_mut(&owner) {
        // SAFETY: as above.
        unsafe {
            if (*c).sk == sk {
                (*c).sk = 0;
            }
        }
    }
}

/// A traced process read on a client connection: a final (non-1xx) response head means the next
/// message it sends may start a new request.
#[inline(always)]
fn on_client_read(p: *const u8, captured: u32, sk: u64) {
    if captured < 12 {
        return;
    }
    // SAFETY: ≥ 12 readable bytes.
    let w = u64::from_le_bytes(unsafe { core::ptr::read_unaligned(p as *const [u8; 8]) });
    // SAFETY: as above.
    if !starts(w, b"HTTP/1.") || unsafe { *p.add(9) } == b'1' {
        return;
    }
    let mut t = Tuple::default();
    if crate::helpers::sk_tuple(sk, &mut t).is_none() {
        return;
    }
    if let Some(st) = MSG_STATE.get_ptr_mut(&t) {
        // SAFETY: map value of this key.
        unsafe { *st = MSG_BOUNDARY };
    }
}

/// `sys_enter_connect` of a traced process: remember the destination (UAPI sockaddr layout).
#[inline(always)]
pub fn on_connect(addr: u64, len: u64) {
    if addr == 0 || len < 8 {
        return;
    }
    // SAFETY: user memory read, fault-safe.
    let Ok(fam) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user(addr as *const u16) }) else { return };
    let Ok(port) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user((addr + 2) as *const u16) }) else { return };
    let mut k = ConnectKey { family: fam, port: u16::from_be(port), _pad: 0, addr: [0; 16] };
    if fam == AF_INET {
        let Ok(a) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user((addr + 4) as *const [u8; 4]) }) else { return };
        k.addr[..4].copy_from_slice(&a);
    } else if fam == AF_INET6 && len >= 24 {
        let Ok(a) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user((addr + 8) as *const [u8; 16]) }) else {
            return;
        };
        k.addr = a;
    } else {
        return;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = PENDING_CONNECT.insert(&k, &now, BPF_ANY as u64);
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // The words hold the address in network order: their memory bytes are the address.
        let b = w[i].to_ne_bytes();
        out[4 * i] = b[0];
        out[4 * i + 1] = b[1];
        out[4 * i + 2] = b[2];
        out[4 * i + 3] = b[3];
        i += 1;
    }
    out
}

/// sock_ops on the cgroup2 root: an outgoing connection became established; if a traced process
/// recently connect()ed to that destination, hand the socket to the sk_msg program.
#[sock_ops]
pub fn sock_ops_inject(ctx: SockOpsContext) -> u32 {
    // BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
    if ctx.op() != 4 || !active() {
        return 1;
    }
    let family = ctx.family() as u16;
    let mut t = Tuple {
        family,
        lport: ctx.local_port() as u16,
        rport: u32::from_be(ctx.remote_port()) as u16,
        _pad: 0,
        laddr: [0; 16],
        raddr: [0; 16],
    };
    if family == AF_INET {
        t.laddr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
        t.raddr[..4].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
    } else if family == AF_INET6 {
        t.laddr = words_to_bytes(ctx.local_ip6());
        t.raddr = words_to_bytes(ctx.remote_ip6());
    } else {
        return 1;
    }
    let k = ConnectKey { family, port: t.rport, _pad: 0, addr: t.raddr };
    // SAFETY: copied out.
    let Some(when) = (unsafe { PENDING_CONNECT.get(&k) }).copied() else { return 1 };
    // SAFETY: no preconditions.
    if unsafe { bpf_ktime_get_ns() }.saturating_sub(when) > CONNECT_FRESH_NS {
        return 1;
    }
    let _ = MSG_STATE.remove(&t);
    // SAFETY: `ctx.ops` is the kernel's bpf_sock_ops for this callback.
    match INJECT_SOCKS.update(&mut t, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => count_inject(INJ_SOCK_ADDED),
        Err(_) => count_inject(INJ_SOCK_ADD_FAILED),
    }
    1
}

#[inline(always)]
fn hex16(out: &mut [u8; 80], off: usize, b: &[u8]) {
    let mut i = 0;
    while i < b.len() {
        let hi = b[i] >> 4;
        let lo = b[i] & 0xf;
        // Branchless nibble → ASCII: +39 turns 10..15 into 'a'..'f'.
        out[off + 2 * i] = b'0' + hi + (((hi + 6) >> 4) & 1) * 39;
        out[off + 2 * i + 1] = b'0' + lo + (((lo + 6) >> 4) & 1) * 39;
        i += 1;
    }
}

/// sk_msg on `INJECT_SOCKS`: runs inside the sender's sendmsg for every message on a selected
/// socket. Always passes the message; inserts `traceparent` only at a known request start.
#[sk_msg]
pub fn sk_msg_inject(ctx: SkMsgContext) -> u32 {
    let r = try_inject(&ctx);
    count_inject(r);
    SK_PASS
}

#[inline(always)]
fn try_inject(ctx: &SkMsgContext) -> u32 {
    let (tgid, tid, pid_tgid) = current();
    let Some(flags) = target_flags(tgid) else {
        return INJ_NOT_TARGET;
    };
    if flags & TARGET_NO_INJECT != 0 {
        return INJ_DISABLED;
    }
    let md = ctx.msg;
    // SAFETY: plain context field reads (aya has no accessors for these).
    let (family, lport, rport, lip4, rip4, lip6, rip6) = unsafe {
        (
            (*md).family as u16,
            (*md).local_port as u16,
            u32::from_be((*md).remote_port) as u16,
            (*md).local_ip4,
            (*md).remote_ip4,
            (*md).local_ip6,
            (*md).remote_ip6,
        )
    };
    let mut key = Tuple { family, lport, rport, _pad: 0, laddr: [0; 16], raddr: [0; 16] };
    if family == AF_INET {
        key.laddr[..4].copy_from_slice(&lip4.to_ne_bytes());
        key.raddr[..4].copy_from_slice(&rip4.to_ne_bytes());
    } else {
        key.laddr = words_to_bytes(lip6);
        key.raddr = words_to_bytes(rip6);
    }
    // SAFETY: copied out.
    let state = unsafe { MSG_STATE.get(&key) }.copied();
    match state {
        Some(MSG_NOT_HTTP) => return INJ_NOT_HTTP,
        Some(MSG_AWAITING_RESPONSE) => return INJ_NOT_AT_BOUNDARY,
        _ => {}
    }
    let size = ctx.size();
    let want = if size > HEAD_SCAN as u32 { HEAD_SCAN as u32 } else { size };
    if want < 16 {
        return INJ_NOT_HTTP;
    }
    // SAFETY: md is the program's context.
    if unsafe { bpf_msg_pull_data(md, 0, want, 0) } != 0 {
        return INJ_HELPER_FAILED;
    }
    let Some(hb) = HEAD_BUF.get_ptr_mut(0) else { return INJ_HELPER_FAILED };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let mut n = data_end.saturating_sub(data);
    if n > want as usize {
        n = want as usize;
    }
    if n < 16 {
        return INJ_NOT_HTTP;
    }
    // `opaque`: LLVM would drop the mask as redundant after the clamp above, and the 6.1 verifier
    // then loses the upper bound of `n` (R2 min value is negative at the read below).
    let n = opaque(n as u64) as usize & (2 * HEAD_SCAN - 1);
    // SAFETY: copy n ≤ HEAD_SCAN bytes of the linear message head into this CPU's buffer.
    let buf = unsafe { &mut (*hb).data };
    if unsafe { bpf_probe_read_kernel_buf(data as *const u8, &mut buf[..n]) }.is_err() {
        return INJ_HELPER_FAILED;
    }
    let p = buf.as_ptr();
    // SAFETY: buf has 2·HEAD_SCAN bytes.
    if unsafe { method_len(p, n as u32) } == 0 {
        if state.is_none() {
            let _ = MSG_STATE.insert(&key, &MSG_NOT_HTTP, BPF_ANY as u64);
        }
        return INJ_NOT_HTTP;
    }
    // From here on the message starts a request: whatever happens, the next one must wait for
    // this one's response.
    let _ = MSG_STATE.insert(&key, &MSG_AWAITING_RESPONSE, BPF_ANY as u64);
    // SAFETY: as above.
    unsafe { scan_head(p, n as u32, &mut (*hb).scan) };
    // SAFETY: read back from map memory.
    let (line_end, head_end, tp) = unsafe {
        (
            core::ptr::read_volatile(&(*hb).scan.line_end) as usize & MASK,
            core::ptr::read_volatile(&(*hb).scan.head_end),
            core::ptr::read_volatile(&(*hb).scan.tp),
        )
    };
    if tp != 0 {
        // (A match whose 12 bytes run past the valid data is still treated as present: safe side.)
        return INJ_HAS_TRACEPARENT;
    }
    if head_end == 0 || line_end < 16 {
        return INJ_HEAD_TOO_LONG;
    }
    // The request line must end with " HTTP/1.x".
    // SAFETY: line_end - 11 ≥ 5 and < HEAD_SCAN.
    let v = u64::from_le_bytes(unsafe { core::ptr::read_unaligned(p.add(line_end - 11) as *const [u8; 8]) });
    if !starts(v, b" HTTP/1.") {
        return INJ_NOT_HTTP;
    }

    // The context: the server request this thread serves, or a new trace.
    let mut flags = CTX_SAMPLED;
    let mut trace = [0u8; 16];
    let mut parent = [0u8; 8];
    // SAFETY: copied out.
    match unsafe { THREAD_CTX.get(&pid_tgid) }.copied() {
        Some(c) if c.sk != 0 => {
            trace = c.trace_id;
            parent = c.span_id;
            flags = (c.flags & CTX_SAMPLED) | CTX_HAS_PARENT;
        }
        _ => {
            trace[..8].copy_from_slice(&rnd64().to_ne_bytes());
            trace[8..].copy_from_slice(&rnd64().to_ne_bytes());
        }
    }
    let span = rnd64().to_ne_bytes();
    // SAFETY: this CPU's buffer.
    let line = unsafe { &mut (*hb).line };
    line[..16].copy_from_slice(b"traceparent: 00-");
    hex16(line, 16, &trace);
    line[48] = b'-';
    hex16(line, 49, &span);
    line[65] = b'-';
    line[66] = b'0';
    line[67] = if flags & CTX_SAMPLED != 0 { b'1' } else { b'0' };
    line[68] = b'\r';
    line[69] = b'\n';

    // Reserve the report first: an injection user space does not hear about is not made.
    let Some(mut rec) = EVENTS.reserve::<InjectEvent>(0) else { return INJ_RINGBUF_FULL };
    let pos = line_end as u32;
    if ctx.push_data(pos, TRACEPARENT_LINE, 0).is_err() {
        rec.discard(0);
        return INJ_HELPER_FAILED;
    }
    // SAFETY: md is the context. push_data invalidated the packet pointers: pull and re-read.
    if unsafe { bpf_msg_pull_data(md, pos, pos + TRACEPARENT_LINE, 0) } != 0 {
        let _ = ctx.pop_data(pos, TRACEPARENT_LINE, 0);
        rec.discard(0);
        return INJ_HELPER_FAILED;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + LINE > data_end {
        let _ = ctx.pop_data(pos, TRACEPARENT_LINE, 0);
        rec.discard(0);
        return INJ_HELPER_FAILED;
    }
    let dst = data as *mut u8;
    let mut k = 0;
    while k < LINE {
        // SAFETY: data + LINE ≤ data_end checked above.
        unsafe { *dst.add(k) = line[k] };
        k += 1;
    }
    rec.write(InjectEvent {
        hdr: EventHeader {
            kind: KIND_INJECT,
            tgid,
            tid,
            _pad: 0,
            // SAFETY: no preconditions.
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        tuple: key,
        flags,
        size,
        trace_id: trace,
        span_id: span,
        parent_span_id: parent,
    });
    rec.submit(crate::events::submit_flags(core::mem::size_of::<InjectEvent>()));
    INJ_INJECTED
}
