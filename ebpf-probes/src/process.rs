//! Process lifecycle: exec (for `--exe` selection), fork of traced processes (children are traced
//! from their first instruction), exit (clean-up).
//!
//! | operation | hook                        | notes                                              |
//! |-----------|-----------------------------|----------------------------------------------------|
//! | exec      | `sched/sched_process_exec`  | sent only when user space selects by executable;   |
//! |           |                             | an `--exe` comm is added to TARGETS right here     |
//! | fork      | `task/task_newtask`         | threads (CLONE_THREAD) are ignored; field offsets  |
//! |           |                             | come from tracefs at load time                     |
//! | exit      | `sched/sched_process_exit`  | the main thread's exit ends the process's tracing  |

use aya_ebpf::{helpers::bpf_get_current_comm, macros::tracepoint, programs::TracePointContext};
use waybill_common::{KIND_PROC_EXEC, KIND_PROC_EXIT, KIND_PROC_FORK, TARGET_TRACED};

use crate::{
    events::emit_proc,
    helpers::{config, current, is_target, target_flags, target_insert, target_remove, tp_offsets},
    maps::WATCH_COMMS,
};

const CLONE_THREAD: u64 = 0x0001_0000;

#[tracepoint]
pub fn tp_sched_process_exec(_ctx: TracePointContext) -> u32 {
    if config().watch_exec == 0 {
        return 0;
    }
    let (tgid, tid, _) = current();
    // A short-lived program (psql -c, curl) may be done before user space could add it: when
    // its name is an `--exe` name, trace it now. User space confirms (or excludes) it.
    if let Ok(comm) = bpf_get_current_comm() {
        // SAFETY: presence test only.
        if unsafe { WATCH_COMMS.get(&comm) }.is_some() && !is_target(tgid) {
            let _ = target_insert(tgid, TARGET_TRACED);
        }
    }
    emit_proc(KIND_PROC_EXEC, tgid, tid, 0);
    0
}

#[tracepoint]
pub fn tp_task_newtask(ctx: TracePointContext) -> u32 {
    let (tgid, tid, _) = current();
    let Some(parent_flags) = target_flags(tgid) else {
        return 0;
    };
    let o = tp_offsets();
    if o.newtask_pid == 0 {
        return 0;
    }
    let flags: u64 = if o.newtask_clone_flags_size == 8 {
        unsafe { ctx.read_at::<u64>(o.newtask_clone_flags as usize) }.unwrap_or(0)
    } else {
        unsafe { ctx.read_at::<u32>(o.newtask_clone_flags as usize) }.unwrap_or(0) as u64
    };
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let Ok(child) = (unsafe { ctx.read_at::<u32>(o.newtask_pid as usize) }) else {
        return 0;
    };
    // The child inherits the parent's policy bits (e.g. no injection).
    let _ = target_insert(child, parent_flags);
    emit_proc(KIND_PROC_FORK, child, child, tgid);
    let _ = tid;
    0
}

#[tracepoint]
pub fn tp_sched_process_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid, _) = current();
    if tgid != tid || !is_target(tgid) {
        return 0;
    }
    target_remove(tgid);
    emit_proc(KIND_PROC_EXIT, tgid, tid, 0);
    0
}
