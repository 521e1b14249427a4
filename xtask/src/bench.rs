//! `cargo xtask bench`: what the agent costs the applications it traces, measured side by side.
//!
//! Every A/B scenario alternates rounds without and with the agent attached (the agent exports
//! OTLP/gRPC to a real collector, rotel, running on the same machine in both kinds of rounds),
//! swapping the order in every other pair so that drift hits both sides alike, and reports
//! medians and the spread of the per-pair ratios. Scenarios:
//!
//! 1. nginx (1 worker, small static file) under `wrk` at saturation: throughput, p50/p99.
//! 2. nginx at a constant request rate from a closed-loop keep-alive generator (this file):
//!    p50/p90/p99.
//! 3. Agent CPU per request (run time from /proc/PID/task/*/schedstat), RSS steady/peak (VmRSS/VmHWM), BPF memory
//!    (`memlock` of the agent's bpf-map / bpf-prog fds).
//! 4. PostgreSQL 15 (`pgbench -S`, throwaway cluster) and Redis (`redis-benchmark`, with and
//!    without `-P 16`).
//! 5. Event rate: a request-rate sweep against nginx and a write-rate sweep of 64 B writes
//!    (`xtask/bench/hookbench.c`), with the ring-buffer counters from /metrics and the eBPF run
//!    time per event (`kernel.bpf_stats_enabled`); one run with a 16 KiB ring buffer.
//! 6. The per-syscall floor: `hookbench` timing 64 B write()s to loopback TCP and /dev/null
//!    without the agent, with the agent tracing it, and with the agent tracing another process;
//!    and the hook floor: the same writes with only one *empty* program attached
//!    (`waybill floor --hook raw-sys-exit | syscall-tracepoint | uprobe`), what the hook itself
//!    costs on this kernel before any of Waybill's work.
//!
//! 7. The user-space pipeline alone (`agent/benches/pipeline.rs`): CPU time and allocations per
//!    request of decoding, parsing, span building, RED and OTLP encoding, warm and with cold
//!    caches, without a kernel or a network in the way.
//!    Table 7b counts the instructions per request of each stage under callgrind (valgrind):
//!    deterministic, so it compares two builds where the noisy times cannot.
//! 8. The idle agent: CPU, wake-ups and RSS with nginx attached and no traffic, for each way of
//!    choosing targets (`--pid`, `--port`, `--exe`).
//!
//! Only 127.0.0.1 traffic; every load loop is bounded in time; every child is stopped by a guard.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::{fs::chown, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Short rounds (about 3 minutes in all): a smoke run. The default takes about 18 minutes.
    #[arg(long)]
    quick: bool,
    /// Alternating pairs (one round without and one with the agent) per A/B scenario.
    #[arg(long)]
    pairs: Option<usize>,
    /// Request rate of the constant-rate scenario (requests per second).
    #[arg(long, default_value_t = 3000)]
    rate: u32,
    /// Only these sections, comma separated: nginx, budget, rate, idle, postgres, redis, events,
    /// hooks, pipeline.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Benchmark this agent binary (default: build and use target/release/waybill).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Do not build the agent: use target/release/waybill as it is.
    #[arg(long)]
    no_build: bool,
}

const SECTIONS: &[&str] = &["nginx", "budget", "rate", "idle", "postgres", "redis", "events", "hooks", "pipeline"];

/// Durations and sizes of one run (`--quick` or default).
struct Plan {
    pairs: usize,
    sat_secs: u64,
    rate_secs: u64,
    db_secs: u64,
    db_pairs: usize,
    redis_n: u64,
    redis_pipelined_n: u64,
    sweep_secs: u64,
    sweep_rates: Vec<u32>,
    write_rates: Vec<u32>,
    hook_tcp_n: u64,
    hook_null_n: u64,
    hook_pairs: usize,
    idle_secs: u64,
}

impl Plan {
    fn new(a: &BenchArgs) -> Plan {
        if a.quick {
            Plan {
                pairs: a.pairs.unwrap_or(2),
                sat_secs: 4,
                rate_secs: 4,
                db_secs: 4,
                db_pairs: a.pairs.unwrap_or(1),
                redis_n: 30_000,
                redis_pipelined_n: 200_000,
                sweep_secs: 3,
                sweep_rates: vec![5_000, 15_000],
                write_rates: vec![50_000, 200_000, 0],
                hook_tcp_n: 200_000,
                hook_null_n: 1_000_000,
                hook_pairs: a.pairs.unwrap_or(2),
                idle_secs: 4,
            }
        } else {
            Plan {
                pairs: a.pairs.unwrap_or(5),
                sat_secs: 10,
                rate_secs: 10,
                db_secs: 10,
                db_pairs: a.pairs.unwrap_or(3),
                redis_n: 100_000,
                redis_pipelined_n: 1_000_000,
                sweep_secs: 5,
                sweep_rates: vec![2_000, 5_000, 10_000, 15_000, 20_000],
                write_rates: vec![25_000, 50_000, 100_000, 200_000, 0],
                hook_tcp_n: 1_000_000,
                hook_null_n: 3_000_000,
                hook_pairs: a.pairs.unwrap_or(5),
                idle_secs: 10,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

pub fn run(root: &Path, args: BenchArgs) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmark loads eBPF programs: run it as root (sudo cargo xtask bench)");
    }
    for s in &args.only {
        if !SECTIONS.contains(&s.as_str()) {
            bail!("unknown section {s:?}: choose from {}", SECTIONS.join(", "));
        }
    }
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let plan = Plan::new(&args);
    let started = Instant::now();

    let tools = Tools::ensure(want("postgres"), want("redis"))?;
    let agent_bin = match &args.agent {
        Some(p) => p.clone(),
        None if args.no_build => root.join("target/release/waybill"),
        None => crate::build(root, true)?,
    };
    if !agent_bin.exists() {
        bail!("no agent binary at {}", agent_bin.display());
    }
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let hookbench = out_dir.join("hookbench");
    crate::run(
        Command::new("gcc").args(["-O2", "-Wall", "-o"]).arg(&hookbench).arg(root.join("xtask/bench/hookbench.c")),
    )
    .context("compiling xtask/bench/hookbench.c")?;

    let work = TempDir::new("work")?;
    let rotel = Rotel::start(&tools.rotel, work.path())?;
    let b = Bench { agent_bin, rotel, clk_tck: clk_tck() };
    let mut rep = Report::new(&args, &plan, &b);
    let foreign = foreign_tracers();
    if !foreign.is_empty() {
        let msg = format!(
            "other waybill processes are running ({}): their eBPF programs run in every round \
             and add noise",
            foreign.join(", ")
        );
        eprintln!("bench: WARNING: {msg}");
        rep.warnings.push(msg);
    }
    rep.warnings.push(format!("load average at start: {}", loadavg()));
    // Run-time statistics make the kernel read the clock twice around every eBPF program run (on
    // every syscall of the host, with the agent's `sys_exit` hook): a cost no production host
    // pays. Off for the whole run; the one section that reports eBPF time turns them on for
    // itself. The previous value comes back when the run ends.
    let stats_off = Sysctl::set(BPF_STATS, "0")?;
    if stats_off.old.trim() != "0" {
        rep.warnings.push(format!(
            "{BPF_STATS} was {} on this host: turned off for the run except for table 5a (it adds two clock \
             reads to every eBPF program run); restored at the end",
            stats_off.old.trim()
        ));
    }

    // Any section may fail (a missing tool, a crashed server): report it and go on.
    let section = |name: &str, rep: &mut Report, f: &mut dyn FnMut(&mut Report) -> Result<()>| {
        if !want(name) {
            return;
        }
        eprintln!("bench: == {name} ==");
        if let Err(e) = f(rep) {
            eprintln!("bench: section {name} failed: {e:#}");
            rep.warnings.push(format!("section `{name}` failed: {e:#}"));
        }
    };
    if want("nginx") || want("budget") || want("rate") || want("idle") || want("events") {
        let nginx = Nginx::start(work.path())?;
        warm_up(nginx.port)?;
        section("nginx", &mut rep, &mut |rep| nginx_saturation(&b, &plan, &nginx, rep));
        section("budget", &mut rep, &mut |rep| budget(&b, &plan, &nginx, args.rate, work.path(), rep));
        section("rate", &mut rep, &mut |rep| nginx_rate(&b, &plan, &nginx, args.rate, rep));
        section("idle", &mut rep, &mut |rep| idle(&b, &plan, &nginx, rep));
        section("events", &mut rep, &mut |rep| events(&b, &plan, &nginx, &hookbench, rep));
    }
    section("postgres", &mut rep, &mut |rep| postgres(&b, &plan, &tools, rep));
    section("redis", &mut rep, &mut |rep| redis(&b, &plan, rep));
    section("hooks", &mut rep, &mut |rep| hooks(&b, &plan, &hookbench, rep));
    section("pipeline", &mut rep, &mut |rep| pipeline(root, args.quick, rep));

    rep.warnings.push(format!(
        "load average at end: {}; total time {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    ));
    let text = rep.render();
    println!("{text}");
    let path = out_dir.join("results.md");
    std::fs::write(&path, &text)?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

/// Table 8: the idle agent, per way of choosing targets. nginx is attached and gets no traffic;
/// what the agent spends then is its own housekeeping (the 500 ms tick, the 2 s `/proc` rescan,
/// the counters), which a host pays around the clock. `--port` and `--exe` rescans read more of
/// `/proc` than `--pid` does, and their cost grows with the host (processes, sockets).
fn idle(b: &Bench, plan: &Plan, nginx: &Nginx, rep: &mut Report) -> Result<()> {
    let (pid, port) = (nginx.pid().to_string(), nginx.port.to_string());
    let procs = std::fs::read_dir("/proc")?
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
        .count();
    let mut rows = Vec::new();
    for (sel, args) in [
        ("`--pid` (nginx's master)", ["--pid", pid.as_str()]),
        ("`--port` (nginx's)", ["--port", port.as_str()]),
        ("`--exe nginx`", ["--exe", "nginx"]),
    ] {
        let mut agent = b.start_agent_on(&args, &[])?;
        let apid = agent.guard.pid();
        // Past start-up and the first rescans.
        thread::sleep(Duration::from_secs(3));
        let (c0, w0) = (cpu_s(apid, b.clk_tck), switches(apid));
        thread::sleep(Duration::from_secs(plan.idle_secs));
        let (c1, w1) = (cpu_s(apid, b.clk_tck), switches(apid));
        let rss = status_kb(apid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
        let alive = agent.guard.alive();
        agent.guard.stop();
        if !alive {
            bail!("waybill died while idle:\n{}", agent.stderr.lock().unwrap());
        }
        let secs = plan.idle_secs as f64;
        rows.push([
            sel.to_string(),
            format!("{:.3}", (c1 - c0) * 1e3 / secs),
            f1(w1.saturating_sub(w0) as f64 / secs),
            f1(rss),
        ]);
    }
    let t = rep.table(
        &format!(
            "8. The idle agent — nginx attached, no traffic, {} s after 3 s of settling, by way of choosing \
             it ({procs} processes on this host)",
            plan.idle_secs
        ),
        &["selector", "agent CPU (ms per s)", "times it ran per s", "RSS (MiB)"],
    );
    for r in &rows {
        t.row(r);
    }
    Ok(())
}

/// How many times the process's threads were put on a CPU (the third field of
/// `/proc/PID/task/*/schedstat`): its wake-ups, near enough.
fn switches(pid: u32) -> u64 {
    schedstat_sum(pid, 2).unwrap_or(0)
}

/// Field `field` of `/proc/PID/task/*/schedstat` (0: run time in ns, 2: times put on a CPU),
/// summed over the process's threads; None when no thread's could be read.
fn schedstat_sum(pid: u32, field: usize) -> Option<u64> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|t| t.split_whitespace().nth(field).and_then(|v| v.parse::<u64>().ok()))
        .fold(None, |sum, v| Some(sum.unwrap_or(0) + v))
}

/// Table 7: runs `agent/benches/pipeline.rs` (built with cargo's bench profile) and reports its
/// rows. No root, no kernel: the floor of the agent's own work per request.
fn pipeline(root: &Path, quick: bool, rep: &mut Report) -> Result<()> {
    let requests = if quick { "50000" } else { "200000" };
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["bench", "--quiet", "-p", "waybill", "--bench", "pipeline"])
        .env("WAYBILL_PIPELINE_TSV", "1")
        .env("WAYBILL_PIPELINE_REQUESTS", requests)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench -p waybill --bench pipeline")?;
    if !out.status.success() {
        bail!("cargo bench -p waybill --bench pipeline failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let params = rows.iter().find(|r| r[0] == "params" && r.len() == 6).ok_or_else(|| anyhow!("no params row"))?;
    let (n, batch, step, mib, clock) = (params[1], params[2], params[3], params[4], params[5]);
    let t = rep.table(
        &format!(
            "7. User-space pipeline alone — ns of CPU per HTTP request (median of 7 rounds of {n} requests, min–max), \
             warm (batches of {batch} back to back) and cold ({mib} MiB of other memory walked before each step of \
             {step} requests; {clock} ns clock reading subtracted); two kinds of traffic (agent/benches/pipeline.rs)"
        ),
        &["traffic", "stage", "warm", "cold", "allocations / request", "bytes allocated / request"],
    );
    for r in &rows {
        match (r[0], r.len()) {
            ("stage", 11) => t.row(&[
                r[1],
                r[2],
                &format!("{} ({}–{})", r[3], r[4], r[5]),
                &format!("{} ({}–{})", r[6], r[7], r[8]),
                r[9],
                r[10],
            ]),
            ("total", 6) => t.row(&[r[1], "**total**", r[2], r[3], r[4], r[5]]),
            _ => {}
        }
    }
    if t.rows.is_empty() {
        bail!("the pipeline bench printed no rows");
    }
    pipeline_instructions(root, rep)
}

/// The functions of the pipeline whose instructions table 7b counts (inclusive of what they
/// call), with the stage each one is.
const COUNTED_STAGES: [(&str, &str); 4] = [
    ("waybill::conn::ConnTable::on_data", "connection table + HTTP parse"),
    ("waybill::stitch::Stitcher::span", "span building (stitcher)"),
    ("waybill::export::red::Red::record_all", "RED histograms"),
    ("waybill::export::encode::Encoder::encode", "OTLP protobuf encoding"),
];

/// Table 7b: instructions per request of each stage, counted by callgrind in warm rounds of the
/// pipeline bench. The count is the same from run to run (it does not depend on the machine's
/// other tenants, its caches or its clock), so it tells two builds apart to a fraction of a per
/// cent where table 7's times move by several per cent. It says nothing of cache misses: cold
/// costs are table 7's.
fn pipeline_instructions(root: &Path, rep: &mut Report) -> Result<()> {
    if !in_path("valgrind") {
        eprintln!("bench: installing valgrind (table 7b)");
        crate::apt_install(&["valgrind"])?;
    }
    // The bench executable cargo has just built (cargo names it on stderr).
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(["bench", "-p", "waybill", "--bench", "pipeline", "--no-run"])
        .output()
        .context("cargo bench --no-run")?;
    let err = String::from_utf8_lossy(&out.stderr);
    let exe = err
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Executable "))
        .find_map(|l| l.rsplit_once('(').map(|(_, p)| root.join(p.trim_end_matches(')'))))
        .ok_or_else(|| anyhow!("cargo bench --no-run named no executable:\n{err}"))?;
    let dir = TempDir::new("callgrind")?;
    let requests = 2048;
    let t = rep.table(
        &format!(
            "7b. User-space pipeline alone — instructions per HTTP request (callgrind, warm rounds of {requests} \
             requests; each stage with what it calls)"
        ),
        &["traffic", "stage", "instructions / request"],
    );
    for (mix, name) in [("nginx", "nginx page"), ("browser", "browser to JSON API")] {
        let file = dir.path().join(format!("callgrind.{mix}"));
        let stdout = run_bounded(
            Command::new("valgrind")
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", file.display()))
                .arg(&exe)
                .env("WAYBILL_PIPELINE_MIX", mix)
                .env("WAYBILL_PIPELINE_WARM_ONLY", "1")
                .env("WAYBILL_PIPELINE_REQUESTS", requests.to_string()),
            "valgrind --tool=callgrind",
            Duration::from_secs(300),
        )?;
        let spans: f64 = stdout
            .rsplit_once("Spans created: ")
            .and_then(|(_, n)| n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .filter(|&n: &f64| n > 0.0)
            .ok_or_else(|| anyhow!("the pipeline bench under callgrind did not say how many spans it made"))?;
        // The function list only (`--auto=no`): the annotated sources would be ~350 KB.
        let annotated = run_bounded(
            Command::new("callgrind_annotate").args(["--inclusive=yes", "--auto=no"]).arg(&file),
            "callgrind_annotate",
            Duration::from_secs(60),
        )?;
        let mut total = 0.0;
        for (func, stage) in COUNTED_STAGES {
            let ir = inclusive_instructions(&annotated, func)
                .ok_or_else(|| anyhow!("callgrind counted no calls of {func} (inlined?)"))?;
            total += ir / spans;
            t.row(&[name, stage, &f0(ir / spans)]);
        }
        t.row(&[name, "**total**", &f0(total)]);
    }
    Ok(())
}

/// A function's inclusive instruction count in `callgrind_annotate --inclusive=yes` output. A
/// function is listed once per source file its code came from (`file:func`, some with
/// `[object]`): pieces inlined from other files are parts of the whole, so the whole is the
/// largest count on a line naming it.
fn inclusive_instructions(annotated: &str, func: &str) -> Option<f64> {
    let needle = format!(":{func}");
    annotated
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w.ends_with(&needle)))
        .filter_map(|l| l.split_whitespace().next()?.replace(',', "").parse::<f64>().ok())
        .reduce(f64::max)
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

struct Tools {
    rotel: PathBuf,
    pg_bin: Option<PathBuf>,
}

fn in_path(bin: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file())).unwrap_or(false)
}

/// The directory holding initdb, postgres and pgbench (PostgreSQL 15 preferred).
fn pg_bindir() -> Option<PathBuf> {
    let ok = |d: &Path| ["initdb", "postgres", "pgbench"].iter().all(|b| d.join(b).is_file());
    let mut dirs: Vec<PathBuf> = vec![PathBuf::from("/usr/lib/postgresql/15/bin")];
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("bin")).collect();
        v.sort();
        v.reverse();
        dirs.extend(v);
    }
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    }
    dirs.push(PathBuf::from("/usr/local/bin"));
    dirs.into_iter().find(|d| ok(d))
}

