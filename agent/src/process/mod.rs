//! Which processes to trace (`--pid`, `--exe`, `--port`) and how to describe each one as an
//! OpenTelemetry resource.
//!
//! Selection rules:
//! - `--pid N`: process N **and its descendants** (an nginx master's workers, a gunicorn
//!   arbiter's workers). Children forked later are added by the kernel (`task_newtask`).
//! - `--exe NAME`: every process whose executable file name, `comm`, or `argv[0]` file name is
//!   NAME, now and whenever one is exec'd later.
//! - `--port N`: every process with a TCP socket listening on port N, in any network namespace,
//!   now and whenever one starts listening on it or accepts a connection from it later.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
    sync::Arc,
};

use rustc_hash::FxHashMap;

use crate::stitch::span::{Attr, AttrValue, ProcessResource};

mod listeners;

/// What the operator asked to trace.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub pids: Vec<u32>,
    pub exes: Vec<String>,
    pub ports: Vec<u16>,
    /// Never traced, even when selected (config rules with `trace: false`).
    pub exclude_exes: Vec<String>,
}

impl Selector {
    /// A config rule says never to trace this process.
    pub fn excludes(&self, pid: u32) -> bool {
        !self.exclude_exes.is_empty() && exe_matches(pid, &self.exclude_exes)
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.exes.is_empty() && self.ports.is_empty()
    }
}

/// Whether a kernel `comm` (an executable name cut to 15 bytes) is one of `exes`.
pub fn comm_matches(comm: &str, exes: &[String]) -> bool {
    !comm.is_empty() && exes.iter().any(|e| e.as_bytes()[..e.len().min(15)] == *comm.as_bytes())
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

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat, for a field after the parenthesised
/// comm (n ≥ 3).
fn stat_field(pid: u32, n: usize) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(n.checked_sub(3)?)?.parse().ok()
}

/// Parent PID (field 4 of /proc/PID/stat).
pub fn ppid(pid: u32) -> Option<u32> {
    stat_field(pid, 4).and_then(|v| u32::try_from(v).ok())
}

