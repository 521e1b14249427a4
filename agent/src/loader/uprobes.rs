//! TLS uprobes on the selected processes only: OpenSSL's `SSL_read*`/`SSL_write*` (+ `SSL_free`)
//! in whatever libssl each process has mapped (`/proc/PID/maps`, so dlopen'ed copies count too) or
//! linked into its executable (Node.js), and Go's `crypto/tls.(*Conn).Read/Write` (entry + every
//! RET instruction, no uretprobes). Every attach is scoped to one PID (`UProbeScope::OneProcess`),
//! so untraced processes that map the same library never hit a breakpoint.
//!
//! When: a process becomes traced (`--pid`, `--exe`, `--port`, fork of a traced process), and
//! again on every rescan (libraries loaded later with dlopen). Files are scanned once per
//! (device, inode, mtime) and the result is cached.
//!
//! Cost: a uprobe hit costs ~10 µs on the development VM (int3 trap); a TLS request/response
//! pair costs 2 calls × (entry + return) = 4 hits, plus one `SSL_free` per connection.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};

use super::{
    attach::Probes,
    elf::{self, GO_READ, Location, TlsTargets},
};

/// Every uprobe program of the object.
pub const PROGRAMS: &[&str] = &[
    "up_ssl_read",
    "up_ssl_read_ex",
    "up_ssl_write",
    "up_ssl_write_ex",
    "urp_ssl_rw",
    "up_ssl_free",
    "up_go_tls_read",
    "up_go_tls_write",
    "up_go_tls_ret",
];

/// OpenSSL function → (entry program, whether the shared return program is attached too).
fn openssl_programs(func: &str) -> Option<(&'static str, bool)> {
    Some(match func {
        "SSL_read" => ("up_ssl_read", true),
        "SSL_read_ex" => ("up_ssl_read_ex", true),
        "SSL_write" => ("up_ssl_write", true),
        "SSL_write_ex" => ("up_ssl_write_ex", true),
        "SSL_free" => ("up_ssl_free", false),
        _ => return None,
    })
}

/// Loads (verifies) the uprobe programs. An error disables TLS tracing, not the agent.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), String> {
    for name in PROGRAMS {
        let p: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        p.load().map_err(|e| format!("{name} rejected: {e}"))?;
    }
    Ok(())
}

