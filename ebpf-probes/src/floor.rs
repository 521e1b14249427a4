//! Empty programs for the per-hook floor of `cargo xtask bench` (`waybill floor`): attached on
//! their own, they measure what the hook itself costs on this kernel (the tracepoint or uprobe
//! machinery and one empty program run), apart from any work of Waybill's. Never attached by
//! `waybill run`.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint, uprobe},
    programs::{ProbeContext, RawTracePointContext, TracePointContext},
};

/// The hook `waybill run` uses for socket data: the exit of every syscall on the host.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn floor_raw_sys_exit(_ctx: RawTracePointContext) -> i32 {
    0
}

/// A per-syscall tracepoint (`syscalls/sys_enter_write`), the hook tracepoint-only agents use.
#[tracepoint]
pub fn floor_tp_sys_enter_write(_ctx: TracePointContext) -> u32 {
    0
}

/// A uprobe (on libc's `write` in one process): what a library-function hook costs here.
#[uprobe]
pub fn floor_uprobe(_ctx: ProbeContext) -> u32 {
    0
}
