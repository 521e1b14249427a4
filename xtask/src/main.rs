//! Developer tasks: `cargo xtask setup | build | test | run | bench`.
//!
//! - `setup`: installs the toolchain and test tools (idempotent: each step is skipped when present).
//! - `build [--release]`: builds the eBPF object (ebpf-probes/, Debian rustc for bpfel-unknown-none,
//!   linked by bpf-linker) and then the agent, which embeds that object.
//! - `test`: setup, build, unit tests, a fuzz smoke run (`fuzz --smoke`), then the root
//!   integration tests in tests/.
//! - `fuzz [--smoke] [--seconds N] [TARGET…]`: runs the parser fuzz targets in fuzz/ with
//!   cargo-fuzz (installed on first use) on the nightly toolchain, seeded from the golden fixtures.
//! - `run -- <waybill args>`: build and run the agent.
//! - `vm-test [--kernel PACKAGE]`: the release agent on another kernel in a QEMU guest (vm.rs).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod vm;

#[derive(Parser)]
#[command(about = "Waybill developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and the test tools (apt, bpf-linker, PyPI). Idempotent.
    Setup {
        /// Only the build toolchain, not the servers and tools the tests use.
        #[arg(long)]
        build_only: bool,
    },
    /// Build the eBPF object and the agent that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the whole suite: unit tests, then root integration tests (needs root for those).
    Test {
        /// Skip `setup` (when you know the tools are there).
        #[arg(long)]
        no_setup: bool,
        /// Only unit tests (no root needed).
        #[arg(long)]
        unit: bool,
        /// Skip the fuzz smoke run.
        #[arg(long)]
        no_fuzz: bool,
        /// Extra arguments for the integration test run (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzz the protocol parsers (fuzz/, cargo-fuzz on nightly, seeded from the fixtures).
    /// Fails on a crash, a panic, an input taking over 10 s, or an allocation above the limit.
    Fuzz {
        /// The CI budget: every target for 20 s.
        #[arg(long)]
        smoke: bool,
        /// Seconds per target (default 20 with --smoke, else 300).
        #[arg(long)]
        seconds: Option<u64>,
        /// Targets to run (default: all of fuzz/fuzz_targets).
        targets: Vec<String>,
    },
    /// Build (release) and run waybill with the given arguments.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure the agent's overhead on real servers (nginx, PostgreSQL, Redis), side by side
    /// with and without it; writes target/bench/results.md. Needs root.
    Bench(bench::BenchArgs),
    /// Boot another kernel (default: Debian's newest 6.1 amd64) in QEMU with the host's / shared
    /// read-only, and run the release agent there: `waybill check` and a real trace. Needs root.
    VmTest(vm::VmArgs),
}

/// Debian packages needed to build the eBPF object and bpf-linker.
const BUILD_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libffi-dev",
    "libxml2-dev",
    "libedit-dev",
    "libncurses-dev",
];

/// Debian packages the integration tests use (real servers and clients).
const TEST_PACKAGES: &[&str] = &[
    "nginx-light",
    "curl",
    "python3",
    "iproute2",
    "util-linux",
    "postgresql",
    "redis-server",
    "redis-tools",
    "nodejs",
    "golang-go",
    "openssl",
    // The topology test's thread-per-request JDK service (javac) and its JDBC driver.
    "openjdk-17-jdk-headless",
    "libpostgresql-jdbc-java",
];

/// PyPI packages the integration tests use: rotel is a real OTLP collector.
/// psycopg (libpq, extended protocol) and redis-py are real clients for the database tests.
const PIP_PACKAGES: &[(&str, &str)] = &[
    ("rotel", "rotel==0.0.1a15"),
    ("psycopg", "psycopg[binary]==3.2.*"),
    ("redis", "redis==5.*"),
    ("requests", "requests==2.*"),
    // The topology test's upstream is instrumented with the real OpenTelemetry SDK.
    ("opentelemetry.sdk", "opentelemetry-sdk==1.*"),
];