impl Tools {
    /// Installs what is missing (Debian packages, rotel from PyPI), idempotently.
    fn ensure(postgres: bool, redis: bool) -> Result<Tools> {
        let mut pkgs: Vec<&str> = Vec::new();
        for (bin, pkg) in [("wrk", "wrk"), ("gcc", "gcc"), ("python3", "python3")] {
            if !in_path(bin) {
                pkgs.push(pkg);
            }
        }
        if !Path::new("/usr/sbin/nginx").exists() {
            pkgs.push("nginx-light");
        }
        if redis && !in_path("redis-server") {
            pkgs.push("redis-server");
        }
        if redis && !in_path("redis-benchmark") {
            pkgs.push("redis-tools");
        }
        if postgres && pg_bindir().is_none() {
            pkgs.push("postgresql-contrib");
        }
        if !pkgs.is_empty() {
            eprintln!("bench: missing tools, installing: {}", pkgs.join(" "));
            crate::apt_install(&pkgs)?;
        }
        let rotel = match rotel_binary() {
            Ok(p) => p,
            Err(_) => {
                eprintln!("bench: installing rotel (pip install rotel==0.0.1a15)");
                crate::run(Command::new("python3").args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "rotel==0.0.1a15",
                ]))?;
                rotel_binary()?
            }
        };
        Ok(Tools { rotel, pg_bin: pg_bindir() })
    }
}

fn rotel_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ROTEL_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let out =
        Command::new("python3").args(["-c", "import rotel, os; print(os.path.dirname(rotel.__file__))"]).output()?;
    if !out.status.success() {
        bail!("the rotel Python package is not installed");
    }
    let bin = PathBuf::from(String::from_utf8(out.stdout)?.trim()).join("rotel-agent");
    if !bin.exists() {
        bail!("{} does not exist", bin.display());
    }
    Ok(bin)
}

// ---------------------------------------------------------------------------------------------
// Processes, guards, /proc
// ---------------------------------------------------------------------------------------------

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn sysconf(name: i32) -> i64;
}

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child we started; no memory is involved.
    unsafe { kill(pid as i32, sig) };
}

fn clk_tck() -> f64 {
    const SC_CLK_TCK: i32 = 2;
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { sysconf(SC_CLK_TCK) };
    if v > 0 { v as f64 } else { 100.0 }
}

/// A child process stopped on drop: `stop` signal, then SIGKILL after `grace`.
struct Guard {
    child: Child,
    name: String,
    stop: i32,
    grace: Duration,
}

impl Guard {
    fn spawn(cmd: &mut Command, name: &str, stop: i32, grace: Duration) -> Result<Guard> {
        let child = cmd.spawn().with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        Ok(Guard { child, name: name.to_string(), stop, grace })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the process now; returns true when it exited within the grace period.
    fn stop(&mut self) -> bool {
        if !self.alive() {
            return true;
        }
        signal(self.child.id(), self.stop);
        let end = Instant::now() + self.grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: {} did not stop in {:?}: killing it", self.name, self.grace);
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("waybill-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sets a sysctl file and restores the old value on drop.
/// `kernel.bpf_stats_enabled`: eBPF programs' run time and count in /proc/PID/fdinfo.
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Result<Sysctl> {
        let old = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, timeout: Duration, guard: &mut Guard) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if !guard.alive() {
            bail!("{} exited before it listened on port {port}", guard.name);
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{} does not listen on 127.0.0.1:{port} after {timeout:?}", guard.name)
}

/// Runs a command to completion within `timeout`; returns its stdout. Killed on timeout.
fn run_bounded(cmd: &mut Command, name: &str, timeout: Duration) -> Result<String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut g = Guard::spawn(cmd, name, SIGKILL, Duration::from_secs(2))?;
    let out = pump(g.child.stdout.take().unwrap());
    let err = pump(g.child.stderr.take().unwrap());
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = g.child.try_wait()? {
            break st;
        }
        if Instant::now() > end {
            bail!("{name} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    thread::sleep(Duration::from_millis(20));
    let stdout = out.lock().unwrap().clone();
    if !status.success() {
        bail!("{name} failed ({status}): {}{}", err.lock().unwrap(), stdout);
    }
    Ok(stdout)
}

fn pump(r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = Arc::clone(&buf);
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = b.lock().unwrap();
            if s.len() > 1 << 20 {
                let cut = s.len() - (1 << 19);
                s.drain(..cut);
            }
            s.push_str(&line);
            s.push('\n');
        }
    });
    buf
}

/// CPU time of a process in seconds: the scheduler's exact run time of each of its threads
/// (`/proc/PID/task/*/schedstat`, ns), else utime + stime in clock ticks (`tck` per second).
/// Ticks are sampled: a process that runs in short bursts between ticks (the agent at a
/// moderate rate) is charged a whole tick or nothing, so over a 10 s round they are off by
/// several ticks either way; the run time is exact. (Threads that exited during the round are
/// not in `task/`; the processes measured here keep theirs.)
fn cpu_s(pid: u32, tck: f64) -> f64 {
    match schedstat_sum(pid, 0) {
        Some(ns) => ns as f64 / 1e9,
        None => cpu_ticks(pid).unwrap_or(0) as f64 / tck,
    }
}

/// CPU seconds of a process and of the children it has reaped (utime + stime + cutime + cstime,
/// clock ticks): a PostgreSQL postmaster and the backends of connections that closed.
fn cpu_with_reaped_children(pid: u32, tck: f64) -> f64 {
    stat_ticks(pid, 4).unwrap_or(0) as f64 / tck
}

/// utime + stime of a process (all its threads, dead ones included), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    stat_ticks(pid, 2)
}

/// The sum of the first `n` time fields of `/proc/PID/stat` from utime on (utime, stime,
/// cutime, cstime), in clock ticks.
fn stat_ticks(pid: u32, n: usize) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    (11..11 + n).map(|i| f.get(i)?.parse::<u64>().ok()).sum()
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid =
                s.rfind(')').and_then(|i| s[i + 2..].split_whitespace().nth(1)).and_then(|x| x.parse::<u32>().ok());
            if ppid == Some(pid) {
                v.push(p);
            }
        }
    }
    v
}

