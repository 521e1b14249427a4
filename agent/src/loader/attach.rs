//! Loads the embedded eBPF object with this kernel's offsets and attaches the programs.
//!
//! Hook choice: the syscall tracepoints carry the data path on every kernel (they exist since
//! 4.17, work under lockdown and need no kprobes): one raw tracepoint program on `sys_exit` for
//! the data syscalls and accept/connect/close/listen, the `sys_enter_connect` tracepoint (injection must see the
//! destination before the handshake). Where kprobes or fentry are available they could serve as cheaper
//! accelerators; `features.rs` probes them and the choice is logged.

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray, RingBuf, SockHash},
    programs::{RawTracePoint, SkMsg, SockOps, TracePoint, links::CgroupAttachMode},
};
use thiserror::Error;
use waybill_common::{
    INJ_COUNTERS, KernelOffsets, LOST_COUNTERS, ProbeConfig, SYSCALL_TABLE, SyscallRegs, TracepointOffsets, Tuple,
};

use super::{btf, tracefs};

/// The eBPF object built by `cargo xtask build` (empty when the agent was built without it).
static PROBES_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/waybill-probes.o"));

/// The embedded eBPF object.
pub fn embedded_object() -> &'static [u8] {
    PROBES_OBJ
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "this waybill binary was built without its eBPF object: build it with `cargo xtask build --release` \
         (plain `cargo build` cannot build the kernel programs)"
    )]
    NoObject,
    #[error("{0}")]
    Mount(String),
    #[error("{0}")]
    Btf(#[from] btf::BtfError),
    #[error("{0}")]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(
        "loading the eBPF programs failed: {0}. Waybill needs root (or CAP_BPF + CAP_PERFMON + CAP_SYS_RESOURCE) \
         and a kernel ≥ 5.8 with BTF; run `waybill check` to see what this kernel allows"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {program} was rejected: {source}. Run `waybill check` and report this kernel version")]
    Program {
        program: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {0} is missing from the object (build mismatch: rebuild with `cargo xtask build`)")]
    MissingMap(&'static str),
    #[error(
        "could not map the eBPF array TARGET_BYTES into memory: {0}. Waybill needs a kernel ≥ 5.8 \
         (BPF_F_MMAPABLE); run `waybill check`"
    )]
    TargetBytes(#[source] std::io::Error),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Which tracepoint each program is attached to. Syscall exits are not here: one raw tracepoint
/// program on `sys_exit` serves them all ([`attach_sys_exit`]).
const ATTACH: &[(&str, &str, &str)] = &[
    ("tp_sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("tp_sched_process_exec", "sched", "sched_process_exec"),
    ("tp_task_newtask", "task", "task_newtask"),
    ("tp_sched_process_exit", "sched", "sched_process_exit"),
];

/// Hooks that are not essential: the agent runs without them (and says so).
const OPTIONAL: &[&str] = &["sched_process_exec", "task_newtask"];

/// Options for loading.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub config: ProbeConfig,
    pub ring_buffer_bytes: u32,
    /// Use this object file instead of the embedded one (development).
    pub object: Option<PathBuf>,
}

/// The loaded programs and the maps user space talks to.
pub struct Probes {
    pub ebpf: Ebpf,
    pub targets: BpfHashMap<MapData, u32, u32>,
    /// `TARGET_BYTES`, the kernel's one-byte-per-tgid copy of `targets` (loader/targets.rs).
    target_bytes: super::targets::TargetBytes,
    pub watch_ports: BpfHashMap<MapData, u16, u32>,
    /// `--exe` names as the kernel's `comm` (15 bytes, NUL-padded): traced from exec on.
    pub watch_comms: BpfHashMap<MapData, [u8; 16], u32>,
    pub lost: PerCpuArray<MapData, u64>,
    /// `AGENT_SLEEPING`: the event loop sleeps without a drain timer; the next record wakes it.
    pub sleeping: Array<MapData, u32>,
    /// Hooks attached, as `category/name`.
    pub attached: Vec<String>,
    /// Optional hooks that failed, with the reason.
    pub skipped: Vec<(String, String)>,
    /// TLS uprobes per traced process (loader/uprobes.rs).
    pub tls: super::uprobes::TlsProbes,
    /// Header injection: in use, or why not.
    pub inject: InjectStatus,
    inject_stats: Option<PerCpuArray<MapData, u64>>,
}

/// Whether `traceparent` injection (sock_ops + sk_msg) is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectStatus {
    Active { cgroup: String },
    Disabled,
    Unavailable(String),
}

/// Attaches sock_ops to the cgroup2 root and sk_msg to the socket hash, then switches the kernel
/// side on. Any failure leaves injection off and says why.
fn attach_inject(ebpf: &mut Ebpf) -> Result<String, String> {
    let cg = super::features::cgroup2_mount()
        .ok_or_else(|| "no cgroup2 file system is mounted (sock_ops attaches to a cgroup v2)".to_string())?;
    let file = std::fs::File::open(&cg).map_err(|e| format!("cannot open cgroup2 mount {cg}: {e}"))?;
    let map_fd = {
        let socks: SockHash<_, Tuple> = SockHash::try_from(ebpf.map("INJECT_SOCKS").ok_or("map INJECT_SOCKS missing")?)
            .map_err(|e| e.to_string())?;
        socks.fd().try_clone().map_err(|e| e.to_string())?
    };
    let verifier = |e: aya::programs::ProgramError| match &e {
        aya::programs::ProgramError::LoadError { verifier_log, .. } => {
            let log = verifier_log.to_string();
            let mut tail: Vec<&str> = log.lines().rev().take(12).collect();
            tail.reverse();
            format!("{e}: {}", tail.join(" | "))
        }
        _ => e.to_string(),
    };
    let p: &mut SkMsg = ebpf
        .program_mut("sk_msg_inject")
        .ok_or("program sk_msg_inject missing")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    p.load().map_err(|e| format!("sk_msg refused: {}", verifier(e)))?;
    p.attach(&map_fd).map_err(|e| format!("sk_msg attach to the socket hash failed: {e}"))?;
    let p: &mut SockOps = ebpf
        .program_mut("sock_ops_inject")
        .ok_or("program sock_ops_inject missing")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    p.load().map_err(|e| format!("sock_ops refused: {}", verifier(e)))?;
    // A BPF link (kernel ≥ 5.7) always coexists with other programs on the cgroup; `Single` is
    // the only mode bpf_link_create accepts.
    p.attach(file, CgroupAttachMode::Single).map_err(|e| {
        let src = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
        format!("sock_ops attach to {cg} failed: {e}{src} (an exclusive sock_ops program on that cgroup?)")
    })?;
    let mut on: Array<_, u32> = Array::try_from(ebpf.map_mut("INJECT_ACTIVE").ok_or("map INJECT_ACTIVE missing")?)
        .map_err(|e| e.to_string())?;
    on.set(0, 1, 0).map_err(|e| e.to_string())?;
    Ok(cg)
}

/// The syscalls the `sys_exit` program follows (name, this architecture's number, `SYS_*` kind):
/// the data syscalls, then the connection syscalls.
const EXIT_SYSCALLS: [(&str, libc::c_long, u32); 14] = [
    ("read", libc::SYS_read, waybill_common::SYS_READ),
    ("write", libc::SYS_write, waybill_common::SYS_WRITE),
    ("readv", libc::SYS_readv, waybill_common::SYS_READV),
    ("writev", libc::SYS_writev, waybill_common::SYS_WRITEV),
    ("recvfrom", libc::SYS_recvfrom, waybill_common::SYS_RECVFROM),
    ("sendto", libc::SYS_sendto, waybill_common::SYS_SENDTO),
    ("recvmsg", libc::SYS_recvmsg, waybill_common::SYS_RECVMSG),
    ("sendmsg", libc::SYS_sendmsg, waybill_common::SYS_SENDMSG),
    ("sendfile", libc::SYS_sendfile, waybill_common::SYS_SENDFILE),
    ("accept", libc::SYS_accept, waybill_common::SYS_ACCEPT),
    ("accept4", libc::SYS_accept4, waybill_common::SYS_ACCEPT),
    ("connect", libc::SYS_connect, waybill_common::SYS_CONNECT),
    ("close", libc::SYS_close, waybill_common::SYS_CLOSE),
    ("listen", libc::SYS_listen, waybill_common::SYS_LISTEN),
];

/// The programs `raw_sys_exit_data` tail-calls, by `DATA_PROG` slot (ebpf-probes/src/maps.rs).
const EXIT_SLOTS: [&str; 5] =
    ["raw_sys_exit_copy", "raw_sys_exit_accept", "raw_sys_exit_connect", "raw_sys_exit_close", "raw_sys_exit_listen"];

/// Fills `SYSCALL_KIND`, loads the tail-called halves into `DATA_PROG` and attaches the syscall
/// exit program to `raw_tracepoint/sys_exit`.
fn attach_sys_exit(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    const PROG: &str = "raw_sys_exit_data";
    let prog_err = |program: &str| {
        let program = program.to_string();
        move |source| LoadError::Program { program, source }
    };
    {
        let mut kinds: Array<_, u32> =
            Array::try_from(ebpf.map_mut("SYSCALL_KIND").ok_or(LoadError::MissingMap("SYSCALL_KIND"))?)
                .map_err(|e| LoadError::Map { name: "SYSCALL_KIND", source: e })?;
        for (_, nr, kind) in EXIT_SYSCALLS {
            let nr = u32::try_from(nr).ok().filter(|&n| n < SYSCALL_TABLE).expect("socket syscall numbers are small");
            kinds.set(nr, kind + 1, 0).map_err(|e| LoadError::Map { name: "SYSCALL_KIND", source: e })?;
        }
    }
    // The tail-called programs are never attached: loaded, then put in the program array.
    let mut fds = Vec::with_capacity(EXIT_SLOTS.len());
    for name in EXIT_SLOTS {
        let p: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingMap("a sys_exit program"))?
            .try_into()
            .map_err(prog_err(name))?;
        p.load().map_err(prog_err(name))?;
        fds.push(p.fd().map_err(prog_err(name))?.try_clone().map_err(|e| prog_err(name)(e.into()))?);
    }
    let mut slots = ProgramArray::try_from(ebpf.map_mut("DATA_PROG").ok_or(LoadError::MissingMap("DATA_PROG"))?)
        .map_err(|e| LoadError::Map { name: "DATA_PROG", source: e })?;
    for (slot, fd) in fds.iter().enumerate() {
        slots.set(slot as u32, fd, 0).map_err(|e| LoadError::Map { name: "DATA_PROG", source: e })?;
    }
    let p: &mut RawTracePoint = ebpf
        .program_mut(PROG)
        .ok_or(LoadError::MissingMap("program raw_sys_exit_data"))?
        .try_into()
        .map_err(prog_err(PROG))?;
    p.load().map_err(prog_err(PROG))?;
    p.attach("sys_exit").map_err(prog_err("raw_sys_exit_data (raw_tracepoint/sys_exit)"))?;
    Ok(())
}

