//! `cargo xtask vm-test`: the release agent on another kernel, in a QEMU guest.
//!
//! 1. Downloads a Debian kernel package once (`apt-get download`, never installed) into
//!    target/vm/debs and unpacks it with `dpkg -x` into target/vm/kernels/PACKAGE.
//! 2. Builds an uncompressed initramfs (written here, no cpio tool): busybox-static, the
//!    virtio/9p/overlay modules of that kernel in dependency order (`depmod -b`, then
//!    modules.dep), xtask/vm/init and the guest script xtask/vm/guest-test.sh.
//! 3. Boots it (TCG unless the CPU really has vmx/svm): the guest mounts the host's `/`
//!    read-only over 9p with a tmpfs overlay and target/vm/scratch read-write, and runs the
//!    host-built target/release/waybill there: `waybill check`, then a real trace of
//!    tests/apps/http_server.py with `waybill run --pid` in terminal mode.
//! 4. Asserts on what the guest recorded in the scratch dir and prints a PASS/FAIL summary.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

/// Host packages the VM test needs; `vm-test` installs the missing ones.
pub const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils", "zstd", "python3"];

/// Modules the guest init needs (with their dependencies); built-in ones are skipped.
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

const GUEST_INIT: &str = include_str!("../vm/init");
const GUEST_SCRIPT: &str = include_str!("../vm/guest-test.sh");

/// The port the test app listens on inside the guest (its own network stack).
const GUEST_PORT: u16 = 18080;

#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Debian kernel package (e.g. linux-image-6.1.0-57-amd64), or a version shorthand
    /// (`6.1`, `6.12`) for the newest such amd64 package apt knows.
    #[arg(long, default_value = "6.1")]
    pub kernel: String,
    /// Timeout for the whole guest run, in seconds.
    #[arg(long, default_value_t = 420)]
    pub timeout: u64,
    /// Do not build: use the existing target/release/waybill.
    #[arg(long)]
    pub no_build: bool,
}

/// Resolves `--kernel`: a full package name is used as is; a shorthand picks the newest
/// matching plain amd64 flavour (not cloud/rt/dbg/unsigned) among `names`.
pub fn pick_kernel(spec: &str, names: &[&str]) -> Option<String> {
    if spec.starts_with("linux-image-") {
        return Some(spec.to_string());
    }
    let key = |middle: &str| -> Vec<u64> {
        middle.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
    };
    names
        .iter()
        .filter_map(|n| {
            let middle = n.strip_prefix("linux-image-")?.strip_suffix("-amd64")?;
            let rest = middle.strip_prefix(spec)?;
            let plain = rest.replacen("+deb", "", 1);
            let ok = rest.starts_with(['.', '-']) && plain.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-');
            ok.then(|| (key(middle), n.to_string()))
        })
        .max()
        .map(|(_, n)| n)
}

fn apt_names(prefix: &str) -> Vec<String> {
    Command::new("apt-cache")
        .args(["pkgnames", prefix])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
        .unwrap_or_default()
}

fn resolve_kernel(spec: &str) -> Result<String> {
    if spec.starts_with("linux-image-") {
        return Ok(spec.to_string());
    }
    let prefix = format!("linux-image-{spec}");
    let mut names = apt_names(&prefix);
    if pick_kernel(spec, &names.iter().map(String::as_str).collect::<Vec<_>>()).is_none() {
        super::run(Command::new("apt-get").args(["update", "-qq"]))?;
        names = apt_names(&prefix);
    }
    pick_kernel(spec, &names.iter().map(String::as_str).collect::<Vec<_>>()).with_context(|| {
        format!("apt knows no {prefix}*-amd64 kernel package: pass --kernel linux-image-…-amd64 explicitly")
    })
}

/// A kernel unpacked under target/vm/kernels.
struct Kernel {
    package: String,
    release: String,
    vmlinuz: PathBuf,
    root: PathBuf,
}