/// Other `waybill` processes (their probes would run during our rounds).
fn foreign_tracers() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(p) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/comm"))
                && c.trim() == "waybill"
            {
                v.push(format!("pid {p}"));
            }
        }
    }
    v
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// BPF objects a process holds: (map bytes, prog bytes, Σ run_time_ns, Σ run_cnt), each object
/// counted once (by id) however many fds point at it.
#[derive(Clone, Copy, Debug, Default)]
struct BpfUse {
    map_bytes: u64,
    prog_bytes: u64,
    run_ns: u64,
    run_cnt: u64,
}

fn bpf_use(pid: u32) -> BpfUse {
    let mut u = BpfUse::default();
    let mut seen = std::collections::HashSet::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return u;
    };
    for e in rd.flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let kind = match link.as_str() {
            "anon_inode:bpf-map" => "map_id",
            "anon_inode:bpf-prog" => "prog_id",
            _ => continue,
        };
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy()))
        else {
            continue;
        };
        let field = |k: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim_start_matches(':').trim()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if !seen.insert((kind, field(kind))) {
            continue;
        }
        if kind == "map_id" {
            u.map_bytes += field("memlock");
        } else {
            u.prog_bytes += field("memlock");
            u.run_ns += field("run_time_ns");
            u.run_cnt += field("run_cnt");
        }
    }
    u
}

// ---------------------------------------------------------------------------------------------
// Servers: rotel, nginx, postgres, redis
// ---------------------------------------------------------------------------------------------

struct Rotel {
    guard: Guard,
    grpc_port: u16,
}

impl Rotel {
    fn start(bin: &Path, dir: &Path) -> Result<Rotel> {
        let grpc_port = free_port()?;
        let http_port = free_port()?;
        let log = std::fs::File::create(dir.join("rotel.out"))?;
        let mut guard = Guard::spawn(
            Command::new(bin)
                .arg("start")
                .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
                .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
                .args(["--exporter", "blackhole"])
                .arg("--pid-file")
                .arg(dir.join("rotel.pid"))
                .arg("--log-file")
                .arg(dir.join("rotel.log"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
            "rotel",
            SIGTERM,
            Duration::from_secs(5),
        )?;
        wait_port(grpc_port, Duration::from_secs(15), &mut guard)?;
        Ok(Rotel { guard, grpc_port })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

struct Nginx {
    guard: Guard,
    port: u16,
}

impl Nginx {
    fn start(work: &Path) -> Result<Nginx> {
        let d = work.join("nginx");
        let root = d.join("www");
        std::fs::create_dir_all(&root)?;
        // A small static file, like a health or API endpoint: 512 B.
        std::fs::write(root.join("index.html"), vec![b'x'; 512])?;
        let port = free_port()?;
        let conf = d.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    keepalive_requests 1000000;\n  }}\n}}\n",
                d = d.display(),
                root = root.display(),
            ),
        )?;
        let mut guard = Guard::spawn(
            Command::new("/usr/sbin/nginx")
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(&d)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "nginx",
            SIGTERM,
            Duration::from_secs(5),
        )?;
        wait_port(port, Duration::from_secs(10), &mut guard)?;
        Ok(Nginx { guard, port })
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// CPU seconds of the master and its workers ([`cpu_s`]).
    fn cpu_s(&self, tck: f64) -> f64 {
        let mut t = cpu_s(self.pid(), tck);
        for c in children_of(self.pid()) {
            t += cpu_s(c, tck);
        }
        t
    }
}

