//! Which processes to trace (`--pid`, `--exe`, `--port`) and how to describe each one as an
//! OpenTelemetry resource.
//!
//! Selection rules:
//! - `--pid N`: process N **and its descendants** (an nginx master's workers, a gunicorn
//!   arbiter's workers). Children forked later are added by the kernel (`task_newtask`).
//! - `--exe NAME`: every process whose executable file name, `comm`, or `argv[0]` file name is
//!   NAME, now and whenever one is exec'd later.
//! - `--port N`: every process with a TCP socket listening on port N, now and whenever one
//!   starts listening on it or accepts a connection from it later.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
    sync::Arc,
};

use crate::stitch::span::{AttrValue, ProcessResource};

/// What the operator asked to trace.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub pids: Vec<u32>,
    pub exes: Vec<String>,
    pub ports: Vec<u16>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.exes.is_empty() && self.ports.is_empty()
    }
}

/// All PIDs currently on the host.
pub fn all_pids() -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Parent PID from /proc/PID/stat (the field after the parenthesised comm).
pub fn ppid(pid: u32) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// `pid` and all its living descendants.
pub fn with_descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for p in all_pids() {
        if let Some(pp) = ppid(p) {
            children.entry(pp).or_default().push(p);
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c.iter().copied());
        }
        i += 1;
    }
    out
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// The names a process answers to for `--exe`: executable file name, comm, argv[0] file name.
pub fn names(pid: u32) -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) {
        let s = exe.to_string_lossy();
        v.push(file_name(s.trim_end_matches(" (deleted)")).to_string());
    }
    if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) {
        v.push(comm.trim_end().to_string());
    }
    if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) {
        if let Some(a0) = cmd.split(|b| *b == 0).next() {
            v.push(file_name(&String::from_utf8_lossy(a0)).to_string());
        }
    }
    v
}

pub fn exe_matches(pid: u32, wanted: &[String]) -> bool {
    if wanted.is_empty() {
        return false;
    }
    let n = names(pid);
    // comm is truncated to 15 bytes by the kernel: compare a long wanted name by its prefix there.
    wanted.iter().any(|w| {
        n.iter()
            .any(|x| x == w || (x.len() == 15 && w.len() > 15 && w.starts_with(x.as_str())))
    })
}