/// The kernel → agent ring buffer, created and written to by the kernel side but not yet mapped
/// into the agent's memory. Mapping it makes its data pages resident at once, twice over (the
/// kernel maps the data area twice, so a record never wraps): 16 MiB for the default 8 MiB
/// buffer. [`EventsMap::map`] is left to the caller, to do once start-up has returned its
/// temporary memory (BTF, ELF parsing), so the two never add up in the start-up peak. Records
/// the kernel writes in between wait in the buffer.
pub struct EventsMap(aya::maps::Map);

impl EventsMap {
    /// Maps the ring buffer for reading.
    pub fn map(self) -> Result<RingBuf<MapData>, LoadError> {
        RingBuf::try_from(self.0).map_err(|e| LoadError::Map { name: "EVENTS", source: e })
    }
}

/// Computes offsets, loads the object and attaches every program.
pub fn load(opts: &LoadOptions) -> Result<(Probes, EventsMap), LoadError> {
    let owned;
    let bytes: &[u8] = match &opts.object {
        Some(p) => {
            owned = std::fs::read(p).map_err(|_| LoadError::NoObject)?;
            &owned
        }
        None => PROBES_OBJ,
    };
    if bytes.is_empty() {
        return Err(LoadError::NoObject);
    }
    super::mounts::ensure_tracefs().map_err(LoadError::Mount)?;
    let btf = btf::Btf::from_sys_fs()?;
    let offs: KernelOffsets = btf::kernel_offsets(&btf)?;
    let regs: SyscallRegs = btf::syscall_regs(&btf)?;
    drop(btf);
    let tp: TracepointOffsets = tracefs::tracepoint_offsets().unwrap_or_default();
    let target_chunks = super::targets::chunks_for_host();
    // No CO-RE relocations in the object (kernel offsets come in as the globals above), so aya
    // need not parse the kernel's BTF a second time: that parse was most of the start-up peak.
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .override_global("OFFS", &offs, true)
        .override_global("TP_OFFS", &tp, true)
        .override_global("REGS", &regs, true)
        .override_global("CONFIG", &opts.config, true)
        .map_max_entries("EVENTS", opts.ring_buffer_bytes)
        .map_max_entries("TARGET_BYTES", target_chunks)
        .load(bytes)
        .map_err(LoadError::Load)?;

    let mut attached = Vec::new();
    let mut skipped = Vec::new();
    for (prog, category, name) in ATTACH {
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .ok_or(LoadError::MissingMap("program"))?
            .try_into()
            .map_err(|e| LoadError::Program { program: prog.to_string(), source: e })?;
        if p.fd().is_err() {
            p.load().map_err(|e| LoadError::Program { program: prog.to_string(), source: e })?;
        }
        match p.attach(category, name) {
            Ok(_) => attached.push(format!("{category}/{name}")),
            Err(e) if OPTIONAL.contains(name) => {
                tracing::warn!(hook = %format!("{category}/{name}"), error = %e, "optional hook not attached");
                skipped.push((format!("{category}/{name}"), e.to_string()));
            }
            Err(e) => {
                return Err(LoadError::Program { program: format!("{prog} ({category}/{name})"), source: e });
            }
        }
    }
    attach_sys_exit(&mut ebpf)?;
    attached.push(format!("raw_tracepoint/sys_exit ({})", EXIT_SYSCALLS.map(|(n, _, _)| n).join(", ")));
    let tls_ok = match super::uprobes::load_programs(&mut ebpf) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "TLS uprobes unavailable: TLS traffic will not be decrypted");
            skipped.push(("uprobe/tls".to_string(), e));
            false
        }
    };
    let inject = if opts.config.inject == 0 {
        InjectStatus::Disabled
    } else {
        match attach_inject(&mut ebpf) {
            Ok(cgroup) => {
                tracing::info!(cgroup = %cgroup, "traceparent injection on (sock_ops + sk_msg)");
                attached.push("sock_ops+sk_msg/inject".to_string());
                InjectStatus::Active { cgroup }
            }
            Err(e) => {
                tracing::warn!(reason = %e, "traceparent injection unavailable: running without it (spans are still linked on this host)");
                skipped.push(("sock_ops+sk_msg/inject".to_string(), e.clone()));
                InjectStatus::Unavailable(e)
            }
        }
    };
    let inject_stats = ebpf.take_map("INJECT_STATS").and_then(|m| PerCpuArray::try_from(m).ok());
    let events = EventsMap(ebpf.take_map("EVENTS").ok_or(LoadError::MissingMap("EVENTS"))?);
    let targets = BpfHashMap::try_from(ebpf.take_map("TARGETS").ok_or(LoadError::MissingMap("TARGETS"))?)
        .map_err(|e| LoadError::Map { name: "TARGETS", source: e })?;
    let target_bytes = match ebpf.take_map("TARGET_BYTES") {
        Some(aya::maps::Map::Array(data)) => {
            super::targets::TargetBytes::map(data, target_chunks).map_err(LoadError::TargetBytes)?
        }
        _ => return Err(LoadError::MissingMap("TARGET_BYTES")),
    };
    let watch_ports = BpfHashMap::try_from(ebpf.take_map("WATCH_PORTS").ok_or(LoadError::MissingMap("WATCH_PORTS"))?)
        .map_err(|e| LoadError::Map { name: "WATCH_PORTS", source: e })?;
    let watch_comms = BpfHashMap::try_from(ebpf.take_map("WATCH_COMMS").ok_or(LoadError::MissingMap("WATCH_COMMS"))?)
        .map_err(|e| LoadError::Map { name: "WATCH_COMMS", source: e })?;
    let lost = PerCpuArray::try_from(ebpf.take_map("LOST").ok_or(LoadError::MissingMap("LOST"))?)
        .map_err(|e| LoadError::Map { name: "LOST", source: e })?;
    let sleeping = Array::try_from(ebpf.take_map("AGENT_SLEEPING").ok_or(LoadError::MissingMap("AGENT_SLEEPING"))?)
        .map_err(|e| LoadError::Map { name: "AGENT_SLEEPING", source: e })?;
    Ok((
        Probes {
            ebpf,
            targets,
            target_bytes,
            watch_ports,
            watch_comms,
            lost,
            sleeping,
            attached,
            skipped,
            tls: super::uprobes::TlsProbes::new(tls_ok),
            inject,
            inject_stats,
        },
        events,
    ))
}