fn warm_up(port: u16) -> Result<()> {
    wrk(port, 32, 2).map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------------

struct Bench {
    agent_bin: PathBuf,
    rotel: Rotel,
    clk_tck: f64,
}

struct Agent {
    guard: Guard,
    stderr: Arc<Mutex<String>>,
    metrics_addr: String,
}

/// What one round with the agent measured.
#[derive(Clone, Debug, Default)]
struct AgentRound {
    cpu_s: f64,
    rotel_cpu_s: f64,
    rss_kb: u64,
    hwm_kb: u64,
    /// VmHWM once the agent is ready, before the load: the start-up peak.
    startup_hwm_kb: u64,
    bpf: BpfUse,
    startup_s: f64,
    /// Counter increments during the round.
    delta: BTreeMap<String, f64>,
    /// `waybill_cpu_yielding` at the end of the round.
    yielding_at_end: bool,
}

impl AgentRound {
    fn d(&self, name: &str) -> f64 {
        sum_metric(&self.delta, name)
    }
    fn lost(&self) -> f64 {
        self.d("waybill_ringbuf_records_lost_total")
    }
}

impl Bench {
    fn start_agent(&self, pid: u32, extra: &[&str]) -> Result<Agent> {
        self.start_agent_on(&["--pid", &pid.to_string()], extra)
    }

    /// Starts the agent with the selector arguments `target` (`--pid N`, `--port N`, …).
    fn start_agent_on(&self, target: &[&str], extra: &[&str]) -> Result<Agent> {
        let port = free_port()?;
        let metrics_addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("run")
            .args(target)
            .args(["--metrics-addr", &metrics_addr])
            .args(extra)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", self.rotel.endpoint())
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("WAYBILL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut guard = Guard::spawn(&mut cmd, "waybill", SIGINT, Duration::from_secs(15))?;
        let stderr = pump(guard.child.stderr.take().unwrap());
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if stderr.lock().unwrap().contains(" ready") {
                break;
            }
            if !guard.alive() {
                thread::sleep(Duration::from_millis(100));
                bail!("waybill exited before it was ready:\n{}", stderr.lock().unwrap());
            }
            if Instant::now() > end {
                bail!("waybill not ready after 30 s:\n{}", stderr.lock().unwrap());
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(Agent { guard, stderr, metrics_addr })
    }

    /// Starts the agent on `pid`, runs `load`, and measures the agent around it.
    fn with_agent<T>(&self, pid: u32, extra: &[&str], load: &mut dyn FnMut() -> Result<T>) -> Result<(T, AgentRound)> {
        let t0 = Instant::now();
        let mut agent = self.start_agent(pid, extra)?;
        let startup_s = t0.elapsed().as_secs_f64();
        thread::sleep(Duration::from_millis(300));
        let apid = agent.guard.pid();
        let startup_hwm_kb = status_kb(apid, "VmHWM:").unwrap_or(0);
        let m0 = scrape(&agent.metrics_addr)?;
        let c0 = cpu_s(apid, self.clk_tck);
        let r0 = cpu_s(self.rotel.pid(), self.clk_tck);
        let out = load();
        // Let the agent finish what the load produced (its CPU for it is counted).
        thread::sleep(Duration::from_millis(1000));
        let c1 = cpu_s(apid, self.clk_tck);
        let r1 = cpu_s(self.rotel.pid(), self.clk_tck);
        let m1 = scrape(&agent.metrics_addr);
        let round = AgentRound {
            cpu_s: (c1 - c0).max(0.0),
            rotel_cpu_s: (r1 - r0).max(0.0),
            rss_kb: status_kb(apid, "VmRSS:").unwrap_or(0),
            hwm_kb: status_kb(apid, "VmHWM:").unwrap_or(0),
            startup_hwm_kb,
            bpf: bpf_use(apid),
            startup_s,
            yielding_at_end: m1.as_ref().is_ok_and(|m| sum_metric(m, "waybill_cpu_yielding") > 0.0),
            delta: m1.as_ref().map(|m1| delta(&m0, m1)).unwrap_or_default(),
        };
        let alive = agent.guard.alive();
        let clean = agent.guard.stop();
        if !alive {
            bail!("waybill died during the round:\n{}", agent.stderr.lock().unwrap());
        }
        if !clean {
            eprintln!("bench: waybill did not exit within 15 s of SIGINT");
        }
        Ok((out?, round))
    }

    /// Attaches one empty eBPF program (`waybill floor --hook HOOK`) for the time of `load`.
    fn with_floor<T>(&self, hook: &str, pid: u32, load: &mut dyn FnMut() -> Result<T>) -> Result<T> {
        let mut cmd = Command::new(&self.agent_bin);
        cmd.args(["floor", "--hook", hook, "--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = Guard::spawn(&mut cmd, "waybill floor", SIGINT, Duration::from_secs(5))?;
        let stdout = pump(guard.child.stdout.take().unwrap());
        let stderr = pump(guard.child.stderr.take().unwrap());
        let end = Instant::now() + Duration::from_secs(20);
        while !stdout.lock().unwrap().contains("attached") {
            if !guard.alive() {
                thread::sleep(Duration::from_millis(100));
                bail!("waybill floor --hook {hook} exited:\n{}", stderr.lock().unwrap());
            }
            if Instant::now() > end {
                bail!("waybill floor --hook {hook} not attached after 20 s");
            }
            thread::sleep(Duration::from_millis(10));
        }
        let out = load();
        guard.stop();
        out
    }

    /// `load` under the first `n` conditions of [`BUDGET`], `rounds` times, the order rotated
    /// every round. `config` is the config file of the no-export condition.
    fn budget_rounds<T>(
        &self,
        pid: u32,
        config: &str,
        (rounds, n): (usize, usize),
        label: &str,
        load: &mut dyn FnMut() -> Result<T>,
    ) -> Result<ByCondition<T>> {
        let mut res: ByCondition<T> = (0..n).map(|_| Vec::new()).collect();
        for i in 0..rounds {
            let mut order: Vec<usize> = (0..n).collect();
            order.rotate_left(i % n);
            for c in order {
                eprintln!("bench: {label}: round {}/{rounds}, {}", i + 1, BUDGET[c]);
                thread::sleep(Duration::from_millis(300));
                res[c].push(match c {
                    0 => (load()?, None),
                    1 => (self.with_floor("raw-sys-exit", pid, load)?, None),
                    4 => {
                        let (r, a) = self.with_stopped_agent(pid, load)?;
                        (r, Some(a))
                    }
                    _ => {
                        let extra: &[&str] = if c == 2 { &["--config", config] } else { &[] };
                        let (r, a) = self.with_agent(pid, extra, load)?;
                        (r, Some(a))
                    }
                });
            }
        }
        Ok(res)
    }

    /// The kernel side alone: the agent attached with a ring buffer that holds the whole round,
    /// then stopped (SIGSTOP) while `load` runs, so nothing is drained, parsed or exported. The
    /// round's counters are read after it is resumed: `lost()` says whether the buffer held.
    fn with_stopped_agent<T>(&self, pid: u32, load: &mut dyn FnMut() -> Result<T>) -> Result<(T, AgentRound)> {
        let mut agent = self.start_agent(pid, &["--ring-buffer-bytes", KERNEL_ONLY_RING])?;
        thread::sleep(Duration::from_millis(300));
        let apid = agent.guard.pid();
        let m0 = scrape(&agent.metrics_addr)?;
        signal(apid, SIGSTOP);
        let out = load();
        signal(apid, SIGCONT);
        // Long enough for a housekeeping tick to read the kernel's loss counters.
        thread::sleep(Duration::from_millis(1500));
        let m1 = scrape(&agent.metrics_addr)?;
        let round = AgentRound { delta: delta(&m0, &m1), ..AgentRound::default() };
        agent.guard.stop();
        Ok((out?, round))
    }

    /// Alternating rounds without / with the agent (ABBA order).
    fn alternate<T: Clone>(
        &self,
        pairs: usize,
        pid: u32,
        extra: &[&str],
        label: &str,
        load: &mut dyn FnMut() -> Result<T>,
    ) -> Result<Pairs<T>> {
        let mut p = Pairs { off: Vec::new(), on: Vec::new() };
        for i in 0..pairs {
            let order = if i % 2 == 0 { [false, true] } else { [true, false] };
            for on in order {
                eprintln!(
                    "bench: {label}: pair {}/{pairs}, {}",
                    i + 1,
                    if on { "with agent" } else { "without agent" }
                );
                if on {
                    p.on.push(self.with_agent(pid, extra, load)?);
                } else {
                    thread::sleep(Duration::from_millis(300));
                    p.off.push(load()?);
                }
            }
        }
        Ok(p)
    }
}

/// Results by condition of [`BUDGET`], each with the agent's round where the agent ran.
type ByCondition<T> = Vec<Vec<(T, Option<AgentRound>)>>;

struct Pairs<T> {
    off: Vec<T>,
    on: Vec<(T, AgentRound)>,
}

impl<T> Pairs<T> {
    fn off_vals(&self, f: impl Fn(&T) -> f64) -> Vec<f64> {
        self.off.iter().map(f).collect()
    }
    fn on_vals(&self, f: impl Fn(&T) -> f64) -> Vec<f64> {
        self.on.iter().map(|(t, _)| f(t)).collect()
    }
    fn agent_vals(&self, f: impl Fn(&T, &AgentRound) -> f64) -> Vec<f64> {
        self.on.iter().map(|(t, a)| f(t, a)).collect()
    }
    /// Median of on/off per pair, and the min–max of those ratios.
    fn ratio(&self, f: impl Fn(&T) -> f64) -> Ratio {
        let r: Vec<f64> = self.off.iter().zip(&self.on).map(|(a, (b, _))| f(b) / f(a)).collect();
        Ratio { off: median(&self.off_vals(&f)), on: median(&self.on_vals(&f)), ..Ratio::of(&r) }
    }
    fn rounds(&self) -> Vec<&AgentRound> {
        self.on.iter().map(|(_, a)| a).collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Ratio {
    off: f64,
    on: f64,
    median: f64,
    min: f64,
    max: f64,
}

impl Ratio {
    /// The median and the min–max of per-round ratios (no medians of the sides).
    fn of(r: &[f64]) -> Ratio {
        Ratio {
            off: 0.0,
            on: 0.0,
            median: median(r),
            min: r.iter().copied().fold(f64::INFINITY, f64::min),
            max: r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    fn cell(&self) -> String {
        if self.min.is_finite() && (self.max - self.min) > 0.0005 {
            format!("{:.3} ({:.2}–{:.2})", self.median, self.min, self.max)
        } else {
            format!("{:.3}", self.median)
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The agent's /metrics as `name{labels}` → value.
fn scrape(addr: &str) -> Result<BTreeMap<String, f64>> {
    let body = http_get(addr, "/metrics")?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// What each series of `m1` gained since `m0`.
fn delta(m0: &BTreeMap<String, f64>, m1: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    m1.iter().map(|(k, v)| (k.clone(), v - m0.get(k).copied().unwrap_or(0.0))).collect()
}

/// Sum of every series of `name` (all label sets).
fn sum_metric(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.as_str() == name || k.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
        .map(|(_, v)| v)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Load generators
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct WrkResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: f64,
    errors: f64,
}

fn parse_dur_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn wrk(port: u16, conns: u32, secs: u64) -> Result<WrkResult> {
    let out = run_bounded(
        Command::new("wrk")
            .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--latency"])
            .arg(format!("http://127.0.0.1:{port}/index.html")),
        "wrk",
        Duration::from_secs(secs + 20),
    )?;
    let mut r = WrkResult::default();
    for l in out.lines() {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_us = parse_dur_us(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_us = parse_dur_us(v).unwrap_or(f64::NAN);
        } else if t.contains(" requests in ") {
            r.requests = t.split_whitespace().next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            r.errors += v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<f64>().ok()).sum::<f64>();
        }
    }
    if r.rps <= 0.0 {
        bail!("could not parse wrk output:\n{out}");
    }
    Ok(r)
}

/// Result of the constant-rate generator.
#[derive(Clone, Debug, Default)]
struct RateRun {
    sent: u64,
    errors: u64,
    /// Requests sent more than 1 ms after their scheduled time (generator or server behind).
    late: u64,
    lat_ns: Vec<u64>,
    secs: f64,
}

impl RateRun {
    fn pct_us(&self, p: f64) -> f64 {
        if self.lat_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_ns.len() as f64 - 1.0) * p / 100.0).round() as usize;
        self.lat_ns[i] as f64 / 1e3
    }
    fn achieved(&self) -> f64 {
        self.lat_ns.len() as f64 / self.secs
    }
}

/// `conns` keep-alive connections, each its own thread, together sending `rate` requests per
/// second on a fixed schedule for `dur`; latency is from send to the last byte of the response.
fn http_at_rate(port: u16, rate: f64, conns: usize, dur: Duration) -> Result<RateRun> {
    let start = Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> =
        (0..conns).map(|i| thread::spawn(move || conn_loop(port, i, conns, rate, start, dur))).collect();
    let mut all = RateRun::default();
    for h in handles {
        let r = h.join().map_err(|_| anyhow!("generator thread panicked"))?;
        all.sent += r.sent;
        all.errors += r.errors;
        all.late += r.late;
        all.lat_ns.extend(r.lat_ns);
    }
    all.secs = dur.as_secs_f64();
    all.lat_ns.sort_unstable();
    if all.lat_ns.is_empty() {
        bail!("no request succeeded against 127.0.0.1:{port}");
    }
    Ok(all)
}

fn conn_loop(port: u16, i: usize, conns: usize, rate: f64, start: Instant, dur: Duration) -> RateRun {
    let req = b"GET /index.html HTTP/1.1\r\nHost: bench\r\n\r\n";
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let mut due = start + Duration::from_secs_f64(i as f64 / rate);
    let end = start + dur;
    let mut r = RateRun::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = vec![0u8; 64 * 1024];
    while due < end {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if due > now {
            thread::sleep(due - now);
        } else if now - due > Duration::from_millis(1) {
            r.late += 1;
        }
        if stream.is_none() {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    stream = Some(s);
                }
                Err(_) => {
                    r.errors += 1;
                    due += period;
                    continue;
                }
            }
        }
        let s = stream.as_mut().unwrap();
        let t = Instant::now();
        r.sent += 1;
        match exchange(s, req, &mut buf) {
            Ok(()) => r.lat_ns.push(t.elapsed().as_nanos() as u64),
            Err(_) => {
                r.errors += 1;
                stream = None;
            }
        }
        due += period;
    }
    r
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One HTTP/1.1 request and its whole response (Content-Length framed).
fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    s.write_all(req)?;
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(h) = find(&buf[..have], b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return Err(Error::other("status is not 200"));
            }
            let cl: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Error::other("no content-length"))?;
            let need = h + 4 + cl;
            if need > buf.len() {
                return Err(Error::other("response too large"));
            }
            while have < need {
                let n = s.read(&mut buf[have..need])?;
                if n == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                have += n;
            }
            return Ok(());
        }
        if have == buf.len() {
            return Err(Error::other("header too large"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

/// A load round plus the traced server's CPU ticks during it.
#[derive(Clone, Debug, Default)]
struct Served<T> {
    r: T,
    app_cpu_s: f64,
}

fn nginx_saturation(b: &Bench, plan: &Plan, nginx: &Nginx, rep: &mut Report) -> Result<()> {
    let secs = plan.sat_secs;
    let mut load = || -> Result<Served<WrkResult>> {
        let t0 = nginx.cpu_s(b.clk_tck);
        let r = wrk(nginx.port, 32, secs)?;
        Ok(Served { r, app_cpu_s: nginx.cpu_s(b.clk_tck) - t0 })
    };
    let p = b.alternate(plan.pairs, nginx.pid(), &[], "nginx saturation", &mut load)?;
    let thr = p.ratio(|s| s.r.rps);
    let p50 = p.ratio(|s| s.r.p50_us);
    let p99 = p.ratio(|s| s.r.p99_us);
    let app = p.ratio(|s| s.app_cpu_s / s.r.requests * 1e6);
    let cpu_us = median(&p.agent_vals(|s, a| a.cpu_s / s.r.requests * 1e6));
    let rotel_us = median(&p.agent_vals(|s, a| a.rotel_cpu_s / s.r.requests * 1e6));
    let rounds = p.rounds();
    let t = rep.table(
        &format!("1. nginx at saturation — wrk -t1 -c32, {secs} s rounds, {} alternating pairs", plan.pairs),
        &["metric", "without agent", "with agent", "with/without (per-pair range)"],
    );
    t.row(&["throughput (req/s)", &f0(thr.off), &f0(thr.on), &thr.cell()]);
    t.row(&["latency p50 (µs)", &f0(p50.off), &f0(p50.on), &p50.cell()]);
    t.row(&["latency p99 (µs)", &f0(p99.off), &f0(p99.on), &p99.cell()]);
    t.row(&["nginx CPU per request (µs, includes in-kernel eBPF)", &f1(app.off), &f1(app.on), &app.cell()]);
    t.row(&["agent CPU per request (µs, run time)", "", &f2(cpu_us), ""]);
    t.row(&["rotel CPU per request (µs, the collector)", "", &f2(rotel_us), ""]);
    t.row(&spans_row(&rounds));
    t.row(&["ring-buffer records lost", "", &f0(rounds.iter().map(|a| a.lost()).sum()), ""]);
    t.row(&cpu_policy_row(&rounds));
    rep.memory.extend(rounds.iter().map(|a| (*a).clone()));
    rep.check("throughput at saturation (nginx, wrk)", format!("{:.3}×", thr.median), "≥ 0.90×", thr.median >= 0.90);
    rep.check("agent CPU per request (nginx, saturation)", format!("{cpu_us:.2} µs"), "≤ 3 µs", cpu_us <= 3.0);
    rep.facts.sat_rps_off = thr.off;
    rep.facts.app_us_off = app.off;
    rep.facts.app_us_on = app.on;
    rep.facts.agent_us_sat = cpu_us;
    Ok(())
}

fn nginx_rate(b: &Bench, plan: &Plan, nginx: &Nginx, rate: u32, rep: &mut Report) -> Result<()> {
    let secs = plan.rate_secs;
    let conns = 4;
    let mut load = || -> Result<Served<RateRun>> {
        let t0 = nginx.cpu_s(b.clk_tck);
        let r = http_at_rate(nginx.port, rate as f64, conns, Duration::from_secs(secs))?;
        Ok(Served { r, app_cpu_s: nginx.cpu_s(b.clk_tck) - t0 })
    };
    let p = b.alternate(plan.pairs, nginx.pid(), &[], "nginx constant rate", &mut load)?;
    let done = p.ratio(|s| s.r.achieved());
    let p50 = p.ratio(|s| s.r.pct_us(50.0));
    let p90 = p.ratio(|s| s.r.pct_us(90.0));
    let p99 = p.ratio(|s| s.r.pct_us(99.0));
    let p999 = p.ratio(|s| s.r.pct_us(99.9));
    let app = p.ratio(|s| s.app_cpu_s / s.r.lat_ns.len() as f64 * 1e6);
    let late = p.ratio(|s| s.r.late as f64 / s.r.sent.max(1) as f64 * 100.0);
    let errors: u64 = p.off.iter().map(|s| s.r.errors).sum::<u64>() + p.on.iter().map(|(s, _)| s.r.errors).sum::<u64>();
    let cpu_us = median(&p.agent_vals(|s, a| a.cpu_s / s.r.lat_ns.len() as f64 * 1e6));
    let rounds = p.rounds();
    let t = rep.table(
        &format!(
            "2. nginx at a constant rate — {rate} req/s over {conns} keep-alive connections \
             (xtask generator), {secs} s rounds, {} alternating pairs",
            plan.pairs
        ),
        &["metric", "without agent", "with agent", "with/without (per-pair range)"],
    );
    t.row(&["requests/s served", &f0(done.off), &f0(done.on), &done.cell()]);
    t.row(&["latency p50 (µs)", &f0(p50.off), &f0(p50.on), &p50.cell()]);
    t.row(&["latency p90 (µs)", &f0(p90.off), &f0(p90.on), &p90.cell()]);
    t.row(&["latency p99 (µs)", &f0(p99.off), &f0(p99.on), &p99.cell()]);
    t.row(&["latency p99.9 (µs)", &f0(p999.off), &f0(p999.on), &p999.cell()]);
    // The noise floor of the p99 ratio: the same comparison between two rounds without the agent
    // (each round without and the next one without), which no agent can do better than.
    let p99_off = p.off_vals(|s| s.r.pct_us(99.0));
    let aa: Vec<f64> = p99_off.windows(2).map(|w| w[1] / w[0]).collect();
    let aa_dev = median(&aa.iter().map(|r| (r - 1.0).abs() * 100.0).collect::<Vec<_>>());
    if !aa.is_empty() {
        t.row(&[
            "p99 without agent, one round against the next (A/A noise): median |change|, range".to_string(),
            String::new(),
            String::new(),
            {
                let r = Ratio::of(&aa);
                format!("±{aa_dev:.1} % ({:.2}–{:.2})", r.min, r.max)
            },
        ]);
    }
    t.row(&["nginx CPU per request (µs, includes in-kernel eBPF)", &f1(app.off), &f1(app.on), &app.cell()]);
    t.row(&["requests sent > 1 ms late (%)", &f2(late.off), &f2(late.on), ""]);
    t.row(&["agent CPU per request (µs, run time)", "", &f2(cpu_us), ""]);
    t.row(&spans_row(&rounds));
    t.row(&["ring-buffer records lost", "", &f0(rounds.iter().map(|a| a.lost()).sum()), ""]);
    t.row(&cpu_policy_row(&rounds));
    if errors > 0 {
        rep.warnings.push(format!("constant-rate generator: {errors} failed requests"));
    }
    rep.memory.extend(rounds.iter().map(|a| (*a).clone()));
    let dp99 = (p99.median - 1.0) * 100.0;
    rep.check(
        &format!("p99 latency at a constant {rate} req/s (nginx)"),
        if aa.is_empty() { format!("{dp99:+.1} %") } else { format!("{dp99:+.1} % (A/A noise ±{aa_dev:.1} %)") },
        "≤ +10 %",
        dp99 <= 10.0,
    );
    rep.check(
        &format!("agent CPU per request (nginx, {rate} req/s)"),
        format!("{cpu_us:.2} µs"),
        "≤ 3 µs",
        cpu_us <= 3.0,
    );
    rep.facts.agent_us_rate = cpu_us;
    Ok(())
}

/// Busy and total CPU time of the whole machine, in seconds summed over its CPUs, from the first
/// line of `/proc/stat` (clock ticks). Busy is user + nice + system + irq + softirq (guest time is
/// inside user); total adds idle and iowait. Steal, the hypervisor's, is in neither.
fn machine_cpu_s(tck: f64) -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let g = |i: usize| f.get(i).copied().unwrap_or(0.0);
    let busy = g(0) + g(1) + g(2) + g(5) + g(6);
    (busy / tck, (busy + g(3) + g(4)) / tck)
}

/// One saturation round of the budget section: what nginx served and who used the CPU for it.
#[derive(Clone, Debug, Default)]
struct BudgetRound {
    rps: f64,
    requests: f64,
    nginx_s: f64,
    rotel_s: f64,
    agent_s: f64,
    /// Busy CPU of the whole machine over the round and the second after it (every process,
    /// interrupts included): what the round's requests cost in all.
    busy_s: f64,
    /// Share of the machine's CPU time that was busy while wrk ran.
    busy_share: f64,
}

/// The conditions of the budget section, each adding one layer to the one before. The last,
/// the kernel side alone, runs at the constant rate only (table 1c): at saturation no ring
/// buffer holds a round's records.
const BUDGET: [&str; 5] = [
    "nothing attached",
    "empty raw_tracepoint/sys_exit program only (the hook floor)",
    "agent tracing nginx, spans built, none exported (sampling_ratio 0)",
    "agent tracing nginx, every span exported to the collector (as table 1)",
    "kernel side only: the agent attached with a 64 MiB ring buffer and stopped (SIGSTOP) for the round",
];
/// The ring buffer of the kernel-side-only condition: a 10 s round at 3000 requests/s writes
/// ~27 MB of records, under half of it (where every record would force a wake-up).
const KERNEL_ONLY_RING: &str = "67108864";

/// Where the CPU goes at saturation: nginx under wrk with nothing attached, with only the empty
/// hook the data path uses, with the agent exporting nothing, and with the whole agent, rounds in
/// rotated order. Each round splits the machine's busy time per request into nginx (in-kernel
/// eBPF included), the agent, the collector and the rest (wrk, interrupts, everything else). On
/// a saturated machine throughput follows that sum, so the table shows what each layer costs and
/// what any tracer that exports every span to a collector on the same CPUs cannot avoid. Then the
/// same four conditions at a constant moderate rate, for the latency percentiles of each.
fn budget(b: &Bench, plan: &Plan, nginx: &Nginx, rate: u32, work: &Path, rep: &mut Report) -> Result<()> {
    let secs = plan.sat_secs;
    let rounds = plan.db_pairs;
    let config = work.join("budget-no-export.yaml");
    std::fs::write(&config, "services:\n  - match: { exe: nginx }\n    sampling_ratio: 0.0\n")?;
    let config = config.to_string_lossy().into_owned();
    let tck = b.clk_tck;
    let mut load = || -> Result<BudgetRound> {
        let (b0, t0) = machine_cpu_s(tck);
        let n0 = nginx.cpu_s(tck);
        let r0 = cpu_s(b.rotel.pid(), tck);
        let w = wrk(nginx.port, 32, secs)?;
        let (b1, t1) = machine_cpu_s(tck);
        // The agent finishes what the load produced: its CPU, and the collector's, count.
        thread::sleep(Duration::from_millis(1000));
        let (b2, _) = machine_cpu_s(tck);
        Ok(BudgetRound {
            rps: w.rps,
            requests: w.requests.max(1.0),
            nginx_s: nginx.cpu_s(tck) - n0,
            rotel_s: cpu_s(b.rotel.pid(), tck) - r0,
            agent_s: 0.0,
            busy_s: b2 - b0,
            busy_share: (b1 - b0) / (t1 - t0).max(1e-9),
        })
    };
    let mut res: [Vec<BudgetRound>; 4] = Default::default();
    let (mut exported, mut sampled_out, mut lost) = (0.0, 0.0, 0.0);
    let runs = b.budget_rounds(nginx.pid(), &config, (rounds, 4), "budget", &mut load)?;
    for (c, rs) in runs.into_iter().enumerate() {
        for (mut r, a) in rs {
            if let Some(a) = a {
                r.agent_s = a.cpu_s;
                lost += a.lost();
                if c == 2 {
                    exported += a.d("waybill_spans_exported_total");
                    sampled_out += a.d("waybill_spans_sampled_out_total");
                }
            }
            res[c].push(r);
        }
    }
    // The no-export condition must have built the spans and exported none, or it measured
    // something else.
    if exported > 0.0 || sampled_out == 0.0 {
        rep.warnings.push(format!(
            "budget: the no-export rounds exported {} spans and sampled out {}: that row is not what it says",
            f0(exported),
            f0(sampled_out)
        ));
    }
    let per_req = |c: usize, f: &dyn Fn(&BudgetRound) -> f64| -> f64 {
        median(&res[c].iter().map(|r| f(r) / r.requests * 1e6).collect::<Vec<_>>())
    };
    let busy = |c: usize| per_req(c, &|r| r.busy_s);
    let rest = |c: usize| per_req(c, &|r| r.busy_s - r.nginx_s - r.rotel_s - r.agent_s);
    let vs_off =
        |c: usize| -> Ratio { Ratio::of(&res[c].iter().zip(&res[0]).map(|(x, o)| x.rps / o.rps).collect::<Vec<_>>()) };
    let t = rep.table(
        &format!(
            "1b. Where the CPU goes at saturation — nginx under wrk -t1 -c32, {secs} s rounds, {rounds} \
             rounds per condition in rotated order; CPU per request from the scheduler's run time \
             (nginx, agent, collector) and /proc/stat (the whole machine)"
        ),
        &[
            "condition",
            "req/s",
            "throughput vs nothing (range)",
            "nginx µs/req (in-kernel eBPF included)",
            "agent µs/req",
            "collector µs/req",
            "rest µs/req (wrk, interrupts, others)",
            "whole machine µs/req",
            "predicted from CPU (machine µs without / with)",
            "CPUs busy while wrk ran",
        ],
    );
    let busy_off = busy(0);
    for (c, label) in BUDGET.iter().enumerate().take(4) {
        let ratio = vs_off(c);
        t.row(&[
            label.to_string(),
            f0(median(&res[c].iter().map(|r| r.rps).collect::<Vec<_>>())),
            if c == 0 { "1".into() } else { ratio.cell() },
            f2(per_req(c, &|r| r.nginx_s)),
            if c >= 2 { f2(per_req(c, &|r| r.agent_s)) } else { "—".into() },
            f2(per_req(c, &|r| r.rotel_s)),
            f2(rest(c)),
            f2(busy(c)),
            if c == 0 { "1".into() } else { format!("{:.3}", busy_off / busy(c)) },
            format!("{:.0} %", 100.0 * median(&res[c].iter().map(|r| r.busy_share).collect::<Vec<_>>())),
        ]);
    }
    t.row(&[
        "records lost / no-export rounds: spans sampled out, exported".to_string(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        format!("{} / {}, {}", f0(lost), f0(sampled_out), f0(exported)),
    ]);
    // The same conditions at a constant moderate rate: which layer the tail comes from.
    let conns = 4;
    let rate_secs = plan.rate_secs;
    let mut rload = || http_at_rate(nginx.port, rate as f64, conns, Duration::from_secs(rate_secs));
    let runs = b.budget_rounds(nginx.pid(), &config, (rounds, 5), &format!("budget at {rate} req/s"), &mut rload)?;
    let kernel_only_lost: f64 = runs[4].iter().filter_map(|(_, a)| a.as_ref()).map(|a| a.lost()).sum();
    let tail: Vec<Vec<RateRun>> = runs.into_iter().map(|rs| rs.into_iter().map(|(r, _)| r).collect()).collect();
    let pct = |c: usize, p: f64| median(&tail[c].iter().map(|r| r.pct_us(p)).collect::<Vec<_>>());
    let t = rep.table(
        &format!(
            "1c. Where the tail comes from — nginx at a constant {rate} req/s over {conns} keep-alive \
             connections, {rate_secs} s rounds, the conditions of table 1b and the kernel side alone, {rounds} rounds each in \
             rotated order"
        ),
        &["condition", "p50 (µs)", "p90 (µs)", "p99 (µs)", "p99.9 (µs)", "p99 vs nothing (range)"],
    );
    let mut p99_vs_off = [0.0; 5];
    // The kernel side alone between the hook and the whole agent.
    for c in [0, 1, 4, 2, 3] {
        let label = BUDGET[c];
        let r: Vec<f64> = tail[c].iter().zip(&tail[0]).map(|(x, o)| x.pct_us(99.0) / o.pct_us(99.0)).collect();
        let ratio = Ratio::of(&r);
        p99_vs_off[c] = ratio.median;
        t.row(&[
            label.to_string(),
            f0(pct(c, 50.0)),
            f0(pct(c, 90.0)),
            f0(pct(c, 99.0)),
            f0(pct(c, 99.9)),
            if c == 0 { "1".into() } else { ratio.cell() },
        ]);
    }
    t.row(&[
        "records lost in the kernel-side-only rounds (0: the ring buffer held them all)".to_string(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        f0(kernel_only_lost),
    ]);
    if kernel_only_lost > 0.0 {
        rep.warnings.push(format!(
            "budget: the kernel-side-only rounds lost {} records: the ring buffer did not hold the round",
            f0(kernel_only_lost)
        ));
    }
    rep.facts.budget = Some(Budget {
        p99_vs_off,
        busy_off,
        hook_us: busy(1) - busy_off,
        hook_ratio: vs_off(1).median,
        no_export_ratio: vs_off(2).median,
        full_ratio: vs_off(3).median,
        collector_us: per_req(3, &|r| r.rotel_s),
        agent_us: per_req(3, &|r| r.agent_s),
        kernel_us: per_req(3, &|r| r.nginx_s) - per_req(0, &|r| r.nginx_s),
    });
    Ok(())
}

fn spans_row(rounds: &[&AgentRound]) -> [String; 4] {
    let s = |n: &str| rounds.iter().map(|a| a.d(n)).sum::<f64>();
    [
        "spans created / exported / dropped (sum of rounds)".into(),
        String::new(),
        format!(
            "{} / {} / {}",
            f0(s("waybill_spans_created_total")),
            f0(s("waybill_spans_exported_total")),
            f0(s("waybill_spans_dropped_total"))
        ),
        String::new(),
    ]
}

/// Where losses happened, round by round: records the kernel could not put in the ring buffer,
/// spans dropped with their reason (`queue_full`: the agent's span queue; `export_backlog`: the
/// collector did not take them in time). Empty when nothing was lost.
fn losses_row(rounds: &[&AgentRound]) -> Option<[String; 4]> {
    let per: Vec<String> = rounds
        .iter()
        .enumerate()
        .filter(|(_, a)| a.lost() > 0.0 || a.d("waybill_spans_dropped_total") > 0.0)
        .map(|(i, a)| {
            let q = a.d("waybill_spans_dropped_total{reason=\"queue_full\"}");
            let e = a.d("waybill_spans_dropped_total{reason=\"export_backlog\"}");
            format!(
                "round {}: {} records lost, spans dropped {} queue_full / {} export_backlog",
                i + 1,
                f0(a.lost()),
                f0(q),
                f0(e)
            )
        })
        .collect();
    (!per.is_empty()).then(|| ["losses by round".into(), String::new(), per.join("; "), String::new()])
}

fn postgres(b: &Bench, plan: &Plan, tools: &Tools, rep: &mut Report) -> Result<()> {
    let bin =
        tools.pg_bin.clone().ok_or_else(|| anyhow!("no PostgreSQL server binaries (initdb, postgres, pgbench)"))?;
    let (uid, gid) = user_ids("postgres")
        .or_else(|| user_ids("nobody"))
        .ok_or_else(|| anyhow!("neither a `postgres` nor a `nobody` user exists"))?;
    let dir = TempDir::new("pg")?;
    chown(dir.path(), Some(uid), Some(gid))?;
    let data = dir.path().join("data");
    eprintln!("bench: initdb of a throwaway cluster in {}", data.display());
    run_bounded(
        Command::new(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid),
        "initdb",
        Duration::from_secs(120),
    )?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("postgres.log"))?;
    chown(dir.path().join("postgres.log"), Some(uid), Some(gid))?;
    let mut server = Guard::spawn(
        Command::new(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=off", "-c", "shared_buffers=128MB"])
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
        "postgres",
        SIGINT, // fast shutdown
        Duration::from_secs(20),
    )?;
    wait_port(port, Duration::from_secs(30), &mut server)?;
    let pgbench = |args: &[&str], secs: u64| -> Result<String> {
        run_bounded(
            Command::new(bin.join("pgbench"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .args(args)
                .arg("postgres"),
            "pgbench",
            Duration::from_secs(secs),
        )
    };
    eprintln!("bench: pgbench -i -s 5");
    pgbench(&["-i", "-q", "-s", "5"], 300)?;
    let secs = plan.db_secs;
    let tck = b.clk_tck;
    // Queries/s (one SELECT per select-only transaction) and the machine's busy CPU for them.
    let pm = server.pid();
    let mut load = || -> Result<(f64, f64, f64)> {
        let (b0, _) = machine_cpu_s(tck);
        let s0 = cpu_with_reaped_children(pm, tck);
        let out = pgbench(&["-n", "-S", "-c", "4", "-j", "2", "-T", &secs.to_string()], secs + 60)?;
        let (b1, _) = machine_cpu_s(tck);
        let s1 = cpu_with_reaped_children(pm, tck);
        let tps = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("tps = "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow!("no tps in pgbench output:\n{out}"))?;
        Ok((tps, b1 - b0, s1 - s0))
    };
    let _ = load()?; // warm-up
    let p = b.alternate(plan.db_pairs, server.pid(), &[], "postgres", &mut load)?;
    let tps = p.ratio(|t| t.0);
    let per_query = |t: &(f64, f64, f64), s: f64| s / (t.0 * secs as f64) * 1e6;
    let cpu_us = median(&p.agent_vals(|t, a| per_query(t, a.cpu_s)));
    let rotel_us = median(&p.agent_vals(|t, a| per_query(t, a.rotel_cpu_s)));
    let busy = p.ratio(|t| per_query(t, t.1));
    let pg_cpu = p.ratio(|t| per_query(t, t.2));
    let rounds = p.rounds();
    let t = rep.table(
        &format!(
            "4a. PostgreSQL 15 — pgbench -S -c4 -j2 (select-only, scale 5), {secs} s rounds, {} \
             alternating pairs",
            plan.db_pairs
        ),
        &["metric", "without agent", "with agent", "with/without (per-pair range)"],
    );
    t.row(&["transactions/s", &f0(tps.off), &f0(tps.on), &tps.cell()]);
    t.row(&["agent CPU per query (µs)", "", &f2(cpu_us), ""]);
    t.row(&["collector CPU per query (µs)", "", &f2(rotel_us), ""]);
    t.row(&[
        "PostgreSQL CPU per query (µs: postmaster and its backends, in-kernel eBPF included)",
        &f2(pg_cpu.off),
        &f2(pg_cpu.on),
        &pg_cpu.cell(),
    ]);
    t.row(&["whole machine CPU per query (µs, /proc/stat)", &f2(busy.off), &f2(busy.on), &busy.cell()]);
    t.row(&[
        "what 0.90× leaves for everything tracing adds (µs per query)".to_string(),
        f2((1.0 / 0.9 - 1.0) * busy.off),
        String::new(),
        String::new(),
    ]);
    t.row(&spans_row(&rounds));
    t.row(&["ring-buffer records lost", "", &f0(rounds.iter().map(|a| a.lost()).sum()), ""]);
    if let Some(r) = losses_row(&rounds) {
        t.row(&r);
    }
    rep.memory.extend(rounds.iter().map(|a| (*a).clone()));
    rep.check("throughput, PostgreSQL pgbench -S", format!("{:.3}×", tps.median), "≥ 0.90×", tps.median >= 0.90);
    server.stop();
    Ok(())
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let pw = std::fs::read_to_string("/etc/passwd").ok()?;
    pw.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn redis(b: &Bench, plan: &Plan, rep: &mut Report) -> Result<()> {
    let dir = TempDir::new("redis")?;
    let port = free_port()?;
    let mut server = Guard::spawn(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "redis-server",
        SIGTERM,
        Duration::from_secs(10),
    )?;
    wait_port(port, Duration::from_secs(10), &mut server)?;
    // (SET, GET) requests/s without and with -P 16.
    let bench = |pipeline: u32, n: u64| -> Result<(f64, f64)> {
        let out = run_bounded(
            Command::new("redis-benchmark")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-t", "set,get", "-c", "50", "--csv"])
                .args(["-n", &n.to_string(), "-P", &pipeline.to_string()]),
            "redis-benchmark",
            Duration::from_secs(180),
        )?;
        let get = |name: &str| -> Result<f64> {
            out.lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(',').map(|x| x.trim_matches('"')).collect();
                    (f.first() == Some(&name)).then(|| f.get(1)?.parse::<f64>().ok())?
                })
                .ok_or_else(|| anyhow!("no {name} in redis-benchmark output:\n{out}"))
        };
        Ok((get("SET")?, get("GET")?))
    };
    let (n1, n16) = (plan.redis_n, plan.redis_pipelined_n);
    let mut load = || -> Result<[f64; 4]> {
        let a = bench(1, n1)?;
        let b = bench(16, n16)?;
        Ok([a.0, a.1, b.0, b.1])
    };
    let _ = bench(1, n1 / 2)?; // warm-up
    let p = b.alternate(plan.db_pairs, server.pid(), &[], "redis", &mut load)?;
    let rounds = p.rounds();
    let t = rep.table(
        &format!(
            "4b. Redis 7 — redis-benchmark -c50 -t set,get (-n {n1}; pipelined -P 16 -n {n16}), {} \
             alternating pairs",
            plan.db_pairs
        ),
        &["metric", "without agent", "with agent", "with/without (per-pair range)"],
    );
    let mut worst = f64::INFINITY;
    for (i, name) in ["SET req/s", "GET req/s", "SET req/s, -P 16", "GET req/s, -P 16"].iter().enumerate() {
        let r = p.ratio(|v| v[i]);
        worst = worst.min(r.median);
        t.row(&[name.to_string(), f0(r.off), f0(r.on), r.cell()]);
    }
    // Every round runs SET and GET n times each, without and with pipelining.
    let commands = 2.0 * (n1 + n16) as f64;
    let (agent_us, rotel_us) = (
        median(&p.agent_vals(|_, a| a.cpu_s / commands * 1e6)),
        median(&p.agent_vals(|_, a| a.rotel_cpu_s / commands * 1e6)),
    );
    t.row(&[
        "agent / collector CPU per command (µs, all four runs)",
        "",
        &format!("{} / {}", f2(agent_us), f2(rotel_us)),
        "",
    ]);
    t.row(&spans_row(&rounds));
    t.row(&["ring-buffer records lost", "", &f0(rounds.iter().map(|a| a.lost()).sum()), ""]);
    if let Some(r) = losses_row(&rounds) {
        t.row(&r);
    }
    rep.memory.extend(rounds.iter().map(|a| (*a).clone()));
    rep.check("throughput, Redis (worst of SET/GET, ±pipelining)", format!("{worst:.3}×"), "≥ 0.90×", worst >= 0.90);
    Ok(())
}

/// A load step that returns how many operations it completed.
type LoadFn = Box<dyn Fn() -> Result<f64>>;

/// The hookbench program (see xtask/bench/hookbench.c) and the peer that drains its socket.
struct HookBench {
    guard: Guard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl HookBench {
    fn start(bin: &Path) -> Result<HookBench> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        let mut guard = Guard::spawn(
            Command::new(bin)
                .arg(port.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
            "hookbench",
            SIGKILL,
            Duration::from_secs(2),
        )?;
        let stdin = guard.child.stdin.take().unwrap();
        let mut stdout = BufReader::new(guard.child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let pid = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| anyhow!("hookbench said {line:?}"))?;
        Ok(HookBench { guard, stdin, stdout, pid })
    }

    /// Runs one command; returns its first number (ns per op, or writes per second).
    fn cmd(&mut self, c: &str) -> Result<f64> {
        writeln!(self.stdin, "{c}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        // Commands are bounded by N; a dead process gives EOF.
        self.stdout.read_line(&mut line)?;
        line.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("hookbench `{c}` said {line:?} (alive: {})", self.guard.alive()))
    }
}

fn events(b: &Bench, plan: &Plan, nginx: &Nginx, hookbench: &Path, rep: &mut Report) -> Result<()> {
    let stats = Sysctl::set(BPF_STATS, "1")?;
    let secs = plan.sweep_secs;
    // (label, achieved ops/s, events/s, lost, eBPF ns per op, agent CPU µs per op)
    let mut steps: Vec<[String; 7]> = Vec::new();
    let mut best_zero_loss: f64 = 0.0;
    let mut first_loss: Option<f64> = None;

    // (a) nginx: constant-rate steps, then wrk at saturation with 64 connections.
    {
        let mut agent = b.start_agent(nginx.pid(), &[])?;
        thread::sleep(Duration::from_millis(300));
        let apid = agent.guard.pid();
        let mut loads: Vec<(String, LoadFn)> = Vec::new();
        for &r in &plan.sweep_rates {
            let port = nginx.port;
            loads.push((
                format!("nginx, {r} req/s offered"),
                Box::new(move || Ok(http_at_rate(port, r as f64, 8, Duration::from_secs(secs))?.lat_ns.len() as f64)),
            ));
        }
        let port = nginx.port;
        loads.push(("nginx, wrk -c64 (saturation)".into(), Box::new(move || Ok(wrk(port, 64, secs)?.requests))));
        for (label, load) in loads {
            eprintln!("bench: events: {label}");
            let m0 = scrape(&agent.metrics_addr)?;
            let c0 = cpu_s(apid, b.clk_tck);
            let k0 = bpf_use(apid);
            let t0 = Instant::now();
            let n = load()?;
            let el = t0.elapsed().as_secs_f64();
            thread::sleep(Duration::from_millis(500));
            let m1 = scrape(&agent.metrics_addr)?;
            let c1 = cpu_s(apid, b.clk_tck);
            let k1 = bpf_use(apid);
            let d = |name: &str| sum_metric(&m1, name) - sum_metric(&m0, name);
            let ev = d("waybill_ringbuf_records_received_total");
            let lost = d("waybill_ringbuf_records_lost_total");
            let evs = ev / el;
            if lost == 0.0 {
                best_zero_loss = best_zero_loss.max(evs);
            } else if first_loss.is_none_or(|f| evs < f) {
                first_loss = Some(evs);
            }
            steps.push([
                label,
                f0(n / el),
                f0(evs),
                f0(lost),
                f0((k1.run_ns - k0.run_ns) as f64 / n),
                f2((c1 - c0) / n * 1e6),
                format!("{} / {}", f0(d("waybill_spans_exported_total")), f0(d("waybill_spans_dropped_total"))),
            ]);
        }
        if !agent.guard.alive() {
            bail!("waybill died during the sweep:\n{}", agent.stderr.lock().unwrap());
        }
        agent.guard.stop();
    }

    // (b) 64 B writes to a loopback TCP socket, paced.
    {
        let mut hb = HookBench::start(hookbench)?;
        let mut agent = b.start_agent(hb.pid, &[])?;
        thread::sleep(Duration::from_millis(300));
        let apid = agent.guard.pid();
        for &r in &plan.write_rates {
            let n = if r == 0 { 250_000 * secs } else { r as u64 * secs };
            let label =
                if r == 0 { "64 B TCP writes, unpaced".to_string() } else { format!("64 B TCP writes, {r}/s offered") };
            eprintln!("bench: events: {label}");
            let m0 = scrape(&agent.metrics_addr)?;
            let c0 = cpu_s(apid, b.clk_tck);
            let k0 = bpf_use(apid);
            let t0 = Instant::now();
            let achieved = hb.cmd(&format!("tcprate {n} {r}"))?;
            let el = t0.elapsed().as_secs_f64();
            thread::sleep(Duration::from_millis(500));
            let m1 = scrape(&agent.metrics_addr)?;
            let c1 = cpu_s(apid, b.clk_tck);
            let k1 = bpf_use(apid);
            let d = |name: &str| sum_metric(&m1, name) - sum_metric(&m0, name);
            let ev = d("waybill_ringbuf_records_received_total");
            let lost = d("waybill_ringbuf_records_lost_total");
            let evs = (ev + lost) / el;
            if lost == 0.0 {
                best_zero_loss = best_zero_loss.max(ev / el);
            } else if first_loss.is_none_or(|f| evs < f) {
                first_loss = Some(evs);
            }
            steps.push([
                label,
                f0(achieved),
                f0(ev / el),
                f0(lost),
                f0((k1.run_ns - k0.run_ns) as f64 / n as f64),
                f2((c1 - c0) / n as f64 * 1e6),
                String::from("–"),
            ]);
        }
        if !agent.guard.alive() {
            bail!("waybill died during the write sweep:\n{}", agent.stderr.lock().unwrap());
        }
        agent.guard.stop();
    }
    drop(stats);

    let t = rep.table(
        &format!(
            "5a. Event rate — one agent per sweep, {secs} s steps (eBPF time from \
             kernel.bpf_stats_enabled, on for this section only)"
        ),
        &[
            "load",
            "achieved ops/s",
            "ring-buffer records/s received",
            "records lost",
            "eBPF ns per op",
            "agent CPU µs per op",
            "spans exported / dropped",
        ],
    );
    for s in &steps {
        t.row(s);
    }
    rep.check(
        "highest event rate with 0 lost records",
        format!(
            "{} records/s{}",
            f0(best_zero_loss),
            first_loss
                .map(|f| format!(" (first loss at {} records/s offered)", f0(f)))
                .unwrap_or_else(|| " (no loss seen in the sweep)".into())
        ),
        "≥ 50 000/s",
        best_zero_loss >= 50_000.0,
    );

    // (c) A 16 KiB ring buffer: drops are counted, the app stays healthy.
    let secs = plan.sat_secs;
    let mut load = || wrk(nginx.port, 32, secs);
    let pairs = plan.pairs.min(3);
    let p = b.alternate(pairs, nginx.pid(), &["--ring-buffer-bytes", "16384"], "tiny ring buffer", &mut load)?;
    let thr = p.ratio(|w| w.rps);
    let p99 = p.ratio(|w| w.p99_us);
    let rounds = p.rounds();
    let recv: f64 = rounds.iter().map(|a| a.d("waybill_ringbuf_records_received_total")).sum();
    let lost: f64 = rounds.iter().map(|a| a.lost()).sum();
    let errs: f64 = p.off.iter().map(|w| w.errors).sum::<f64>() + p.on.iter().map(|(w, _)| w.errors).sum::<f64>();
    let t = rep.table(
        &format!(
            "5b. Beyond the limit — --ring-buffer-bytes 16384, nginx under wrk -c32, {secs} s \
             rounds, {pairs} alternating pairs"
        ),
        &["metric", "without agent", "with agent", "with/without (per-pair range)"],
    );
    t.row(&["throughput (req/s)", &f0(thr.off), &f0(thr.on), &thr.cell()]);
    t.row(&["latency p99 (µs)", &f0(p99.off), &f0(p99.on), &p99.cell()]);
    t.row(&["records received / lost (counted)", "", &format!("{} / {}", f0(recv), f0(lost)), ""]);
    t.row(&spans_row(&rounds));
    t.row(&["HTTP errors seen by wrk", "", &f0(errs), ""]);
    Ok(())
}

fn hooks(b: &Bench, plan: &Plan, hookbench: &Path, rep: &mut Report) -> Result<()> {
    let mut hb = HookBench::start(hookbench)?;
    // A bystander target: the agent traces this, not hookbench.
    let mut other = Guard::spawn(
        Command::new("sleep").arg("3600").stdin(Stdio::null()).stdout(Stdio::null()),
        "sleep",
        SIGKILL,
        Duration::from_secs(2),
    )?;
    let (ntcp, nnull) = (plan.hook_tcp_n, plan.hook_null_n);
    let measure = |hb: &mut HookBench| -> Result<[f64; 2]> {
        Ok([hb.cmd(&format!("tcp {ntcp}"))?, hb.cmd(&format!("null {nnull}"))?])
    };
    let _ = measure(&mut hb)?; // warm-up
    // Conditions: 0 = no agent, 1 = agent tracing hookbench, 2 = agent tracing another process.
    let mut res: [Vec<[f64; 2]>; 3] = Default::default();
    let mut lost = 0.0;
    let mut received = 0.0;
    for i in 0..plan.hook_pairs {
        let mut order = [0usize, 1, 2];
        order.rotate_left(i % 3);
        for c in order {
            eprintln!("bench: hooks: round {}/{}, condition {c}", i + 1, plan.hook_pairs);
            match c {
                0 => res[0].push(measure(&mut hb)?),
                1 => {
                    let (v, a) = b.with_agent(hb.pid, &[], &mut || measure(&mut hb))?;
                    lost += a.lost();
                    received += a.d("waybill_ringbuf_records_received_total");
                    res[1].push(v);
                }
                _ => {
                    let (v, _) = b.with_agent(other.pid(), &[], &mut || measure(&mut hb))?;
                    res[2].push(v);
                }
            }
        }
    }
    other.stop();
    // The floor: the same writes with one empty program on each hook type, nothing else attached.
    // A uprobe costs ~100× a tracepoint here: its rounds do a fiftieth of the writes.
    const FLOOR: [(&str, &str, u64); 3] = [
        ("raw-sys-exit", "empty raw_tracepoint/sys_exit (the hook Waybill's data path uses)", 1),
        ("syscall-tracepoint", "empty tracepoint syscalls/sys_enter_write", 1),
        ("uprobe", "empty uprobe on libc write() of this process", 50),
    ];
    let mut floor: Vec<[Vec<f64>; 2]> = vec![Default::default(); FLOOR.len()];
    let mut floor_base: [Vec<f64>; 2] = Default::default();
    for i in 0..plan.hook_pairs {
        for (h, (hook, _, div)) in FLOOR.iter().enumerate() {
            eprintln!("bench: hooks: floor round {}/{}, {hook}", i + 1, plan.hook_pairs);
            let (nt, nn) = ((ntcp / div).max(1000), (nnull / div).max(1000));
            let run = |hb: &mut HookBench| -> Result<[f64; 2]> {
                Ok([hb.cmd(&format!("tcp {nt}"))?, hb.cmd(&format!("null {nn}"))?])
            };
            let base = run(&mut hb)?;
            let v = b.with_floor(hook, hb.pid, &mut || run(&mut hb))?;
            for k in 0..2 {
                floor_base[k].push(base[k]);
                floor[h][k].push(v[k] - base[k]);
            }
        }
    }
    let med = |c: usize, k: usize| median(&res[c].iter().map(|v| v[k]).collect::<Vec<_>>());
    let t = rep.table(
        &format!(
            "6. Per-syscall floor — hookbench (C): 64 B write()s, {ntcp} to loopback TCP and \
             {nnull} to /dev/null per round, {} rounds per condition",
            plan.hook_pairs
        ),
        &[
            "write() of 64 B to",
            "no agent (ns)",
            "agent tracing this process (ns, +added)",
            "agent tracing another process (ns, +added)",
        ],
    );
    for (k, name) in ["loopback TCP socket (traced: a data record)", "/dev/null (not a socket)"].iter().enumerate() {
        let (a, on, by) = (med(0, k), med(1, k), med(2, k));
        t.row(&[
            name.to_string(),
            f0(a),
            format!("{} ({})", f0(on), signed(on - a)),
            format!("{} ({})", f0(by), signed(by - a)),
        ]);
    }
    t.row(&["records received / lost while tracing it", "", &format!("{} / {}", f0(received), f0(lost)), ""]);
    let t = rep.table(
        &format!(
            "6b. Hook floor — one empty eBPF program attached (`waybill floor`), nothing else; each \
             measured against a round without it just before, {} rounds",
            plan.hook_pairs
        ),
        &["hook", "added per 64 B TCP write() (ns)", "added per 64 B /dev/null write() (ns)"],
    );
    t.row(&["(no hook: ns per write)".to_string(), f0(median(&floor_base[0])), f0(median(&floor_base[1]))]);
    for (h, (_, label, _)) in FLOOR.iter().enumerate() {
        t.row(&[label.to_string(), signed(median(&floor[h][0])), signed(median(&floor[h][1]))]);
    }
    rep.facts.floor_raw_exit_ns = median(&floor[0][1]);
    rep.facts.floor_uprobe_ns = median(&floor[2][1]);
    rep.facts.hook_tcp_ns = med(1, 0) - med(0, 0);
    rep.facts.hook_null_ns = med(1, 1) - med(0, 1);
    rep.facts.hook_bystander_ns = med(2, 0) - med(0, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// How often the agent switched between yielding and competing for CPU (`--cpu-policy`).
fn cpu_policy_row(rounds: &[&AgentRound]) -> [String; 4] {
    let n: f64 = rounds.iter().map(|a| a.d("waybill_cpu_policy_switches_total")).sum();
    let yielding = rounds.iter().filter(|a| a.yielding_at_end).count();
    [
        "agent CPU policy switches (sum) / rounds ending yielding".into(),
        String::new(),
        format!("{} / {} of {}", f0(n), yielding, rounds.len()),
        String::new(),
    ]
}

/// A difference with its sign: `+61`, `−78`.
fn signed(v: f64) -> String {
    if v < -0.5 { format!("−{}", f0(-v)) } else { format!("+{}", f0(v)) }
}

fn f0(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    if v < -0.5 { format!("-{out}") } else { out }
}

fn f1(v: f64) -> String {
    if v.is_finite() { format!("{v:.1}") } else { "n/a".into() }
}

fn f2(v: f64) -> String {
    if v.is_finite() { format!("{v:.2}") } else { "n/a".into() }
}

struct Table {
    title: String,
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        self.rows.push(cells.iter().map(|c| c.as_ref().to_string()).collect());
    }
}

/// Numbers other parts of the report refer to.
#[derive(Default)]
struct Facts {
    sat_rps_off: f64,
    app_us_off: f64,
    app_us_on: f64,
    agent_us_sat: f64,
    agent_us_rate: f64,
    hook_tcp_ns: f64,
    hook_null_ns: f64,
    hook_bystander_ns: f64,
    /// Added per /dev/null write() by an empty raw_tracepoint/sys_exit program, and by an empty uprobe.
    floor_raw_exit_ns: f64,
    floor_uprobe_ns: f64,
    budget: Option<Budget>,
}

/// What the budget section (tables 1b and 1c) found, for the notes under the summary.
#[derive(Debug, Default)]
struct Budget {
    /// Busy CPU of the whole machine per request with nothing attached (µs).
    busy_off: f64,
    /// Added to it by the empty hook alone (µs).
    hook_us: f64,
    hook_ratio: f64,
    no_export_ratio: f64,
    full_ratio: f64,
    /// Per request with the whole agent: the collector's, the agent's, and the in-kernel cost
    /// charged to nginx (µs).
    collector_us: f64,
    agent_us: f64,
    kernel_us: f64,
    /// p99 at a constant rate against nothing attached, per condition of [`BUDGET`] (table 1c).
    p99_vs_off: [f64; 5],
}

struct Report {
    header: Vec<String>,
    warnings: Vec<String>,
    checks: Vec<[String; 4]>,
    tables: Vec<Table>,
    memory: Vec<AgentRound>,
    facts: Facts,
}

impl Report {
    fn new(args: &BenchArgs, plan: &Plan, b: &Bench) -> Report {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_default();
        let ncpu = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let bin_age = std::fs::metadata(&b.agent_bin)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|d| format!("built {} min before the run", d.as_secs() / 60))
            .unwrap_or_default();
        Report {
            header: vec![
                format!("date: {date}; mode: {}", if args.quick { "--quick" } else { "default" }),
                format!("machine: {ncpu} CPUs ({cpu}), kernel {}", kernel.trim()),
                format!("agent: {} ({bin_age})", b.agent_bin.display()),
                format!(
                    "method: alternating rounds without/with the agent (order swapped every pair), \
                     {} pairs per web scenario, {} per database; medians; the agent exports \
                     OTLP/gRPC to rotel (blackhole exporter) on the same machine",
                    plan.pairs, plan.db_pairs
                ),
            ],
            warnings: Vec::new(),
            checks: Vec::new(),
            tables: Vec::new(),
            memory: Vec::new(),
            facts: Facts::default(),
        }
    }

    fn table(&mut self, title: &str, head: &[&str]) -> &mut Table {
        self.tables.push(Table {
            title: title.to_string(),
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        });
        self.tables.last_mut().unwrap()
    }

    fn check(&mut self, what: &str, measured: String, target: &str, ok: bool) {
        self.checks.push([
            what.to_string(),
            measured,
            target.to_string(),
            if ok { "met" } else { "**missed**" }.to_string(),
        ]);
    }

    fn render(&mut self) -> String {
        // Memory: from every round with the agent.
        if !self.memory.is_empty() {
            let rss: Vec<f64> = self.memory.iter().map(|a| a.rss_kb as f64 / 1024.0).collect();
            let hwm: Vec<f64> = self.memory.iter().map(|a| a.hwm_kb as f64 / 1024.0).collect();
            let boot: Vec<f64> = self.memory.iter().map(|a| a.startup_hwm_kb as f64 / 1024.0).collect();
            let maps: Vec<f64> = self.memory.iter().map(|a| a.bpf.map_bytes as f64 / 1048576.0).collect();
            let progs: Vec<f64> = self.memory.iter().map(|a| a.bpf.prog_bytes as f64 / 1024.0).collect();
            let start: Vec<f64> = self.memory.iter().map(|a| a.startup_s).collect();
            let (rs, rm, pk, bk) = (median(&rss), max(&rss), max(&hwm), max(&boot));
            let t = self.table(
                &format!("3. Agent footprint — over {} agent rounds of sections 1, 2 and 4", rss.len()),
                &["metric", "median", "max"],
            );
            t.row(&["RSS at the end of a loaded round, VmRSS (MiB)", &f1(rs), &f1(rm)]);
            t.row(&["start-up peak, VmHWM once ready, before the load (MiB)", &f1(median(&boot)), &f1(bk)]);
            t.row(&["peak RSS over the whole round incl. start-up, VmHWM (MiB)", &f1(median(&hwm)), &f1(pk)]);
            t.row(&["BPF maps, Σ memlock (MiB)", &f1(median(&maps)), &f1(max(&maps))]);
            t.row(&["BPF programs, Σ memlock (KiB)", &f0(median(&progs)), &f0(max(&progs))]);
            t.row(&["start-up to ready (s)", &f2(median(&start)), &f2(max(&start))]);
            let tbl = self.tables.pop().unwrap();
            // Put the footprint after section 2.
            let at = self
                .tables
                .iter()
                .position(|t| t.title.starts_with('4') || t.title.starts_with('5') || t.title.starts_with('6'))
                .unwrap_or(self.tables.len());
            self.tables.insert(at, tbl);
            self.check("agent RSS, steady", format!("{rs:.1} MiB"), "≤ 64 MiB", rs <= 64.0);
            self.check(
                "agent start-up peak RSS / steady",
                format!("{bk:.1} MiB = {:.2}× (peak under load, any round: {pk:.1} MiB)", bk / rs),
                "≤ 1.5×",
                bk / rs <= 1.5,
            );
            self.memory.clear();
        }
        let f = &self.facts;
        let mut notes = Vec::new();
        if f.app_us_on > 0.0 && f.app_us_off > 0.0 {
            notes.push(format!(
                "At saturation nginx itself spends {:.1} µs of CPU per request more with the agent \
                 ({:.1} → {:.1} µs): that is the in-kernel eBPF work, charged to the traced process; \
                 the agent's own user-space work is {:.2} µs/request at saturation and {:.2} µs/request \
                 at a constant rate.",
                f.app_us_on - f.app_us_off,
                f.app_us_off,
                f.app_us_on,
                f.agent_us_sat,
                f.agent_us_rate
            ));
        }
        if f.hook_tcp_ns != 0.0 {
            notes.push(format!(
                "Floor: {} ns per traced 64 B TCP write(), {} ns per traced /dev/null write(), {} ns \
                 per TCP write() of a process the agent does not trace (differences within ~100 ns \
                 are noise on this machine).",
                signed(f.hook_tcp_ns),
                signed(f.hook_null_ns),
                signed(f.hook_bystander_ns)
            ));
        }
        if f.floor_raw_exit_ns != 0.0 {
            notes.push(format!(
                "Hook floor: an empty raw_tracepoint/sys_exit program alone adds {} ns per syscall, \
                 an empty uprobe {} ns per call (table 6b): read Waybill's per-syscall cost against \
                 the first.",
                signed(f.floor_raw_exit_ns),
                signed(f.floor_uprobe_ns)
            ));
        }
        if f.sat_rps_off > 0.0 {
            notes.push(format!(
                "Budget: at {:.0} req/s one nginx worker has {:.1} µs per request in all; every µs \
                 added per request costs about {:.1} % of saturated throughput.",
                f.sat_rps_off,
                1e6 / f.sat_rps_off,
                f.sat_rps_off / 1e6 * 100.0
            ));
        }

        if let Some(g) = &f.budget {
            let allowed = (1.0 / 0.9 - 1.0) * g.busy_off;
            notes.push(format!(
                "Where the throughput goes (table 1b): without the agent the machine spends {:.1} µs \
                 of CPU per request in all, so the 0.90× target leaves {:.1} µs per request for \
                 everything tracing adds. The empty hook alone adds {:+.2} µs ({:.3}×); with the agent \
                 exporting every span, nginx spends {:+.2} µs in the kernel, the agent {:.2} µs and \
                 the collector receiving the spans {:.2} µs ({:.3}×; {:.3}× with no span exported).",
                g.busy_off,
                allowed,
                g.hook_us,
                g.hook_ratio,
                g.kernel_us,
                g.agent_us,
                g.collector_us,
                g.full_ratio,
                g.no_export_ratio
            ));
            notes.push(format!(
                "Where the tail comes from (table 1c): p99 at a constant rate against nothing attached \
                 is {:.3}× with the empty hook alone, {:.3}× with the kernel side alone (agent \
                 stopped), {:.3}× with the agent exporting nothing and {:.3}× with the whole agent.",
                g.p99_vs_off[1], g.p99_vs_off[4], g.p99_vs_off[2], g.p99_vs_off[3]
            ));
        }
        let mut s = String::new();
        let _ = writeln!(s, "# Waybill benchmark (`cargo xtask bench`)\n");
        for h in &self.header {
            let _ = writeln!(s, "- {h}");
        }
        for w in &self.warnings {
            let _ = writeln!(s, "- note: {w}");
        }
        let _ = writeln!(s, "\n## Summary against the targets\n");
        let _ = writeln!(s, "| check | measured | target | verdict |\n| --- | --- | --- | --- |");
        for c in &self.checks {
            let _ = writeln!(s, "| {} |", c.join(" | "));
        }
        for n in &notes {
            let _ = writeln!(s, "\n{n}");
        }
        for t in &self.tables {
            let _ = writeln!(s, "\n## {}\n", t.title);
            let _ = writeln!(s, "| {} |", t.head.join(" | "));
            let _ = writeln!(s, "|{}", " --- |".repeat(t.head.len()));
            for r in &t.rows {
                let _ = writeln!(s, "| {} |", r.join(" | "));
            }
        }
        s
    }
}