/// npm projects of the Node.js test services (`npm install` in each; tests/apps/node: `pg`).
const NPM_DIRS: &[&str] = &["tests/apps/node"];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    match cli.cmd {
        Cmd::Setup { build_only } => setup(build_only),
        // Building needs the eBPF toolchain: install it on first use (quick when present).
        Cmd::Build { release } => setup(true).and_then(|_| build(&root, release)).map(|_| ()),
        Cmd::Test { no_setup, unit, no_fuzz, args } => test(&root, no_setup, unit, no_fuzz, &args),
        Cmd::Fuzz { smoke, seconds, targets } => fuzz(&root, seconds.unwrap_or(if smoke { 20 } else { 300 }), &targets),
        Cmd::Run { args } => {
            setup(true)?;
            let bin = build(&root, true)?;
            run(Command::new(bin).args(args))
        }
        Cmd::Bench(args) => bench::run(&root, args),
        Cmd::VmTest(args) => {
            let bin = if args.no_build { root.join("target/release/waybill") } else { build(&root, true)? };
            vm::vm_test(&root, &bin, &args)
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn have_package(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !have_package(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !Path::new("/etc/debian_version").exists() {
        bail!(
            "this is not a Debian-like system; install the equivalents of these packages yourself: {}",
            missing.join(" ")
        );
    }
    if !is_root() {
        bail!(
            "missing packages and not root. Run:\n  sudo apt-get update && sudo apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let stamp = Path::new("/var/lib/apt/periodic/waybill-update-stamp");
    if !stamp.exists() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        let _ = std::fs::create_dir_all(stamp.parent().unwrap());
        let _ = std::fs::write(stamp, b"");
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Where bpf-linker is installed (its own root keeps it out of the user's ~/.cargo/bin).
fn tools_dir() -> PathBuf {
    std::env::var_os("WAYBILL_TOOLS").map(PathBuf::from).unwrap_or_else(|| {
        if is_root() {
            PathBuf::from("/opt/waybill-tools")
        } else {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".local/waybill-tools")
        }
    })
}

fn bpf_linker_ok() -> bool {
    Command::new(tools_dir().join("bin/bpf-linker"))
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

fn setup(build_only: bool) -> Result<()> {
    apt_install(BUILD_PACKAGES)?;
    if !bpf_linker_ok() {
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
        let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
        run(Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--no-default-features"])
            .args(["--features", "llvm-22", "--root"])
            .arg(tools_dir())
            .env("PATH", path)
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
    }
    if build_only {
        return Ok(());
    }
    apt_install(TEST_PACKAGES)?;
    apt_install(vm::VM_PACKAGES)?;
    for (module, spec) in PIP_PACKAGES {
        let present = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !present {
            eprintln!("xtask: pip install {spec}");
            run(Command::new("python3").args(["-m", "pip", "install", "-q", "--disable-pip-version-check", spec]))?;
        }
    }
    for dir in NPM_DIRS {
        let dir = project_root().join(dir);
        if !dir.join("node_modules").exists() {
            eprintln!("xtask: npm install in {}", dir.display());
            run(Command::new("npm").args(["install", "--no-audit", "--no-fund"]).current_dir(&dir))?;
        }
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

/// The `bpf_target_arch` cfg aya-ebpf wants, for the host architecture.
fn bpf_target_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "aarch64",
        "riscv64" => "riscv64",
        "powerpc64" => "powerpc64",
        "s390x" => "s390x",
        _ => "x86_64",
    }
}

/// Builds the eBPF object; returns its path.
pub fn build_ebpf(root: &Path) -> Result<PathBuf> {
    if !bpf_linker_ok() {
        bail!("bpf-linker {BPF_LINKER_VERSION} is not installed: run `cargo xtask setup --build-only` first");
    }
    let dir = root.join("ebpf-probes");
    let path = format!("{}:{}", tools_dir().join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let flags = format!("--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf", bpf_target_arch());
    run(Command::new("cargo")
        .current_dir(&dir)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .env("PATH", path)
        // Debian's rustc 1.96 ships a precompiled core for bpfel-unknown-none.
        .env("RUSTC", "/usr/bin/rustc")
        // aya-ebpf uses #![feature(asm_experimental_arch)]; allow it for that crate only.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTFLAGS"))?;
    Ok(dir.join("target/bpfel-unknown-none/release/waybill-probes"))
}

/// Builds the eBPF object and the agent; returns the agent binary's path.
///
/// A release build uses the `dist` profile (the release profile with whole-program LTO, see the
/// workspace Cargo.toml) and is copied to target/release/waybill. The returned path is the
/// `dist` one: `cargo test --release` rebuilds target/release/waybill without LTO for the
/// agent's own integration tests, and the root tests must run the binary that ships.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let obj = build_ebpf(root)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(["build", "--package", "waybill", "--bin", "waybill"]).env("WAYBILL_EBPF_OBJ", &obj);
    if !release {
        run(&mut cmd)?;
        let bin = root.join("target/debug/waybill");
        eprintln!("xtask: built {}", bin.display());
        return Ok(bin);
    }
    run(cmd.args(["--profile", "dist"]))?;
    let bin = root.join("target/dist/waybill");
    let release_dir = root.join("target/release");
    std::fs::create_dir_all(&release_dir)?;
    // Copy, then rename over: the old binary may be running.
    let tmp = release_dir.join(".waybill.tmp");
    std::fs::copy(&bin, &tmp).with_context(|| format!("copying {}", bin.display()))?;
    std::fs::rename(&tmp, release_dir.join("waybill"))?;
    eprintln!("xtask: built {} (copied from {})", release_dir.join("waybill").display(), bin.display());
    Ok(bin)
}

/// Fuzz targets, from fuzz/fuzz_targets/*.rs.
fn fuzz_targets(root: &Path) -> Result<Vec<String>> {
    let mut t: Vec<String> = std::fs::read_dir(root.join("fuzz/fuzz_targets"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_string))
        .collect();
    t.sort();
    Ok(t)
}

/// Installs cargo-fuzz when `cargo fuzz` is missing (idempotent).
fn ensure_cargo_fuzz() -> Result<()> {
    let ok = Command::new("cargo").args(["fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("xtask: installing cargo-fuzz (about a minute)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let nightly =
        Command::new("cargo").args(["+nightly", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !nightly {
        bail!("fuzzing needs a nightly toolchain (sanitizer flags): `rustup toolchain install nightly`");
    }
    Ok(())
}

/// Per input: libFuzzer's own limits make an unbounded allocation or a slow input a failure.
const FUZZ_MALLOC_LIMIT_MB: u32 = 64;
const FUZZ_RSS_LIMIT_MB: u32 = 1024;
const FUZZ_INPUT_TIMEOUT_S: u32 = 10;

fn fuzz(root: &Path, seconds: u64, only: &[String]) -> Result<()> {
    ensure_cargo_fuzz()?;
    let dir = root.join("fuzz");
    let all = fuzz_targets(root)?;
    for t in only {
        if !all.contains(t) {
            bail!("no fuzz target {t:?}; there are: {}", all.join(", "));
        }
    }
    let targets = if only.is_empty() { all } else { only.to_vec() };
    run(Command::new("python3").arg(dir.join("seed_corpus.py")))?;
    // One build for all targets, with debug assertions (integer overflow is a bug too).
    run(Command::new("cargo")
        .current_dir(&dir)
        .args(["+nightly", "fuzz", "build", "-O", "-a"])
        .env_remove("RUSTFLAGS"))?;
    for t in &targets {
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        run(Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", "-O", "-a", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-malloc_limit_mb={FUZZ_MALLOC_LIMIT_MB}"))
            .arg(format!("-rss_limit_mb={FUZZ_RSS_LIMIT_MB}"))
            .arg(format!("-timeout={FUZZ_INPUT_TIMEOUT_S}"))
            .arg("-max_len=16384")
            .arg("-print_final_stats=1")
            .env_remove("RUSTFLAGS"))
        .with_context(|| format!("fuzz target {t} failed: the crashing input is in fuzz/artifacts/{t}/"))?;
    }
    Ok(())
}

fn test(root: &Path, no_setup: bool, unit: bool, no_fuzz: bool, args: &[String]) -> Result<()> {
    if !no_setup {
        setup(unit)?;
    }
    let bin = build(root, true)?;
    let obj = root.join("ebpf-probes/target/bpfel-unknown-none/release/waybill-probes");
    eprintln!("xtask: unit tests");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["test", "--workspace", "--exclude", "waybill-tests", "--release"])
        .env("WAYBILL_EBPF_OBJ", &obj))?;
    // The pipeline bench's own checks (every record decodes, every request makes one span), on a
    // few thousand requests: the bench is kept working, its timings are not judged here.
    eprintln!("xtask: pipeline bench, smoke run");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["test", "--release", "-p", "waybill", "--bench", "pipeline"])
        .env("WAYBILL_PIPELINE_REQUESTS", "4096")
        .env("WAYBILL_EBPF_OBJ", &obj))?;
    if unit {
        return Ok(());
    }
    if !no_fuzz {
        eprintln!("xtask: fuzz smoke run");
        fuzz(root, 20, &[])?;
    }
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("root integration tests need root, and CI must run them: run as root");
        }
        eprintln!("xtask: NOT running the root integration tests (not root). Run `sudo cargo xtask test`.");
        return Ok(());
    }
    eprintln!("xtask: root integration tests");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["test", "--release", "--package", "waybill-tests", "--"])
        .arg("--test-threads=1")
        .args(args)
        .env("WAYBILL_BIN", &bin)
        .env("WAYBILL_EBPF_OBJ", &obj))?;
    if std::env::var_os("WAYBILL_SKIP_VM").is_some_and(|v| v == "1") {
        eprintln!("xtask: NOT running the VM test (WAYBILL_SKIP_VM=1)");
        return Ok(());
    }
    eprintln!("xtask: VM test (Debian 6.1 kernel in QEMU; WAYBILL_SKIP_VM=1 skips it)");
    vm::vm_test(root, &bin, &vm::VmArgs { kernel: "6.1".into(), timeout: 420, no_build: true })
}
