//! `waybill floor`: attaches one *empty* program (from the embedded object, `floor.rs` of the
//! probes) and keeps it attached until interrupted. `cargo xtask bench` times a process's
//! syscalls with and without it, which gives the cost of the hook itself on this kernel — the
//! floor any agent built on that hook pays, against which Waybill's own cost is read.

use std::num::NonZeroU32;

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, TracePoint, UProbe, uprobe::UProbeScope},
};

/// Which hook to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorHook {
    /// `raw_tracepoint/sys_exit`: every syscall exit on the host (the hook `waybill run` uses).
    RawSysExit,
    /// `tracepoint/syscalls/sys_enter_write`: one syscall's tracepoint.
    SyscallTracepoint,
    /// A uprobe on libc's `write` in `--pid`.
    Uprobe,
}

/// Loads the embedded object and attaches the empty program for `hook`. The returned object
/// holds the attachment; dropping it detaches.
pub fn attach(hook: FloorHook, pid: Option<u32>) -> Result<Ebpf, String> {
    let obj = super::attach::embedded_object();
    if obj.is_empty() {
        return Err("this binary was built without its eBPF object (build with `cargo xtask build`)".into());
    }
    let mut ebpf = EbpfLoader::new().load(obj).map_err(|e| format!("the eBPF object did not load: {e}"))?;
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    match hook {
        FloorHook::RawSysExit => {
            let p: &mut RawTracePoint =
                prog(&mut ebpf, "floor_raw_sys_exit")?.try_into().map_err(|e| err("program", &e))?;
            p.load().map_err(|e| err("load", &e))?;
            p.attach("sys_exit").map_err(|e| err("attach raw_tracepoint/sys_exit", &e))?;
        }
        FloorHook::SyscallTracepoint => {
            let p: &mut TracePoint =
                prog(&mut ebpf, "floor_tp_sys_enter_write")?.try_into().map_err(|e| err("program", &e))?;
            p.load().map_err(|e| err("load", &e))?;
            p.attach("syscalls", "sys_enter_write")
                .map_err(|e| err("attach tracepoint/syscalls/sys_enter_write", &e))?;
        }
        FloorHook::Uprobe => {
            let pid = pid
                .and_then(NonZeroU32::new)
                .ok_or("--hook uprobe needs --pid (the process whose write() to probe)")?;
            let p: &mut UProbe = prog(&mut ebpf, "floor_uprobe")?.try_into().map_err(|e| err("program", &e))?;
            p.load().map_err(|e| err("load", &e))?;
            p.attach("write", "libc", UProbeScope::OneProcess(pid))
                .map_err(|e| err(&format!("attach a uprobe to libc write() in pid {pid}"), &e))?;
        }
    }
    Ok(ebpf)
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, String> {
    ebpf.program_mut(name).ok_or_else(|| format!("program {name} missing from the eBPF object"))
}