/// Virtual memory size in pages (the first field of /proc/PID/statm, far cheaper for the kernel
/// to produce than /proc/PID/stat). It changes whenever a mapping is added or removed, so an
/// unchanged value means /proc/PID/maps need not be read again.
pub fn vsize(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    s.split(' ').next()?.parse().ok()
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
    wanted.iter().any(|w| n.iter().any(|x| x == w || (x.len() == 15 && w.len() > 15 && w.starts_with(x.as_str()))))
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

/// How often a rescan looks at every process again, not only at those new since the last one.
const FULL_SCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Finds the processes that match `--exe` or `--port` (the `--pid` ones are handled by the
/// caller), remembering what it saw so that a rescan looks only at what changed.
///
/// The kernel side reports the processes that exec a watched name or listen on / accept from a
/// watched port, so the periodic /proc rescan is a fallback for what it could not report (records
/// lost to a full ring buffer, names the kernel's exec filter cannot hold). Reading three files
/// of every process, and every file descriptor of every process for `--port`, every 2 s grows
/// with the host. So a rescan examines only the PIDs that were not there at the last one, unless
/// a listener on a watched port appeared since (then every process's descriptors are read, to
/// find who holds it), the caller asks for a full scan (records were lost), or
/// [`FULL_SCAN_EVERY`] has passed (a PID reused between two scans).
#[derive(Default)]
pub struct Scanner {
    /// The PIDs that existed at the last scan.
    seen: HashSet<u32>,
    /// The listening sockets on watched ports seen since the last full scan.
    listeners: HashSet<u64>,
    last_full: Option<std::time::Instant>,
}

impl Scanner {
    /// The processes that match now and are not in `skip`; `full` examines every process.
    pub fn scan(&mut self, sel: &Selector, skip: &HashSet<u32>, full: bool) -> Vec<u32> {
        if sel.exes.is_empty() && sel.ports.is_empty() {
            return Vec::new();
        }
        let own = std::process::id();
        let pids: HashSet<u32> = all_pids().into_iter().collect();
        let new = || pids.iter().copied().filter(|p| !self.seen.contains(p));
        let listening = |among: &mut dyn Iterator<Item = u32>| {
            if sel.ports.is_empty() { HashSet::new() } else { listeners::listening_inodes(&sel.ports, among) }
        };
        let mut full = full || self.last_full.is_none_or(|t| t.elapsed() >= FULL_SCAN_EVERY);
        let mut inodes = HashSet::new();
        if !full {
            // The agent's network namespace and those of the new processes.
            inodes = listening(&mut new());
            full = !inodes.is_subset(&self.listeners);
        }
        if full {
            self.last_full = Some(std::time::Instant::now());
            // Every process's namespace.
            inodes = listening(&mut pids.iter().copied());
            self.listeners.clear();
        }
        let found = pids
            .iter()
            .copied()
            .filter(|p| *p != own && !skip.contains(p) && (full || !self.seen.contains(p)))
            .filter(|&p| exe_matches(p, &sel.exes) || (!inodes.is_empty() && holds_any_socket(p, &inodes)))
            .filter(|&p| !sel.excludes(p))
            .collect();
        self.listeners.extend(inodes);
        self.seen = pids;
        found
    }
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
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
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

/// Default `service.name` from a command line (`argv`) and the executable's file name, when the
/// process names no service itself:
/// - `java … -jar path/shop-1.2.jar` → `shop` (a trailing `-<version>` is dropped); `java … com.acme.Shop`
///   (main class) → `Shop`;
/// - interpreters (`python*`, `node`, `ruby`, `perl`, `php`, `bash`, `sh`, `dotnet`): the script's
///   file name without extension, `python3 app.py` → `app`, `node dist/server.js` → `server`,
///   `dotnet Shop.dll` → `Shop`; `python -m flask` → `flask`; a script named `index`, `main` or
///   `__main__` is named after its directory (`node api/index.js` → `api`);
/// - anything else: the executable's file name (`nginx`).
pub fn default_service_name(argv: &[String], exe_name: &str) -> String {
    let runtime = runtime_of(exe_name).or_else(|| argv.first().and_then(|a| runtime_of(file_name(a))));
    let from_args = match runtime {
        Some("java") => java_main(argv),
        Some(_) => script_name(argv),
        None => None,
    };
    from_args.filter(|s| !s.is_empty()).unwrap_or_else(|| exe_name.to_string())
}

/// `process.runtime.name` for the interpreters Waybill recognises from the executable name.
pub fn runtime_of(exe_name: &str) -> Option<&'static str> {
    let n = exe_name;
    let py = n.strip_prefix("python").is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'));
    Some(match n {
        _ if py => "cpython",
        "java" => "java",
        "node" | "nodejs" => "nodejs",
        "ruby" => "ruby",
        "perl" => "perl",
        "php" | "php-fpm" => "php",
        "dotnet" => "dotnet",
        "bash" | "sh" | "dash" => "shell",
        _ => return None,
    })
}

fn stem(path: &str) -> (String, Option<String>) {
    let name = file_name(path);
    let stem = match name.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s,
        _ => name,
    };
    let parent = path
        .rsplit_once('/')
        .map(|(dir, _)| file_name(dir).to_string())
        .filter(|d| !d.is_empty() && d != "." && d != "..");
    (stem.to_string(), parent)
}

fn script_name(argv: &[String]) -> Option<String> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "-m" {
            return it.next().map(|m| m.rsplit('.').next().unwrap_or(m).to_string());
        }
        if a == "-c" || a == "-e" {
            return None;
        }
        if a.starts_with('-') {
            continue;
        }
        let (stem, parent) = stem(a);
        return Some(match (stem.as_str(), parent) {
            ("index" | "main" | "__main__", Some(dir)) => dir,
            _ => stem,
        });
    }
    None
}

fn java_main(argv: &[String]) -> Option<String> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "-jar" {
            let (stem, _) = stem(it.next()?);
            // shop-1.2.3 → shop
            let name = match stem.rsplit_once('-') {
                Some((base, v)) if v.starts_with(|c: char| c.is_ascii_digit()) && !base.is_empty() => base,
                _ => stem.as_str(),
            };
            return Some(name.to_string());
        }
        if matches!(a.as_str(), "-cp" | "-classpath" | "--class-path" | "-p" | "--module-path") {
            it.next();
            continue;
        }
        if a.starts_with('-') {
            continue;
        }
        return Some(a.rsplit('.').next().unwrap_or(a).to_string());
    }
    None
}

