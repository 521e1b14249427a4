//! What this kernel and these privileges allow, probed at start-up and shown by `waybill check`.

use std::{fmt::Write as _, fs, path::Path};

use aya::{maps::MapType, programs::ProgramType};

/// Availability of one capability, with the evidence.
#[derive(Clone, Debug)]
pub struct Probe {
    pub name: &'static str,
    pub available: bool,
    pub detail: String,
}

/// The full report.
#[derive(Clone, Debug)]
pub struct Features {
    pub kernel: String,
    pub arch: &'static str,
    pub privileged: bool,
    pub privilege_detail: String,
    pub lockdown: String,
    pub probes: Vec<Probe>,
}

impl Features {
    pub fn get(&self, name: &str) -> bool {
        self.probes.iter().any(|p| p.name == name && p.available)
    }

    /// The hooks the agent will use for each job on this kernel.
    pub fn plan(&self) -> Vec<(&'static str, String)> {
        let data = if self.get("tracepoints") {
            "raw tracepoint sys_exit, one program for read, write, readv, writev, recvfrom, sendto, recvmsg, \
             sendmsg, sendfile, accept, accept4, connect, close, listen (arguments from the saved registers, pt_regs \
             layout from BTF); sys_enter_connect"
                .to_string()
        } else {
            "NONE: syscall tracepoints are missing, socket I/O cannot be captured".to_string()
        };
        let accel = match (self.get("fentry"), self.get("kprobes")) {
            (true, _) => {
                "fentry available (tcp_sendmsg/tcp_recvmsg could replace the fd walk); tracepoints in use".to_string()
            }
            (false, true) => "kprobes available; fentry refused; tracepoints in use".to_string(),
            (false, false) => {
                "kprobes and fentry unavailable: fallback to syscall tracepoints + BTF fd walk".to_string()
            }
        };
        let inject = if self.get("sock_ops + sk_msg") {
            let cg = cgroup2_mount().unwrap_or_default();
            format!(
                "traceparent injection: sock_ops on {cg} + sk_msg with bpf_msg_push_data (off with --no-inject; connections opened before attach are not covered)"
            )
        } else {
            "traceparent injection NOT available (needs cgroup2 + sock_ops + sk_msg): spans are linked on this host only"
                .to_string()
        };
        let probed = self.probes.iter().any(|p| p.name == "mmapable array map" && !p.detail.starts_with("not probed"));
        let filter = if !probed {
            "unknown: not probed without privileges (needs BPF_F_MMAPABLE array maps, Linux ≥ 5.5)".to_string()
        } else if self.get("mmapable array map") {
            let chunks = super::targets::chunks_for_host();
            format!(
                "one byte per tgid below {} ({} KiB array sized from pid_max, written by user space through a shared \
                 mapping); the TARGETS hash beyond",
                chunks * waybill_common::TARGET_CHUNK,
                chunks * waybill_common::TARGET_CHUNK / 1024
            )
        } else {
            "NONE: array maps cannot be mapped into user space here (BPF_F_MMAPABLE, Linux ≥ 5.5); the agent cannot \
             start"
                .to_string()
        };
        vec![
            ("target filter", filter),
            ("socket data", data),
            ("cross-host context", inject),
            ("fd → TCP 4-tuple", "task→files→fdtable→file→socket→sock walk, offsets from BTF at load time".to_string()),
            ("accelerators", accel),
            (
                "process lifecycle",
                "tracepoints sched/sched_process_exec, task/task_newtask, sched/sched_process_exit".to_string(),
            ),
        ]
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "kernel      {} ({})", self.kernel, self.arch);
        let _ = writeln!(s, "privileges  {}", self.privilege_detail);
        let _ = writeln!(s, "lockdown    {}", self.lockdown);
        let _ = writeln!(s, "\nhook family / feature            available  evidence");
        for p in &self.probes {
            let _ = writeln!(s, "  {:<32} {:<10} {}", p.name, if p.available { "yes" } else { "no" }, p.detail);
        }
        let _ = writeln!(s, "\nhooks Waybill will use");
        for (job, how) in self.plan() {
            let _ = writeln!(s, "  {job:<20} {how}");
        }
        s
    }
}

/// Can an array map be mapped into user space (`BPF_F_MMAPABLE`, Linux ≥ 5.5)? The traced-process
/// filter (`TARGET_BYTES`, loader/targets.rs) is written through such a mapping.
fn probe_mmapable_array() -> (bool, String) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let len = waybill_common::TARGET_CHUNK as usize;
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = waybill_common::TARGET_CHUNK;
    attr[3] = 1;
    attr[4] = 1 << 10; // BPF_F_MMAPABLE
    // SAFETY: BPF_MAP_CREATE (0) reads `size` bytes of `attr`, which is zero-padded.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return (false, format!("refused: {} (needs Linux ≥ 5.5)", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: a fresh shared mapping of the map's one value, unmapped below.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    if p == libc::MAP_FAILED {
        return (false, format!("created but not mappable: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len) };
    (true, "BPF_F_MMAPABLE array maps into user space".into())
}

fn tracefs_root() -> Option<&'static str> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].into_iter().find(|p| Path::new(p).join("events").exists())
}

/// The cgroup v2 mount point (the unified hierarchy), if any.
pub fn cgroup2_mount() -> Option<String> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| dir.to_string())
    })
}

/// Effective capabilities: (has CAP_SYS_ADMIN, has CAP_BPF and CAP_PERFMON).
fn capabilities() -> (bool, bool, u64) {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    (eff & (1 << 21) != 0, eff & (1 << 39) != 0 && eff & (1 << 38) != 0, eff)
}