fn fetch_kernel(vm: &Path, package: &str) -> Result<Kernel> {
    let debs = vm.join("debs");
    let dir = vm.join("kernels").join(package);
    let done = dir.join(".unpacked");
    if !done.exists() {
        fs::create_dir_all(&debs)?;
        let find_deb = || -> Option<PathBuf> {
            fs::read_dir(&debs).ok()?.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with("_amd64.deb"))
            })
        };
        let deb = match find_deb() {
            Some(d) => d,
            None => {
                eprintln!("xtask: vm-test: downloading {package}");
                let t = Instant::now();
                let status = Command::new("apt-get").arg("download").arg(package).current_dir(&debs).status()?;
                if !status.success() {
                    super::run(Command::new("apt-get").args(["update", "-qq"]))?;
                    super::run(Command::new("apt-get").arg("download").arg(package).current_dir(&debs))?;
                }
                eprintln!("xtask: vm-test: downloaded in {:.1}s", t.elapsed().as_secs_f64());
                find_deb().context("apt-get download left no .deb")?
            }
        };
        let _ = fs::remove_dir_all(&dir);
        let root = dir.join("root");
        fs::create_dir_all(&root)?;
        super::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        fs::write(&done, b"")?;
    }
    let root = dir.join("root");
    let modules = root.join("lib/modules");
    let release = fs::read_dir(&modules)
        .with_context(|| format!("{} has no lib/modules", root.display()))?
        .flatten()
        .find_map(|e| e.file_name().to_str().map(str::to_string))
        .context("no kernel release under lib/modules")?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} is missing", vmlinuz.display());
    }
    Ok(Kernel { package: package.to_string(), release, vmlinuz, root })
}

/// The modules to insmod, dependencies first, as paths relative to lib/modules/RELEASE.
/// `dep` is modules.dep, `builtin` modules.builtin. Built-in modules are skipped.
pub fn module_load_order(dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let name_of = |path: &str| -> String {
        let base = path.rsplit('/').next().unwrap_or(path);
        base.split(".ko").next().unwrap_or(base).replace('-', "_")
    };
    let deps: Vec<(String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m.trim().to_string(), d.split_whitespace().map(str::to_string).collect()))
        })
        .collect();
    let builtin: Vec<String> = builtin.lines().map(name_of).collect();
    fn visit(m: &str, deps: &[(String, Vec<String>)], out: &mut Vec<String>) {
        if out.iter().any(|o| o == m) {
            return;
        }
        if let Some((_, d)) = deps.iter().find(|(k, _)| k == m) {
            // modules.dep lists the dependencies transitively, in reverse load order.
            for x in d.iter().rev() {
                visit(x, deps, out);
            }
        }
        out.push(m.to_string());
    }
    let mut out = Vec::new();
    for w in wanted {
        let w = w.replace('-', "_");
        match deps.iter().find(|(k, _)| name_of(k) == w) {
            Some((k, _)) => visit(k, &deps, &mut out),
            None if builtin.contains(&w) => {}
            None => bail!("module {w} is neither in modules.dep nor built in"),
        }
    }
    Ok(out)
}