/// `process.command_line`: the arguments joined with spaces, with secrets replaced by
/// `REDACTED`: the value of `--password=…`-style arguments and the argument after a
/// `--password`-style flag (names as for URL query parameters, see
/// `waybill_protocols::redact::name_is_sensitive`), values that look like credentials (JWTs…),
/// the password of `scheme://user:password@host` URLs and secret-looking values in their query
/// strings (as for `url.full`), and — for an argument holding a quoted string (SQL given to
/// `psql -c`, a script given to `sh -c`) — every quoted string and number, as in `db.query.text`
/// (`SELECT ?/?, ?`).
pub fn redact_command_line(argv: &[String]) -> String {
    use waybill_protocols::redact::{REDACTED, name_is_sensitive, value_looks_sensitive};
    let mut out: Vec<String> = Vec::with_capacity(argv.len());
    let mut redact_next = false;
    for a in argv {
        if std::mem::take(&mut redact_next) && !a.starts_with('-') {
            out.push(REDACTED.to_string());
            continue;
        }
        let flag = a.trim_start_matches('-');
        if a.starts_with('-') && !flag.is_empty() {
            match flag.split_once('=') {
                Some((name, _)) if name_is_sensitive(name) => {
                    out.push(format!("{}={REDACTED}", &a[..a.len() - flag.len() + name.len()]));
                    continue;
                }
                None if name_is_sensitive(flag) => redact_next = true,
                _ => {}
            }
        } else if let Some((name, _)) = a.split_once('=') {
            // KEY=value (env-style arguments).
            if !name.contains('/') && name_is_sensitive(name) {
                out.push(format!("{name}={REDACTED}"));
                continue;
            }
        }
        if !a.contains("://") && value_looks_sensitive(a) {
            out.push(REDACTED.to_string());
            continue;
        }
        if !a.contains("://") && (a.contains('\'') || a.contains('"')) {
            out.push(waybill_protocols::sql::redact(a));
            continue;
        }
        out.push(redact_url(a));
    }
    out.join(" ")
}

/// A URL argument: password → `REDACTED`, query string as in `url.full`.
fn redact_url(a: &str) -> String {
    let Some(i) = a.find("://") else {
        return a.to_string();
    };
    if let Some(q) = a.find('?') {
        let (head, query) = a.split_at(q);
        let (query, frag) = query[1..].split_once('#').map_or((&query[1..], None), |(q, f)| (q, Some(f)));
        let mut out = format!("{}?{}", redact_url(head), waybill_protocols::redact::redact_query(query));
        if let Some(f) = frag {
            out.push('#');
            out.push_str(f);
        }
        return out;
    }
    let rest = &a[i + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..auth_end].rfind('@') else {
        return a.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{}{user}:{}{}", &a[..i + 3], waybill_protocols::redact::REDACTED, &rest[at..]),
        None => a.to_string(),
    }
}

/// The container id in `/proc/PID/cgroup` content (Docker, containerd/CRI, CRI-O, Podman): the
/// last 64-hex-digit path segment (after stripping `docker-`, `cri-containerd-`, `crio-`,
/// `libpod-` prefixes and a `.scope` suffix).
pub fn container_id(cgroup: &str) -> Option<String> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    cgroup.lines().rev().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.rsplit('/').find_map(|seg| {
            let seg = seg.strip_suffix(".scope").unwrap_or(seg);
            let id = seg.rsplit('-').next().unwrap_or(seg);
            is_id(id).then(|| id.to_ascii_lowercase())
        })
    })
}

/// `host.arch` as the semantic conventions spell it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "x86",
        "arm" => "arm32",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        other => other,
    }
}