/// Per-process attachments.
#[derive(Default)]
struct ProcTls {
    /// Files (dev, inode) already handled for this process.
    files: HashSet<(u64, u64)>,
    links: Vec<(&'static str, UProbeLinkId)>,
    /// The process's virtual size when its mappings were last read: the rescan reads
    /// /proc/PID/maps again only when it changed (a `dlopen` maps new memory). Reading the maps
    /// of every traced process was a third of an idle agent's CPU.
    vsize: Option<u64>,
}

/// TLS probe state of the agent.
pub struct TlsProbes {
    /// The programs passed the verifier (else TLS tracing is off and says so once).
    enabled: bool,
    procs: HashMap<u32, ProcTls>,
    /// (dev, inode, mtime) → what the file offers.
    scanned: HashMap<(u64, u64, i64), Arc<TlsTargets>>,
}

impl TlsProbes {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, procs: HashMap::new(), scanned: HashMap::new() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Number of uprobe attachments in place (all processes).
    pub fn attachments(&self) -> usize {
        self.procs.values().map(|p| p.links.len()).sum()
    }
}

/// One executable mapping of a process.
struct Mapped {
    /// Path as the process sees it.
    path: String,
    /// Path valid from the agent's mount namespace.
    host_path: PathBuf,
    dev: u64,
    ino: u64,
    mtime: i64,
    is_main: bool,
}

fn stripped_message(pid: u32, path: &str) -> String {
    format!(
        "pid {pid}: {path} has no symbols (stripped), so no SSL_* functions and no Go crypto/tls can be \
         found in it: TLS linked into it will not be seen"
    )
}

/// What `waybill check --pid` says about the TLS of a process: one line per file looked at.
pub fn tls_report(pid: u32) -> Vec<String> {
    let files = mapped_files(pid);
    if files.is_empty() {
        return vec![format!("pid {pid}: cannot read /proc/{pid}/maps (gone, or not permitted)")];
    }
    let mut out = Vec::new();
    let mut any = false;
    for m in &files {
        let t = match elf::scan(&m.host_path, true) {
            Ok(t) => t,
            Err(e) => {
                out.push(format!("pid {pid}: {e}"));
                continue;
            }
        };
        let line = if !t.openssl.is_empty() {
            let funcs: Vec<&str> = t.openssl.iter().map(|l| l.func.as_str()).collect();
            format!("pid {pid}: {}: OpenSSL {} → uprobes", m.path, funcs.join(","))
        } else if let (Some(v), None) = (&t.go_version, &t.go_problem) {
            format!("pid {pid}: {}: {v} crypto/tls → uprobes at entry + {} RET instructions", m.path, t.go_rets.len())
        } else if let (Some(v), Some(p)) = (&t.go_version, &t.go_problem) {
            format!("pid {pid}: {}: {v}: {p}", m.path)
        } else if !t.has_symbols {
            stripped_message(pid, &m.path)
        } else if m.is_main {
            format!("pid {pid}: {}: no SSL_* symbols and no Go build info in the executable", m.path)
        } else {
            format!("pid {pid}: {}: libssl without SSL_read/SSL_write symbols: TLS not traced", m.path)
        };
        any |= !t.openssl.is_empty() || (t.go_version.is_some() && t.go_problem.is_none());
        out.push(line);
    }
    if !any {
        out.push(format!(
            "pid {pid}: no libssl mapped and nothing to probe: TLS in it (if any) will not be seen; a libssl \
             loaded later (dlopen) is picked up on the next rescan"
        ));
    }
    out
}

/// OpenSSL's libssl by file name: `libssl.so.3` (distributions), and the renamed copies that
/// Python wheels bundle (`libssl-4a840876.so.3`: auditwheel adds a hash), as psycopg-binary does.
fn is_libssl(base: &str) -> bool {
    base.strip_prefix("libssl")
        .is_some_and(|rest| rest.starts_with(".so") || (rest.starts_with('-') && rest.contains(".so")))
}

/// The executable file mappings of `pid` worth looking at: its main executable and any libssl.
fn mapped_files(pid: u32) -> Vec<Mapped> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (Some(_), Some(perms)) = (it.next(), it.next()) else { continue };
        let Some(path) = it.nth(3) else { continue };
        if !perms.contains('x') || !path.starts_with('/') || line.ends_with("(deleted)") {
            continue;
        }
        let is_main = exe.as_deref() == Some(Path::new(path));
        let base = path.rsplit('/').next().unwrap_or(path);
        if !is_main && !is_libssl(base) {
            continue;
        }
        if !seen.insert(path.to_string()) {
            continue;
        }
        let host_path = PathBuf::from(format!("/proc/{pid}/root{path}"));
        let Ok(md) = std::fs::metadata(&host_path) else { continue };
        out.push(Mapped {
            path: path.to_string(),
            host_path,
            dev: md.dev(),
            ino: md.ino(),
            mtime: md.mtime(),
            is_main,
        });
    }
    out
}

fn attach_one(
    ebpf: &mut Ebpf,
    prog: &'static str,
    loc: &Location,
    path: &Path,
    pid: NonZeroU32,
) -> Result<(&'static str, UProbeLinkId), String> {
    let p: &mut UProbe = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing"))?
        .try_into()
        .map_err(|e| format!("{prog}: {e}"))?;
    p.attach(UProbeAttachLocation::AbsoluteOffset(loc.offset), path, UProbeScope::OneProcess(pid))
        .map(|id| (prog, id))
        .map_err(|e| format!("{prog} at {}+{:#x}: {e}", loc.func, loc.offset))
}

