//! Loads the embedded eBPF object with this kernel's offsets and attaches the programs.
//!
//! Hook choice: the syscall tracepoints carry the data path on every kernel (they exist since
//! 4.x, work under lockdown and need no kprobes). Where kprobes or fentry are available they
//! could serve as cheaper accelerators; `features.rs` probes them and the choice is logged.

use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{SkMsg, SockOps, TracePoint, links::CgroupAttachMode},
};
use thiserror::Error;
use waybill_common::{INJ_COUNTERS, KernelOffsets, LOST_COUNTERS, ProbeConfig, TracepointOffsets, Tuple};

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
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Which tracepoint each program is attached to.
const ATTACH: &[(&str, &str, &str)] = &[
    ("tp_sys_enter_read", "syscalls", "sys_enter_read"),
    ("tp_sys_enter_write", "syscalls", "sys_enter_write"),
    ("tp_sys_enter_readv", "syscalls", "sys_enter_readv"),
    ("tp_sys_enter_writev", "syscalls", "sys_enter_writev"),
    ("tp_sys_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("tp_sys_enter_sendto", "syscalls", "sys_enter_sendto"),
    ("tp_sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("tp_sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("tp_sys_enter_sendfile64", "syscalls", "sys_enter_sendfile64"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_read"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_write"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_readv"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_writev"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_recvfrom"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_sendto"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_recvmsg"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_sendmsg"),
    ("tp_sys_exit_data", "syscalls", "sys_exit_sendfile64"),
    ("tp_sys_exit_accept", "syscalls", "sys_exit_accept4"),
    ("tp_sys_exit_accept", "syscalls", "sys_exit_accept"),
    ("tp_sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("tp_sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("tp_sys_enter_close", "syscalls", "sys_enter_close"),
    ("tp_sys_enter_listen", "syscalls", "sys_enter_listen"),
    ("tp_sched_process_exec", "sched", "sched_process_exec"),
    ("tp_task_newtask", "task", "task_newtask"),
    ("tp_sched_process_exit", "sched", "sched_process_exit"),
];

/// Hooks that are not essential: the agent runs without them (and says so).
const OPTIONAL: &[&str] = &["sys_exit_accept", "sys_enter_listen", "sched_process_exec", "task_newtask"];

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
    pub watch_ports: BpfHashMap<MapData, u16, u32>,
    /// `--exe` names as the kernel's `comm` (15 bytes, NUL-padded): traced from exec on.
    pub watch_comms: BpfHashMap<MapData, [u8; 16], u32>,
    pub lost: PerCpuArray<MapData, u64>,
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

/// Computes offsets, loads the object and attaches every program.
pub fn load(opts: &LoadOptions) -> Result<(Probes, RingBuf<MapData>), LoadError> {
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
    let tp: TracepointOffsets = tracefs::tracepoint_offsets().unwrap_or_default();
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFS", &offs, true)
        .override_global("TP_OFFS", &tp, true)
        .override_global("CONFIG", &opts.config, true)
        .map_max_entries("EVENTS", opts.ring_buffer_bytes)
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
    let events = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or(LoadError::MissingMap("EVENTS"))?)
        .map_err(|e| LoadError::Map { name: "EVENTS", source: e })?;
    let targets = BpfHashMap::try_from(ebpf.take_map("TARGETS").ok_or(LoadError::MissingMap("TARGETS"))?)
        .map_err(|e| LoadError::Map { name: "TARGETS", source: e })?;
    let watch_ports = BpfHashMap::try_from(ebpf.take_map("WATCH_PORTS").ok_or(LoadError::MissingMap("WATCH_PORTS"))?)
        .map_err(|e| LoadError::Map { name: "WATCH_PORTS", source: e })?;
    let watch_comms = BpfHashMap::try_from(ebpf.take_map("WATCH_COMMS").ok_or(LoadError::MissingMap("WATCH_COMMS"))?)
        .map_err(|e| LoadError::Map { name: "WATCH_COMMS", source: e })?;
    let lost = PerCpuArray::try_from(ebpf.take_map("LOST").ok_or(LoadError::MissingMap("LOST"))?)
        .map_err(|e| LoadError::Map { name: "LOST", source: e })?;
    Ok((
        Probes {
            ebpf,
            targets,
            watch_ports,
            watch_comms,
            lost,
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
        self.targets.insert(pid, waybill_common::TARGET_TRACED, 0).is_ok()
    }

    /// Sets a traced process's policy bits: `no_inject` turns `traceparent` injection off for it
    /// (children inherit the bits at fork).
    pub fn set_target_policy(&mut self, pid: u32, no_inject: bool) {
        let flags = waybill_common::TARGET_TRACED | if no_inject { waybill_common::TARGET_NO_INJECT } else { 0 };
        let _ = self.targets.insert(pid, flags, 0);
    }

    pub fn remove_target(&mut self, pid: u32) {
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