fn argv(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Process start time in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_ticks(pid: u32) -> Option<u64> {
    stat_field(pid, 22)
}

/// Describes process `pid` as an OpenTelemetry resource. `service.name` is the process's own
/// `OTEL_SERVICE_NAME`, else `service.name` in its `OTEL_RESOURCE_ATTRIBUTES`, else
/// [`default_service_name`] of its command line. Attributes: `service.name`,
/// `service.instance.id` (`<host>/<pid>/<start ticks>`: one per process incarnation),
/// `process.pid`, `process.executable.name`, `process.executable.path`, `process.command_line`
/// (redacted), `process.runtime.name` (for recognised interpreters), `host.name`, `host.arch`,
/// `os.type`, `container.id` (when the cgroup names one); then `node` (the agent's own
/// `OTEL_RESOURCE_ATTRIBUTES`: cluster, node, environment), then the process's own
/// `OTEL_RESOURCE_ATTRIBUTES`; each wins over what comes before it, except `process.pid` and
/// `service.name`, which are the process's.
///
/// `comm`: the name the kernel reported at exec, used when the process is already gone (a
/// short-lived `psql -c`) and /proc no longer describes it.
pub fn resource(pid: u32, host: &str, node: &[(String, String)], comm: Option<&str>) -> ProcessResource {
    let env = environ(pid, &["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"]);
    let exe_path = fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.to_string_lossy().into_owned()).ok();
    let exe_name = exe_path
        .as_deref()
        .map(|p| file_name(p.trim_end_matches(" (deleted)")).to_string())
        .or_else(|| fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_string()))
        .or_else(|| comm.map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string());
    let args = argv(pid);
    let from_attrs = env.get("OTEL_RESOURCE_ATTRIBUTES").map(|s| parse_resource_attributes(s)).unwrap_or_default();
    let service_name = env
        .get("OTEL_SERVICE_NAME")
        .filter(|s| !s.is_empty())
        .cloned()
        .or_else(|| from_attrs.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone()))
        .unwrap_or_else(|| default_service_name(&args, &exe_name));
    let runtime = runtime_of(&exe_name);
    let mut attributes: Vec<Attr> = vec![
        ("service.name".into(), service_name.clone().into()),
        ("service.instance.id".into(), format!("{host}/{pid}/{}", start_ticks(pid).unwrap_or(0)).into()),
        ("process.pid".into(), AttrValue::Int(pid as i64)),
        ("process.executable.name".into(), exe_name.into()),
    ];
    if let Some(p) = exe_path {
        attributes.push(("process.executable.path".into(), AttrValue::Str(p.into())));
    }
    if !args.is_empty() {
        attributes.push(("process.command_line".into(), AttrValue::Str(redact_command_line(&args).into())));
    }
    if let Some(r) = runtime {
        attributes.push(("process.runtime.name".into(), AttrValue::Str(r.into())));
    }
    if !host.is_empty() {
        attributes.push(("host.name".into(), AttrValue::Str(host.to_string().into())));
    }
    attributes.push(("host.arch".into(), AttrValue::Str(host_arch().into())));
    attributes.push(("os.type".into(), AttrValue::Str("linux".into())));
    if let Some(id) = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok().and_then(|c| container_id(&c)) {
        attributes.push(("container.id".into(), AttrValue::Str(id.into())));
    }
    for (k, v) in node.iter().cloned().chain(from_attrs) {
        if k == "process.pid" || k == "service.name" {
            continue;
        }
        match attributes.iter_mut().find(|(a, _)| *a == k) {
            Some(slot) => slot.1 = v.into(),
            None => attributes.push((k.into(), v.into())),
        }
    }
    ProcessResource { pid, service_name, attributes }
}

/// Resources of traced processes, built once per process and dropped when it exits or execs.
#[derive(Default)]
pub struct Resources {
    host: String,
    /// The agent's own `OTEL_RESOURCE_ATTRIBUTES`: defaults for every traced process.
    node: Vec<(String, String)>,
    /// `comm` from the kernel's exec record, for processes gone before they were described.
    comms: FxHashMap<u32, String>,
    /// The parent of a forked process, from the kernel's fork record: a child gone before it
    /// was described (a PostgreSQL backend of a short connection) is its parent's program.
    parents: FxHashMap<u32, u32>,
    /// FxHash (as `comms`): keyed by pid, looked up for every span.
    by_pid: FxHashMap<u32, Arc<ProcessResource>>,
}

impl Resources {
    pub fn new() -> Self {
        let node = std::env::var("OTEL_RESOURCE_ATTRIBUTES").map(|v| parse_resource_attributes(&v)).unwrap_or_default();
        Self {
            host: host_name(),
            node,
            comms: FxHashMap::default(),
            parents: FxHashMap::default(),
            by_pid: FxHashMap::default(),
        }
    }

    pub fn get(&mut self, pid: u32) -> Arc<ProcessResource> {
        if let Some(r) = self.by_pid.get(&pid) {
            return r.clone();
        }
        // (Taken out of the map: the answer is kept in `by_pid`, and a chain of parents met
        // again through a reused pid cannot loop.)
        let r = match self.parents.remove(&pid) {
            // Gone already and never exec'd (an exec record forgets the parent): a fork shares
            // its parent's program, command line and environment.
            Some(parent) if parent != pid && fs::metadata(format!("/proc/{pid}")).is_err() => {
                let p = self.get(parent);
                let mut attributes = p.attributes.clone();
                for (k, v) in attributes.iter_mut() {
                    match k.as_ref() {
                        "process.pid" => *v = AttrValue::Int(pid as i64),
                        "service.instance.id" => *v = format!("{}/{pid}/0", self.host).into(),
                        _ => {}
                    }
                }
                Arc::new(ProcessResource { pid, service_name: p.service_name.clone(), attributes })
            }
            _ => Arc::new(resource(pid, &self.host, &self.node, self.comms.get(&pid).map(String::as_str))),
        };
        if self.by_pid.len() >= 8192 {
            self.by_pid.clear();
        }
        self.by_pid.insert(pid, r.clone());
        r
    }