/// True when the process may load and attach the programs.
pub fn privileged() -> bool {
    let (admin, bpf_perfmon, _) = capabilities();
    admin || bpf_perfmon
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// Tries to load the fentry probe program from the embedded object.
fn probe_fentry(obj: &[u8]) -> (bool, String) {
    if obj.is_empty() {
        return (false, "not probed: binary built without its eBPF object".into());
    }
    let Ok(btf) = aya::Btf::from_sys_fs() else {
        return (false, "no kernel BTF".into());
    };
    let mut ebpf = match aya::EbpfLoader::new().load(obj) {
        Ok(e) => e,
        Err(e) => return (false, format!("object did not load: {e}")),
    };
    let Some(p) = ebpf.program_mut("fentry_probe_tcp_sendmsg") else {
        return (false, "probe program missing".into());
    };
    let p: &mut aya::programs::FEntry = match p.try_into() {
        Ok(p) => p,
        Err(e) => return (false, e.to_string()),
    };
    match p.load("tcp_sendmsg", &btf) {
        Ok(()) => (true, "fentry program on tcp_sendmsg loaded".into()),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            (false, format!("refused by the kernel ({msg})"))
        }
    }
}

/// Probes everything.
pub fn detect() -> Features {
    if privileged() {
        let _ = super::mounts::ensure_tracefs();
        super::mounts::ensure_securityfs();
    }
    let (admin, bpf_perfmon, eff) = capabilities();
    let euid = unsafe { libc::geteuid() };
    let privileged = admin || bpf_perfmon;
    let privilege_detail = format!(
        "euid {euid}, CAP_SYS_ADMIN {}, CAP_BPF+CAP_PERFMON {} (CapEff {eff:#x}){}",
        if admin { "yes" } else { "no" },
        if bpf_perfmon { "yes" } else { "no" },
        if privileged { "" } else { " — NOT ENOUGH: run as root or grant CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE" }
    );
    let lockdown = fs::read_to_string("/sys/kernel/security/lockdown")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown (securityfs not mounted)".into());
    let mut probes = Vec::new();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    probes.push(Probe {
        name: "BTF (/sys/kernel/btf/vmlinux)",
        available: btf,
        detail: if btf {
            "present".into()
        } else {
            "missing: needs a kernel built with CONFIG_DEBUG_INFO_BTF=y".into()
        },
    });
    let tfs = tracefs_root();
    let tp = tfs.is_some_and(|r| Path::new(r).join("events/syscalls/sys_enter_write").exists());
    probes.push(Probe {
        name: "tracepoints",
        available: tp,
        detail: match tfs {
            Some(r) if tp => format!("{r}/events/syscalls present"),
            Some(r) => format!("{r} has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"),
            None => "tracefs not mounted (mount -t tracefs nodev /sys/kernel/tracing)".into(),
        },
    });
    let kp = Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        || tfs.is_some_and(|r| Path::new(r).join("kprobe_events").exists());
    probes.push(Probe {
        name: "kprobes",
        available: kp,
        detail: if kp { "kprobe PMU present".into() } else { "absent (kernel built without CONFIG_KPROBES)".into() },
    });
    let (fe, fe_detail) = if privileged && btf {
        probe_fentry(super::attach::embedded_object())
    } else {
        (false, "not probed (needs privileges and BTF)".into())
    };
    probes.push(Probe { name: "fentry", available: fe, detail: fe_detail });
    let up = Path::new("/sys/bus/event_source/devices/uprobe/type").exists();
    probes.push(Probe {
        name: "uprobes",
        available: up,
        detail: if up { "uprobe PMU present".into() } else { "absent (CONFIG_UPROBE_EVENTS)".into() },
    });
    let rb = aya::sys::is_map_supported(MapType::RingBuf).unwrap_or(false);
    probes.push(Probe {
        name: "ring buffer map",
        available: rb,
        detail: if rb {
            "BPF_MAP_TYPE_RINGBUF loads".into()
        } else {
            "not supported (kernel < 5.8?) or no privileges".into()
        },
    });
    let (mm, mm_detail) =
        if privileged { probe_mmapable_array() } else { (false, "not probed (needs privileges)".into()) };
    probes.push(Probe { name: "mmapable array map", available: mm, detail: mm_detail });
    let cg = cgroup2_mount();
    let sockops = aya::sys::is_program_supported(ProgramType::SockOps).unwrap_or(false);
    let skmsg = aya::sys::is_program_supported(ProgramType::SkMsg).unwrap_or(false);
    probes.push(Probe {
        name: "sock_ops + sk_msg",
        available: cg.is_some() && sockops && skmsg,
        detail: format!(
            "cgroup2 at {}, sock_ops {}, sk_msg {}",
            cg.as_deref().unwrap_or("(not mounted)"),
            if sockops { "loads" } else { "refused" },
            if skmsg { "loads" } else { "refused" }
        ),
    });
    let pwu = !lockdown.contains("[none]");
    probes.push(Probe {
        name: "bpf_probe_write_user",
        available: !pwu,
        detail: if pwu {
            format!("refused under lockdown {lockdown}; Waybill never writes process memory anyway")
        } else {
            "allowed by the kernel; Waybill never uses it".into()
        },
    });
    Features { kernel: kernel_release(), arch: std::env::consts::ARCH, privileged, privilege_detail, lockdown, probes }
}