impl Probes {
    /// Attaches the TLS probes `pid` needs, for files not handled yet. Returns how many probes
    /// were added. Safe to call again (rescans pick up libraries loaded with dlopen).
    pub fn attach_tls(&mut self, pid: u32) -> usize {
        let Some(nz) = NonZeroU32::new(pid) else { return 0 };
        if !self.tls.enabled {
            return 0;
        }
        let vsize = crate::process::vsize(pid);
        if vsize.is_some() && self.tls.procs.get(&pid).is_some_and(|p| p.vsize == vsize) {
            return 0;
        }
        let files = mapped_files(pid);
        self.tls.procs.entry(pid).or_default().vsize = vsize;
        let mut added = 0;
        for m in files {
            let known = self.tls.procs.get(&pid).is_some_and(|p| p.files.contains(&(m.dev, m.ino)));
            if known {
                continue;
            }
            let key = (m.dev, m.ino, m.mtime);
            let targets = match self.tls.scanned.get(&key) {
                Some(t) => t.clone(),
                None => {
                    let t = match elf::scan(&m.host_path, true) {
                        Ok(t) => Arc::new(t),
                        Err(e) => {
                            tracing::warn!(pid, file = %m.path, error = %e, "cannot read the file for TLS probes");
                            Arc::new(TlsTargets::default())
                        }
                    };
                    self.tls.scanned.insert(key, t.clone());
                    t
                }
            };
            if !targets.openssl.is_empty() {
                self.mark_target_tls(pid);
            }
            let st = self.tls.procs.entry(pid).or_default();
            st.files.insert((m.dev, m.ino));
            let mut links = Vec::new();
            let mut errors = Vec::new();
            for loc in &targets.openssl {
                let Some((entry, ret)) = openssl_programs(&loc.func) else { continue };
                let progs: &[&'static str] = if ret { &[entry, "urp_ssl_rw"] } else { &[entry] };
                for prog in progs {
                    match attach_one(&mut self.ebpf, prog, loc, &m.host_path, nz) {
                        Ok(l) => links.push(l),
                        Err(e) => errors.push(e),
                    }
                }
            }
            if targets.go_problem.is_none() {
                for loc in &targets.go_entries {
                    let prog = if loc.func == GO_READ { "up_go_tls_read" } else { "up_go_tls_write" };
                    match attach_one(&mut self.ebpf, prog, loc, &m.host_path, nz) {
                        Ok(l) => links.push(l),
                        Err(e) => errors.push(e),
                    }
                }
                for loc in &targets.go_rets {
                    match attach_one(&mut self.ebpf, "up_go_tls_ret", loc, &m.host_path, nz) {
                        Ok(l) => links.push(l),
                        Err(e) => errors.push(e),
                    }
                }
            }
            if !links.is_empty() {
                let mut funcs: Vec<&str> = targets.openssl.iter().map(|l| l.func.as_str()).collect();
                funcs.extend(targets.go_entries.iter().map(|l| l.func.as_str()));
                tracing::info!(
                    pid,
                    file = %m.path,
                    go = %targets.go_version.as_deref().unwrap_or("-"),
                    functions = %funcs.join(","),
                    probes = links.len(),
                    "TLS probes attached"
                );
            }
            if m.is_main {
                if let (Some(v), Some(p)) = (&targets.go_version, &targets.go_problem) {
                    if targets.go_entries.is_empty() && p.contains("does not use") {
                        tracing::debug!(pid, file = %m.path, go = %v, "Go program without crypto/tls");
                    } else {
                        tracing::warn!(pid, file = %m.path, go = %v, problem = %p, "Go TLS cannot be traced");
                    }
                } else if !targets.has_symbols {
                    tracing::warn!(pid, file = %m.path, "{}", stripped_message(pid, &m.path));
                }
            } else if targets.openssl.is_empty() {
                tracing::warn!(pid, file = %m.path, "libssl without SSL_read/SSL_write symbols: TLS not traced");
            }
            if !errors.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                // Exited while being probed (a short-lived child): nothing was missed.
                tracing::debug!(pid, file = %m.path, errors = errors.len(), "process gone before its TLS probes");
            } else {
                for e in &errors {
                    tracing::warn!(pid, file = %m.path, error = %e, "TLS probe not attached");
                }
            }
            added += links.len();
            st.links.extend(links);
        }
        added
    }

    /// Detaches every TLS probe of `pid` (it exited or is no longer traced).
    pub fn detach_tls(&mut self, pid: u32) {
        let Some(st) = self.tls.procs.remove(&pid) else { return };
        for (prog, id) in st.links {
            if let Some(p) = self.ebpf.program_mut(prog) {
                let p: Result<&mut UProbe, _> = p.try_into();
                if let Ok(p) = p {
                    let _ = p.detach(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_libssl;

    #[test]
    fn libssl_file_names() {
        for yes in ["libssl.so.3", "libssl.so.1.1", "libssl.so", "libssl-4a840876.so.3", "libssl-1bd0ad2e.so.1.1"] {
            assert!(is_libssl(yes), "{yes}");
        }
        for no in ["libssl3.so", "libssh.so.4", "libsslx.so", "libcrypto.so.3", "libssl-dev"] {
            assert!(!is_libssl(no), "{no}");
        }
    }
}