    /// The kernel's name for `pid` at its exec (a fallback for [`resource`]).
    pub fn set_comm(&mut self, pid: u32, comm: String) {
        if self.comms.len() >= 8192 {
            self.comms.clear();
        }
        self.comms.insert(pid, comm);
    }

    /// `pid` was forked by `parent` (a fallback for a child gone before it is described).
    pub fn set_parent(&mut self, pid: u32, parent: u32) {
        if self.parents.len() >= 8192 {
            self.parents.clear();
        }
        self.parents.insert(pid, parent);
    }

    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
        self.comms.remove(&pid);
        self.parents.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fork_gone_before_it_is_described_is_its_parents_program() {
        let parent = std::process::id();
        let gone = 4_000_000_000; // above any pid_max: no /proc entry
        let mut rs = Resources::new();
        rs.set_parent(gone, parent);
        let child = rs.get(gone);
        let own = rs.get(parent);
        assert_eq!(child.pid, gone);
        assert_eq!(child.service_name, own.service_name);
        let attr = |r: &ProcessResource, k: &str| r.attributes.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        assert_eq!(attr(&child, "process.pid"), Some(AttrValue::Int(gone as i64)));
        assert_eq!(attr(&child, "process.executable.name"), attr(&own, "process.executable.name"));
        assert_ne!(attr(&child, "service.instance.id"), attr(&own, "service.instance.id"));
        // Without the fork record it is described as before: by what /proc and the kernel said.
        let mut fresh = Resources::new();
        assert_eq!(
            fresh.get(gone).attributes.iter().find(|(a, _)| a == "process.executable.name").map(|(_, v)| v.clone()),
            Some(AttrValue::Str("unknown".into()))
        );
    }

    #[test]
    fn kernel_comms_match_exe_names_cut_to_15_bytes() {
        let exes = vec!["psql".to_string(), "a-very-long-program-name".to_string()];
        assert!(comm_matches("psql", &exes));
        assert!(comm_matches("a-very-long-pro", &exes));
        assert!(!comm_matches("psq", &exes) && !comm_matches("", &exes) && !comm_matches("a-very-long-program", &exes));
    }

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

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn default_service_names() {
        let n = |cmd: &str, exe: &str| default_service_name(&args(cmd), exe);
        assert_eq!(n("java -Xmx1g -jar /opt/shop-1.2.3.jar --port 8080", "java"), "shop");
        assert_eq!(n("java -jar app.jar", "java"), "app");
        assert_eq!(n("java -cp lib/* com.acme.Billing", "java"), "Billing");
        assert_eq!(n("python3 app.py", "python3.11"), "app");
        assert_eq!(n("python3 -u /srv/manage.py runserver", "python3.11"), "manage");
        assert_eq!(n("python -m flask run", "python3.12"), "flask");
        assert_eq!(n("python3 -c print(1)", "python3"), "python3");
        assert_eq!(n("/usr/bin/python3 /usr/bin/gunicorn app:app", "python3.11"), "gunicorn");
        assert_eq!(n("node dist/server.js", "node"), "server");
        assert_eq!(n("node api/index.js", "node"), "api");
        assert_eq!(n("dotnet Shop.dll", "dotnet"), "Shop");
        assert_eq!(n("nginx: worker process", "nginx"), "nginx");
        assert_eq!(n("python3", "python3"), "python3");
        assert_eq!(runtime_of("python3.11"), Some("cpython"));
        assert_eq!(runtime_of("pythonista"), None);
        assert_eq!(runtime_of("nginx"), None);
    }