/// A `newc` cpio archive (what the kernel unpacks as initramfs; uncompressed is fine).
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        let mut h = String::from("070701");
        for f in fields {
            let _ = write!(h, "{f:08x}");
        }
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, data: &[u8], exec: bool) {
        self.entry(name, if exec { 0o100755 } else { 0o100644 }, data, (0, 0));
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

fn build_initramfs(k: &Kernel, script: &str) -> Result<Vec<u8>> {
    let mdir = k.root.join("lib/modules").join(&k.release);
    if !mdir.join("modules.dep").exists() {
        super::run(Command::new("depmod").arg("-b").arg(&k.root).arg(&k.release))?;
    }
    let dep = fs::read_to_string(mdir.join("modules.dep"))?;
    let builtin = fs::read_to_string(mdir.join("modules.builtin")).unwrap_or_default();
    let order = module_load_order(&dep, &builtin, MODULES)?;

    let busybox = fs::read("/bin/busybox").context("/bin/busybox (busybox-static) is missing")?;
    let mut c = Cpio::default();
    for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "mnt", "etc"] {
        c.dir(d);
    }
    for d in ["newroot", "vmtest", "lib", "lib/modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.file("bin/busybox", &busybox, true);
    c.file("init", GUEST_INIT.as_bytes(), true);
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", false);
    c.file("etc/group", b"root:x:0:\n", false);
    let mut list = String::new();
    for m in &order {
        let base = m.rsplit('/').next().unwrap_or(m);
        let base = base.split(".ko").next().unwrap_or(base).to_string() + ".ko";
        c.file(&format!("lib/modules/{base}"), &read_module(&mdir.join(m))?, false);
        list.push_str(&base);
        list.push('\n');
    }
    c.file("lib/modules/load.list", list.as_bytes(), false);
    c.file("vmtest/cmd", script.as_bytes(), false);
    Ok(c.finish())
}

fn kvm_usable() -> bool {
    let cpu = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpu.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

fn ensure_qemu() -> Result<()> {
    super::apt_install(VM_PACKAGES)?;
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bail!(
            "vm-test: qemu-system-x86_64 is not available and could not be installed \
             (apt-get install qemu-system-x86); the VM test cannot run on this machine"
        );
    }
    Ok(())
}

/// What the guest recorded, read back from the scratch dir and the serial logs.
#[derive(Debug, Default)]
pub struct GuestResult {
    pub console: String,
    pub check_rc: Option<i32>,
    pub check_out: String,
    pub app_pid: Option<u32>,
    pub client_out: String,
    pub agent_rc: Option<i32>,
    pub agent_out: String,
    pub agent_err: String,
}

/// One expected trace, in request order.
pub struct ExpectedTrace {
    pub name: &'static str,
    pub code: u16,
}

pub const EXPECTED_TRACES: &[ExpectedTrace] = &[
    ExpectedTrace { name: "GET /users/{id}", code: 200 },
    ExpectedTrace { name: "GET /users/{id}", code: 200 },
    ExpectedTrace { name: "POST /orders", code: 201 },
    ExpectedTrace { name: "GET /missing", code: 404 },
];

/// Every assertion, as (what, passed, detail).
pub fn evaluate(r: &GuestResult, release: &str) -> Vec<(String, bool, String)> {
    let mut v: Vec<(String, bool, String)> = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| v.push((what.to_string(), ok, detail));
    let exit = r.console.lines().find_map(|l| l.split("VMTEST_EXIT=").nth(1)).map(|s| s.split_whitespace().next());
    let exit = exit.flatten().unwrap_or("none");
    check("guest booted and ran the test script", exit == "0", format!("VMTEST_EXIT={exit}"));
    check("waybill check exited 0", r.check_rc == Some(0), format!("rc {:?}", r.check_rc));
    let line = |name: &str| -> String {
        r.check_out.lines().find(|l| l.trim_start().starts_with(name)).map(|l| l.trim().to_string()).unwrap_or_default()
    };
    let kline = line("kernel");
    check("check reports the guest kernel", kline.contains(release), kline);
    for (name, want) in [
        ("BTF (/sys/kernel/btf/vmlinux)", true),
        ("tracepoints", true),
        ("kprobes", true),
        ("fentry", true),
        ("ring buffer map", true),
    ] {
        let l = line(name);
        let avail = l.strip_prefix(name).map(|rest| rest.split_whitespace().next() == Some("yes"));
        let what = format!("check: {name} {}", if want { "AVAILABLE" } else { "unavailable" });
        check(&what, avail == Some(want), if l.is_empty() { "no such line".into() } else { l });
    }
    let data = line("socket data");
    check("check: socket data through the sys_exit raw tracepoint", data.contains("raw tracepoint sys_exit"), data);
    let walk = line("fd → TCP 4-tuple");
    check("check: fd walk with offsets from BTF at load time", walk.contains("offsets from BTF"), walk);
    let accel = line("accelerators");
    check(
        "check: accelerators line names fentry available, tracepoints in use",
        accel.contains("fentry available") && accel.contains("tracepoints in use"),
        accel,
    );

    let attached = r.agent_err.lines().find(|l| l.contains("eBPF programs attached")).unwrap_or("").trim();
    check(
        "waybill run attached every hook (skipped=0)",
        attached.contains("hooks=") && attached.ends_with("skipped=0"),
        if attached.is_empty() { "no 'eBPF programs attached' line".into() } else { attached.to_string() },
    );
    check("waybill run exited 0 after SIGINT", r.agent_rc == Some(0), format!("rc {:?}", r.agent_rc));
    let sent = r.client_out.lines().count();
    check("client got its responses", sent == EXPECTED_TRACES.len(), r.client_out.trim().replace('\n', "; "));
    let traces: Vec<&str> = r.agent_out.lines().filter(|l| l.starts_with("Trace ")).collect();
    check(
        &format!("exactly {} traces printed", EXPECTED_TRACES.len()),
        traces.len() == EXPECTED_TRACES.len(),
        format!("{} Trace lines", traces.len()),
    );
    let pid = r.app_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
    for (i, e) in EXPECTED_TRACES.iter().enumerate() {
        let got = traces.get(i).copied().unwrap_or("");
        let ok = got.contains(&format!("  {}  ", e.name)) && got.contains(&format!("(pid {pid})  {}", e.code));
        check(&format!("trace {}: {} {} (pid {pid})", i + 1, e.name, e.code), ok, got.to_string());
    }
    v
}

fn read_opt(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

fn parse_rc(s: &str) -> Option<i32> {
    s.trim().parse().ok()
}

/// Boots `package` (or a shorthand) and runs the guest test with `bin`.
pub fn vm_test(root: &Path, bin: &Path, args: &VmArgs) -> Result<()> {
    let t0 = Instant::now();
    if !super::is_root() {
        bail!("vm-test needs root (apt-get, and the 9p share writes as root)");
    }
    ensure_qemu()?;
    if !bin.exists() {
        bail!("{} does not exist: run `cargo xtask build --release`", bin.display());
    }
    let vm = root.join("target/vm");
    let package = resolve_kernel(&args.kernel)?;
    let k = fetch_kernel(&vm, &package)?;
    eprintln!("xtask: vm-test: kernel {} ({}), setup {:.1}s", k.package, k.release, t0.elapsed().as_secs_f64());

    let run_dir = vm.join("run").join(&k.package);
    let scratch = run_dir.join("scratch");
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&scratch)?;
    let root_abs = fs::canonicalize(root)?;
    let bin_abs = fs::canonicalize(bin)?;
    let scratch_abs = fs::canonicalize(&scratch)?;
    let script = format!(
        "REPO='{}'\nBIN='{}'\nSCRATCH='{}'\nPORT={GUEST_PORT}\n{GUEST_SCRIPT}",
        root_abs.display(),
        bin_abs.display(),
        scratch_abs.display()
    );
    let initrd = run_dir.join("initramfs.cpio");
    fs::write(&initrd, build_initramfs(&k, &script)?)?;
    let console = run_dir.join("console.log");
    let guest = run_dir.join("guest.log");

    let kvm = match std::env::var("WAYBILL_VM_ACCEL").as_deref() {
        Ok("kvm") => true,
        Ok("tcg") => false,
        _ => kvm_usable(),
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-m", "2G", "-smp", "2"])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"])
        // The repository again, at its own path: the guest puts tmpfs on /tmp, /run… and a
        // clone may live there (CI's does).
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=repo,security_model=none,readonly=on,multidevs=remap",
            root_abs.display()
        ))
        .arg("-virtfs")
        .arg(format!("local,path={},mount_tag=rw0,security_model=none,multidevs=remap", scratch_abs.display()))
        .args(if kvm { ["-accel", "kvm", "-cpu", "host"] } else { ["-accel", "tcg,thread=multi", "-cpu", "max"] })
        .args(["-M", "q35", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", guest.display()))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 oops=panic vmtest.rw=repo:{},rw0:{}",
            root_abs.display(),
            scratch_abs.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    eprintln!(
        "xtask: vm-test: booting {} under {} (guest output: {})",
        k.release,
        if kvm { "KVM" } else { "TCG (software emulation, slow)" },
        guest.display()
    );
    let boot = Instant::now();
    let mut child = qemu.spawn().context("could not start qemu-system-x86_64")?;
    let deadline = boot + Duration::from_secs(args.timeout);
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let vm_secs = boot.elapsed().as_secs_f64();
    let mut qemu_err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut qemu_err);
    }

    let guest_log = read_opt(&guest);
    let r = GuestResult {
        console: read_opt(&console),
        check_rc: parse_rc(&read_opt(&scratch.join("check.rc"))),
        check_out: read_opt(&scratch.join("check.out")),
        app_pid: read_opt(&scratch.join("app.pid")).trim().parse().ok(),
        client_out: read_opt(&scratch.join("client.out")),
        agent_rc: parse_rc(&read_opt(&scratch.join("agent.rc"))),
        agent_out: read_opt(&scratch.join("agent.out")),
        agent_err: read_opt(&scratch.join("agent.err")),
    };
    println!("===== guest output ({}) =====\n{}", k.release, guest_log.trim_end());
    let results = evaluate(&r, &k.release);
    let failed = results.iter().filter(|(_, ok, _)| !ok).count();
    if failed > 0 {
        let tail: Vec<&str> = r.console.lines().rev().take(30).collect();
        println!("===== guest console (tail) =====");
        for l in tail.iter().rev() {
            println!("{l}");
        }
        if !r.agent_err.is_empty() {
            println!("===== agent stderr (tail) =====");
            let lines: Vec<&str> = r.agent_err.lines().collect();
            for l in &lines[lines.len().saturating_sub(30)..] {
                println!("{l}");
            }
        }
        if !qemu_err.trim().is_empty() {
            println!("===== qemu stderr =====\n{}", qemu_err.trim_end());
        }
    }
    println!("===== vm-test summary: {} ({}, x86_64) =====", k.package, k.release);
    for (what, ok, detail) in &results {
        println!(
            "  {}  {what}{}",
            if *ok { "PASS" } else { "FAIL" },
            if *ok { String::new() } else { format!(": {detail}") }
        );
    }
    let verdict = if failed == 0 { "PASS" } else { "FAIL" };
    println!(
        "vm-test {verdict}: {}/{} checks passed; VM {vm_secs:.1}s{}, total {:.1}s; logs in {}",
        results.len() - failed,
        results.len(),
        if timed_out { " (TIMEOUT)" } else { "" },
        t0.elapsed().as_secs_f64(),
        run_dir.display()
    );
    if timed_out {
        bail!("vm-test: the guest did not finish within {}s", args.timeout);
    }
    if status.is_some_and(|s| !s.success()) && failed == 0 {
        bail!("vm-test: qemu exited with {}: {}", status.unwrap(), qemu_err.trim());
    }
    if failed > 0 {
        bail!("vm-test FAILED on {}: {failed} check(s) failed", k.release);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_newest_plain_amd64_kernel() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-rt-amd64",
            "linux-image-6.1.0-57-amd64-dbg",
            "linux-image-6.1.0-56-amd64",
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-6.12.9+deb12-amd64",
        ];
        assert_eq!(pick_kernel("6.1", &names).as_deref(), Some("linux-image-6.1.0-57-amd64"));
        assert_eq!(pick_kernel("6.12", &names).as_deref(), Some("linux-image-6.12.117+deb12-amd64"));
        assert_eq!(pick_kernel("5.10", &names), None);
        assert_eq!(pick_kernel("linux-image-x", &names).as_deref(), Some("linux-image-x"));
    }

    #[test]
    fn module_order_puts_dependencies_first_and_skips_builtins() {
        let dep = "kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko\n\
                   kernel/fs/netfs/netfs.ko: kernel/fs/fscache/fscache.ko\n\
                   kernel/fs/fscache/fscache.ko:\n\
                   kernel/net/9p/9pnet.ko:\n\
                   kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko\n";
        let order =
            module_load_order(dep, "kernel/drivers/virtio/virtio_pci.ko\n", &["virtio_pci", "9pnet_virtio", "9p"])
                .unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/fscache/fscache.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/9p/9p.ko"
            ]
        );
        assert!(module_load_order(dep, "", &["overlay"]).is_err());
    }

    #[test]
    fn cpio_is_newc_aligned_with_trailer() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", b"#!/bin/sh\n", true);
        let b = c.finish();
        assert_eq!(&b[..6], b"070701");
        assert!(b.len().is_multiple_of(4));
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
        // second header starts 4-aligned after "bin\0"
        let second = b.windows(6).skip(1).position(|w| w == b"070701").unwrap() + 1;
        assert!(second.is_multiple_of(4));
    }

    fn good() -> GuestResult {
        let check = "kernel      6.1.0-57-amd64 (x86_64)\n\
            privileges  euid 0\n\
            \n\
            hook family / feature            available  evidence\n\
            \x20 BTF (/sys/kernel/btf/vmlinux)    yes        present\n\
            \x20 tracepoints                      yes        /sys/kernel/tracing/events/syscalls present\n\
            \x20 kprobes                          yes        kprobe PMU present\n\
            \x20 fentry                           yes        fentry program on tcp_sendmsg loaded\n\
            \x20 ring buffer map                  yes        BPF_MAP_TYPE_RINGBUF loads\n\
            \n\
            hooks Waybill will use\n\
            \x20 socket data          raw tracepoint sys_exit, one program for read, write, ...\n\
            \x20 fd → TCP 4-tuple     task→files→fdtable→file→socket→sock walk, offsets from BTF at load time\n\
            \x20 accelerators         fentry available (tcp_sendmsg/tcp_recvmsg could replace the fd walk); tracepoints in use\n";
        let agent = "Trace 0a1b2c3d…  GET /users/{id}  1.2ms  python3 (pid 77)  200\n  └─ x\n\
            Trace 1a1b2c3d…  GET /users/{id}  1.0ms  python3 (pid 77)  200\n\
            Trace 2a1b2c3d…  POST /orders  1.0ms  python3 (pid 77)  201\n\
            Trace 3a1b2c3d…  GET /missing  1.0ms  python3 (pid 77)  404  [ERROR]\n";
        GuestResult {
            console: "VMTEST_CMD_START uptime=2.4\nVMTEST_EXIT=0 uptime=40.1\n".into(),
            check_rc: Some(0),
            check_out: check.into(),
            app_pid: Some(77),
            client_out: "GET /users/42 200\nGET /users/7 200\nPOST /orders 201\nGET /missing 404\n".into(),
            agent_rc: Some(0),
            agent_out: agent.into(),
            agent_err: "INFO waybill: eBPF programs attached (syscall tracepoints) hooks=27 skipped=0\n".into(),
        }
    }

    fn failures(r: &GuestResult) -> Vec<String> {
        evaluate(r, "6.1.0-57-amd64").into_iter().filter(|(_, ok, _)| !ok).map(|(w, _, _)| w).collect()
    }

    #[test]
    fn evaluate_passes_a_good_run() {
        assert_eq!(failures(&good()), Vec::<String>::new());
    }

    #[test]
    fn evaluate_fails_when_kprobes_or_fentry_missing() {
        let mut r = good();
        r.check_out =
            r.check_out.replace("kprobes                          yes", "kprobes                          no ");
        r.check_out = r.check_out.replace("fentry available (tcp", "kprobes available; fentry refused (tcp");
        let f = failures(&r);
        assert!(f.iter().any(|w| w.contains("kprobes AVAILABLE")), "{f:?}");
        assert!(f.iter().any(|w| w.contains("accelerators")), "{f:?}");
    }

    #[test]
    fn evaluate_fails_on_missing_extra_or_wrong_pid_traces() {
        let mut r = good();
        r.agent_out = r.agent_out.lines().filter(|l| !l.contains("POST")).collect::<Vec<_>>().join("\n");
        assert!(failures(&r).iter().any(|w| w.starts_with("exactly 4 traces")));
        let mut r = good();
        r.agent_out.push_str("Trace 4a1b2c3d…  GET /users/{id}  1.0ms  python3 (pid 77)  200\n");
        assert!(failures(&r).iter().any(|w| w.starts_with("exactly 4 traces")));
        let mut r = good();
        r.app_pid = Some(78);
        assert_eq!(failures(&r).len(), 4);
        let mut r = good();
        r.console = "VMTEST_EXIT=125\n".into();
        assert_eq!(failures(&r), ["guest booted and ran the test script"]);
        let mut r = good();
        r.agent_err = r.agent_err.replace("skipped=0", "skipped=1");
        assert_eq!(failures(&r), ["waybill run attached every hook (skipped=0)"]);
        let mut r = good();
        r.check_out = r.check_out.replace("6.1.0-57", "6.18.0");
        assert_eq!(failures(&r), ["check reports the guest kernel"]);
    }
}