impl Probes {
    /// Starts tracing `pid` (kernel-side filter). Returns false when the map is full.
    pub fn add_target(&mut self, pid: u32) -> bool {
        let ok = self.targets.insert(pid, waybill_common::TARGET_TRACED, 0).is_ok();
        if ok {
            self.sync_target_byte(pid);
        }
        ok
    }

    /// Copies `pid`'s `TARGETS` value into its `TARGET_BYTES` byte after a write to `TARGETS`.
    /// Re-reads `TARGETS` after the byte store: when the process exited in between (the kernel
    /// cleared the byte, then removed the entry), the byte is cleared again.
    fn sync_target_byte(&mut self, pid: u32) {
        let flags = self.targets.get(&pid, 0).ok();
        self.target_bytes.set(pid, flags);
        if flags.is_some() && self.targets.get(&pid, 0).is_err() {
            self.target_bytes.set(pid, None);
        }
    }

    /// The kernel's byte for `pid` (`TARGET_BYTES`; None beyond the array).
    #[cfg(test)]
    pub fn target_byte(&self, pid: u32) -> Option<u8> {
        self.target_bytes.get(pid)
    }

    /// Sets a traced process's policy bits: `no_inject` turns `traceparent` injection off for it
    /// (children inherit the bits at fork).
    pub fn set_target_policy(&mut self, pid: u32, no_inject: bool) {
        let keep = self.targets.get(&pid, 0).unwrap_or(0) & waybill_common::TARGET_TLS;
        let flags = waybill_common::TARGET_TRACED | keep | if no_inject { waybill_common::TARGET_NO_INJECT } else { 0 };
        if self.targets.insert(pid, flags, 0).is_ok() {
            self.sync_target_byte(pid);
        }
    }