    #[test]
    fn command_lines_are_redacted() {
        let r = |cmd: &str| redact_command_line(&args(cmd));
        assert_eq!(r("app --password hunter2 --port 80"), "app --password REDACTED --port 80");
        assert_eq!(r("app --api-key=abc123 -v"), "app --api-key=REDACTED -v");
        assert_eq!(r("app DB_PASSWORD=x USER=bob"), "app DB_PASSWORD=REDACTED USER=bob");
        assert_eq!(r("worker postgres://app:s3cret@db:5432/shop"), "worker postgres://app:REDACTED@db:5432/shop");
        assert_eq!(r("curl http://host/a@b"), "curl http://host/a@b");
        assert_eq!(r("python3 app.py 8080"), "python3 app.py 8080");
        assert_eq!(r("app --token --verbose"), "app --token --verbose");
        assert_eq!(
            r("curl -s http://u:pw@h:80/x?page=2&token=abc#f"),
            "curl -s http://u:REDACTED@h:80/x?page=2&token=REDACTED#f"
        );
        let argv: Vec<String> =
            ["psql", "-d", "shop", "-c", "SELECT 1/0, 'secret' FROM t WHERE id = 42"].map(String::from).to_vec();
        assert_eq!(redact_command_line(&argv), "psql -d shop -c SELECT ?/?, ? FROM t WHERE id = ?");
    }

    #[test]
    fn container_ids_from_cgroups() {
        let id = "3f4b2c1d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
        for cg in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:pids:/docker/{id}\n0::/docker/{id}\n"),
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-{id}.scope"
            ),
            format!("0::/machine.slice/libpod-{id}.scope/container"),
            format!("0::/kubepods/burstable/pod7/crio-{id}.scope"),
        ] {
            assert_eq!(container_id(&cg).as_deref(), Some(id), "{cg}");
        }
        assert_eq!(container_id("0::/user.slice/user-1000.slice/session-2.scope\n"), None);
        assert_eq!(container_id(""), None);
    }

    #[test]
    fn own_process_is_described() {
        let me = std::process::id();
        let node = [("k8s.node.name".to_string(), "n1".to_string()), ("service.name".to_string(), "agent".to_string())];
        let r = resource(me, "h", &node, None);
        assert!(r.attributes.contains(&("k8s.node.name".into(), AttrValue::Str("n1".into()))));
        assert_ne!(r.service_name, "agent", "the agent's service.name is not the process's");
        assert_eq!(r.pid, me);
        assert!(r.attributes.iter().any(|(k, v)| k == "process.pid" && *v == AttrValue::Int(me as i64)));
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
        let sel = Selector { exes: vec!["sleep".into()], ..Default::default() };
        let mut scanner = Scanner::default();
        assert!(scanner.scan(&sel, &HashSet::new(), false).contains(&pid));
        // A rescan looks only at processes new since the last one, unless asked for all.
        let mut second = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let found = scanner.scan(&sel, &HashSet::new(), false);
        assert!(found.contains(&second.id()) && !found.contains(&pid), "{found:?}");
        let found = scanner.scan(&sel, &HashSet::new(), true);
        assert!(found.contains(&second.id()) && found.contains(&pid), "{found:?}");
        for c in [&mut child, &mut second] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A process already seen by a rescan that starts listening on a watched port later is
    /// found by the next one: a new listener makes the rescan read every process's descriptors.
    #[test]
    fn listening_port_is_found_even_on_a_process_seen_before() {
        use std::io::{BufRead, Write};
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = std::process::Command::new("python3")
            .args(["-c", "import socket,sys\nsys.stdin.readline()\ns=socket.socket()\ns.bind(('127.0.0.1',int(sys.argv[1])))\ns.listen()\nprint('up',flush=True)\nsys.stdin.readline()", &port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let pid = child.id();
        let sel = Selector { ports: vec![port], ..Default::default() };
        let mut scanner = Scanner::default();
        assert!(!scanner.scan(&sel, &HashSet::new(), false).contains(&pid), "not listening yet");
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "up");
        assert!(scanner.scan(&sel, &HashSet::new(), false).contains(&pid));
        // Nothing new: the next rescan reads no descriptors and finds nobody new.
        assert!(scanner.scan(&sel, &HashSet::from([pid]), false).is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn own_listening_socket_is_held_by_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // The agent never traces itself.
        let found =
            Scanner::default().scan(&Selector { ports: vec![port], ..Default::default() }, &HashSet::new(), true);
        assert!(!found.contains(&std::process::id()));
        let inodes = listeners::listening_inodes(&[port], []);
        assert_eq!(inodes.len(), 1);
        assert!(holds_any_socket(std::process::id(), &inodes));
    }
}