/// Socket inodes listening on any of `ports` (from /proc/net/tcp and tcp6).
fn listening_inodes(ports: &[u16]) -> HashSet<u64> {
    let mut out = HashSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue; // 0A = TCP_LISTEN
            }
            let Some(port) = cols[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) else {
                continue;
            };
            if ports.contains(&port) {
                if let Ok(inode) = cols[9].parse() {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

fn holds_any_socket(pid: u32, inodes: &HashSet<u64>) -> bool {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.filter_map(|e| e.ok()).any(|e| {
        fs::read_link(e.path())
            .ok()
            .and_then(|l| {
                let s = l.to_string_lossy().into_owned();
                s.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok()
            })
            .is_some_and(|i| inodes.contains(&i))
    })
}

/// Processes matching `--exe` or `--port` right now (the `--pid` ones are handled by the caller).
pub fn scan(sel: &Selector, skip: &HashSet<u32>) -> Vec<u32> {
    if sel.exes.is_empty() && sel.ports.is_empty() {
        return Vec::new();
    }
    let own = std::process::id();
    let inodes = if sel.ports.is_empty() {
        HashSet::new()
    } else {
        listening_inodes(&sel.ports)
    };
    all_pids()
        .into_iter()
        .filter(|p| *p != own && !skip.contains(p))
        .filter(|&p| exe_matches(p, &sel.exes) || (!inodes.is_empty() && holds_any_socket(p, &inodes)))
        .collect()
}

/// Reads NAME=value pairs from /proc/PID/environ (only the ones asked for).
fn environ(pid: u32, keys: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(raw) = fs::read(format!("/proc/{pid}/environ")) else {
        return out;
    };
    for kv in raw.split(|b| *b == 0) {
        let s = String::from_utf8_lossy(kv);
        if let Some((k, v)) = s.split_once('=') {
            if keys.contains(&k) {
                out.insert(k.to_string(), v.to_string());
            }
        }
    }
    out
}

pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`k1=v1,k2=v2`, values percent-decoded).
pub fn parse_resource_attributes(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            Some((k.to_string(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Describes process `pid` as an OpenTelemetry resource. `service.name` is the process's own
/// `OTEL_SERVICE_NAME`, else `service.name` in its `OTEL_RESOURCE_ATTRIBUTES`, else its
/// executable name.
pub fn resource(pid: u32, host: &str) -> ProcessResource {
    let env = environ(pid, &["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"]);
    let exe_path = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .ok();
    let exe_name = exe_path
        .as_deref()
        .map(|p| file_name(p.trim_end_matches(" (deleted)")).to_string())
        .or_else(|| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim_end().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let from_attrs = env
        .get("OTEL_RESOURCE_ATTRIBUTES")
        .map(|s| parse_resource_attributes(s))
        .unwrap_or_default();
    let service_name = env
        .get("OTEL_SERVICE_NAME")
        .filter(|s| !s.is_empty())
        .cloned()
        .or_else(|| {
            from_attrs
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| exe_name.clone());
    let mut attributes = vec![
        ("service.name".to_string(), AttrValue::Str(service_name.clone())),
        ("process.pid".to_string(), AttrValue::Int(pid as i64)),
        ("process.executable.name".to_string(), AttrValue::Str(exe_name)),
    ];
    if let Some(p) = exe_path {
        attributes.push(("process.executable.path".to_string(), AttrValue::Str(p)));
    }
    if !host.is_empty() {
        attributes.push(("host.name".to_string(), AttrValue::Str(host.to_string())));
    }
    for (k, v) in from_attrs {
        if !attributes.iter().any(|(a, _)| *a == k) {
            attributes.push((k, AttrValue::Str(v)));
        }
    }
    ProcessResource {
        pid,
        service_name,
        attributes,
    }
}

/// Resources of traced processes, built once per process and dropped when it exits or execs.
#[derive(Default)]
pub struct Resources {
    host: String,
    by_pid: HashMap<u32, Arc<ProcessResource>>,
}

impl Resources {
    pub fn new() -> Self {
        Self {
            host: host_name(),
            by_pid: HashMap::new(),
        }
    }

    pub fn get(&mut self, pid: u32) -> Arc<ProcessResource> {
        if let Some(r) = self.by_pid.get(&pid) {
            return r.clone();
        }
        let r = Arc::new(resource(pid, &self.host));
        if self.by_pid.len() >= 8192 {
            self.by_pid.clear();
        }
        self.by_pid.insert(pid, r.clone());
        r
    }

    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_attributes_parse_and_decode() {
        let v = parse_resource_attributes("service.name=shop%20api, deployment.environment=prod,bad,=x");
        assert_eq!(
            v,
            vec![
                ("service.name".to_string(), "shop api".to_string()),
                ("deployment.environment".to_string(), "prod".to_string())
            ]
        );
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%2"), "a%2");
    }

    #[test]
    fn own_process_is_described() {
        let me = std::process::id();
        let r = resource(me, "h");
        assert_eq!(r.pid, me);
        assert!(
            r.attributes
                .iter()
                .any(|(k, v)| k == "process.pid" && *v == AttrValue::Int(me as i64))
        );
        assert!(!r.service_name.is_empty());
        assert!(with_descendants(me).contains(&me));
        assert_eq!(ppid(me), Some(std::os::unix::process::parent_id()));
    }

    #[test]
    fn child_processes_are_descendants_and_match_by_name() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let pid = child.id();
        assert!(with_descendants(std::process::id()).contains(&pid));
        assert!(exe_matches(pid, &["sleep".to_string()]));
        assert!(!exe_matches(pid, &["nginx".to_string()]));
        let found = scan(
            &Selector {
                exes: vec!["sleep".into()],
                ..Default::default()
            },
            &HashSet::new(),
        );
        assert!(found.contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn listening_port_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = scan(
            &Selector {
                ports: vec![port],
                ..Default::default()
            },
            &HashSet::new(),
        );
        // The test process itself is skipped as "own"; so check the inode lookup directly.
        assert!(found.is_empty() || !found.contains(&std::process::id()));
        let inodes = listening_inodes(&[port]);
        assert_eq!(inodes.len(), 1);
        assert!(holds_any_socket(std::process::id(), &inodes));
    }
}