    /// Tells the kernel side that OpenSSL probes are being attached in `pid` (`TARGET_TLS`), so its
    /// socket syscalls start consulting the TLS maps. Called before the first probe attaches; a
    /// process that is not (or no longer) traced is left alone.
    pub fn mark_target_tls(&mut self, pid: u32) {
        let Ok(flags) = self.targets.get(&pid, 0) else { return };
        if flags & waybill_common::TARGET_TLS == 0 {
            // BPF_EXIST: never re-adds a process that exited in between.
            if self.targets.insert(pid, flags | waybill_common::TARGET_TLS, 2).is_ok() {
                self.sync_target_byte(pid);
            }
        }
    }

    pub fn remove_target(&mut self, pid: u32) {
        self.target_bytes.set(pid, None);
        let _ = self.targets.remove(&pid);
    }

    pub fn is_target(&self, pid: u32) -> bool {
        self.targets.get(&pid, 0).is_ok()
    }

    /// The kernel traces a process from its exec when its `comm` is `name` (the first 15 bytes:
    /// the kernel truncates `comm` so).
    pub fn watch_comm(&mut self, name: &str) -> bool {
        let mut key = [0u8; 16];
        let b = name.as_bytes();
        let n = b.len().min(15);
        key[..n].copy_from_slice(&b[..n]);
        self.watch_comms.insert(key, 1, 0).is_ok()
    }

    pub fn watch_port(&mut self, port: u16) -> bool {
        self.watch_ports.insert(port, 1, 0).is_ok()
    }

    /// sk_msg / sock_ops outcomes summed over CPUs, indexed by `INJ_*`.
    pub fn inject_counters(&self) -> [u64; INJ_COUNTERS as usize] {
        let mut out = [0u64; INJ_COUNTERS as usize];
        if let Some(m) = &self.inject_stats {
            for (i, o) in out.iter_mut().enumerate() {
                if let Ok(v) = m.get(&(i as u32), 0) {
                    *o = v.iter().sum();
                }
            }
        }
        out
    }

    /// Asks the kernel side to wake the agent with the next record (`on`), or takes that back.
    /// False when the map update failed (the caller must then keep its drain timer).
    pub fn set_sleeping(&mut self, on: bool) -> bool {
        self.sleeping.set(0, u32::from(on), 0).is_ok()
    }

    /// Records the ring buffer had no room for, summed over CPUs (one map read).
    pub fn ringbuf_lost(&self) -> u64 {
        self.lost.get(&waybill_common::LOST_RINGBUF_FULL, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Kernel-side loss counters summed over CPUs, indexed by `LOST_*`.
    pub fn lost_counters(&self) -> [u64; LOST_COUNTERS as usize] {
        let mut out = [0u64; LOST_COUNTERS as usize];
        for (i, o) in out.iter_mut().enumerate() {
            if let Ok(v) = self.lost.get(&(i as u32), 0) {
                *o = v.iter().sum();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waybill_common::{TARGET_NO_INJECT, TARGET_TLS, TARGET_TRACED};

    /// The kernel's copy of the target set (`TARGET_BYTES`) follows every write: user space's
    /// through the shared mapping, the kernel's own at fork and exit. Needs root and the object
    /// (`WAYBILL_EBPF_OBJ`, set by `cargo xtask test`).
    #[test]
    fn target_bytes_follow_user_and_kernel_writes() {
        let Some(object) = std::env::var_os("WAYBILL_EBPF_OBJ").map(PathBuf::from) else {
            eprintln!("skipped: WAYBILL_EBPF_OBJ not set (run `cargo xtask test`)");
            return;
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading the probes needs root");
            return;
        }
        let opts = LoadOptions { config: ProbeConfig::default(), ring_buffer_bytes: 1 << 20, object: Some(object) };
        let (mut p, _ring) = load(&opts).expect("the probes load as root");
        let me = std::process::id();
        assert_eq!(p.target_byte(me), Some(0));
        assert!(p.add_target(me));
        assert_eq!(p.target_byte(me), Some(TARGET_TRACED as u8));
        p.set_target_policy(me, true);
        assert_eq!(p.target_byte(me), Some((TARGET_TRACED | TARGET_NO_INJECT) as u8));
        p.mark_target_tls(me);
        assert_eq!(p.target_byte(me), Some((TARGET_TRACED | TARGET_NO_INJECT | TARGET_TLS) as u8));
        // A tgid past the array is left to TARGETS alone.
        assert_eq!(p.target_byte(u32::MAX), None);
        // The kernel side: a child of a traced process is traced from fork (with the parent's
        // bits), and forgotten at its exit.
        if p.attached.iter().any(|h| h == "task/task_newtask")
            && p.attached.iter().any(|h| h == "sched/sched_process_exit")
        {
            let mut child = std::process::Command::new("sleep").arg("0.2").spawn().expect("sleep");
            let pid = child.id();
            assert_eq!(p.target_byte(pid), Some((TARGET_TRACED | TARGET_NO_INJECT | TARGET_TLS) as u8));
            assert!(p.is_target(pid));
            child.wait().unwrap();
            assert_eq!(p.target_byte(pid), Some(0), "the exit hook clears the byte");
            assert!(!p.is_target(pid));
        }
        p.remove_target(me);
        assert_eq!(p.target_byte(me), Some(0));
        assert!(!p.is_target(me));
    }
}
