//! `waybill`: command-line entry point. Wiring only; the work lives in the library modules.

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};
use waybill::{
    config,
    events::pump::{Pipeline, PipelineConfig},
    export,
    loader::{
        attach::{self, LoadOptions},
        features,
    },
    metrics::{self, Metrics},
    process::{self, Selector},
};
use waybill_common::{MAX_CAPTURE, ProbeConfig};

#[derive(Parser)]
#[command(name = "waybill", version, about = "Zero-code distributed tracing for Linux, with eBPF")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Trace the selected processes: spans to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set,
    /// otherwise a waterfall per trace in the terminal.
    Run(Box<RunArgs>),
    /// Show what this kernel and these privileges allow, and which hooks will be used; with
    /// --pid, also what the TLS probes would find in that process (libssl, OpenSSL linked in, Go).
    Check {
        /// Also report the TLS libraries and symbols of this process (repeatable).
        #[arg(long = "pid", value_name = "PID")]
        pids: Vec<u32>,
    },
    /// Benchmark helper: attach one empty eBPF program and wait for Ctrl-C, to measure the hook's
    /// own cost on this kernel (`cargo xtask bench`, section 6).
    #[command(hide = true)]
    Floor {
        #[arg(long, value_enum)]
        hook: waybill::loader::floor::FloorHook,
        /// The process of the uprobe.
        #[arg(long)]
        pid: Option<u32>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Trace this process and its descendants (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Trace every process running this executable, now and later (repeatable).
    #[arg(long = "exe", value_name = "NAME")]
    exes: Vec<String>,
    /// Trace every process serving this TCP port, now and later (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Read settings and per-service rules from this YAML file (flags and WAYBILL_* variables win
    /// over it; see docs/configuration.md).
    #[arg(long, value_name = "FILE", env = "WAYBILL_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Serve Prometheus /metrics and /healthz on this address.
    #[arg(long, value_name = "HOST:PORT", env = "WAYBILL_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Payload bytes copied per syscall, enough for the request and response heads [default: 4096].
    #[arg(long, env = "WAYBILL_CAPTURE_BYTES", value_parser = clap::value_parser!(u32).range(64..=MAX_CAPTURE as i64))]
    capture_bytes: Option<u32>,
    /// Size of the kernel → agent ring buffer in bytes, a power of two ≥ 4096 [default: 8388608].
    #[arg(long, env = "WAYBILL_RING_BUFFER_BYTES")]
    ring_buffer_bytes: Option<u32>,
    /// Connections tracked at once; the least recently active is evicted beyond it [default: 16384].
    #[arg(long, env = "WAYBILL_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Seconds after which an idle connection's state is dropped [default: 300].
    #[arg(long, env = "WAYBILL_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// Spans queued for export before new ones are dropped and counted [default: 8192].
    #[arg(long, env = "WAYBILL_SPAN_QUEUE")]
    span_queue: Option<usize>,
    /// Spans the OTLP exporter holds while the collector is unreachable; beyond it the oldest are
    /// dropped and counted [default: 16384].
    #[arg(long, env = "WAYBILL_EXPORT_BACKLOG")]
    export_backlog: Option<usize>,
    /// OTLP export requests in flight at once (more keep up with a slow collector) [default: 4].
    #[arg(long, env = "WAYBILL_EXPORT_CONCURRENCY")]
    export_concurrency: Option<usize>,
    /// Distinct attribute sets per traced process and RED metric; beyond it measurements are
    /// recorded under otel.metric.overflow=true and counted [default: 500].
    #[arg(long, env = "WAYBILL_RED_SERIES_LIMIT")]
    red_series_limit: Option<usize>,
    /// How the agent shares the CPU with the traced applications: `adaptive` yields (SCHED_IDLE)
    /// while it keeps up and competes (SCHED_BATCH, short slice) while it falls behind; `batch`
    /// always competes; `idle` always yields (records are lost when the applications keep every
    /// CPU busy) [default: adaptive].
    #[arg(long, value_enum, env = "WAYBILL_CPU_POLICY")]
    cpu_policy: Option<waybill::sched::CpuPolicy>,
    /// Do not insert `traceparent` into outgoing HTTP/1.x requests (sock_ops + sk_msg). Also
    /// `WAYBILL_INJECT=false` or `inject: false` in the config file. Spans on one host are still
    /// linked without it.
    #[arg(long)]
    no_inject: bool,
    /// Also set the attributes the OpenTelemetry semantic conventions mark Opt-In:
    /// `client.port`, `network.transport`, `network.protocol.name`, `http.request.body.size`,
    /// `http.response.body.size`, `user_agent.original` on CLIENT spans. Also
    /// `opt_in_attributes: true` in the config file.
    #[arg(long, env = "WAYBILL_OPT_IN_ATTRIBUTES")]
    opt_in_attributes: bool,
    /// Load this eBPF object instead of the embedded one (development).
    #[arg(long, hide = true)]
    ebpf_object: Option<std::path::PathBuf>,
}

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // No transparent huge pages for the agent: mimalloc asks for them on its arena, and every 2 MiB
    // page is then faulted in (and zeroed) whole. Measured under wrk: 69-75 MiB RSS with THP,
    // 49-60 MiB without, same CPU per request (docs/performance.md). Failure is harmless.
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WAYBILL_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { pids } => {
            let f = features::detect();
            print!("{}", f.render());
            if !pids.is_empty() {
                println!("\nTLS in the selected processes");
                for pid in pids {
                    for line in waybill::loader::uprobes::tls_report(pid) {
                        println!("  {line}");
                    }
                }
            }
            if f.privileged { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Cmd::Floor { hook, pid } => {
            let _ = waybill::loader::mounts::ensure_tracefs();
            let held = match waybill::loader::floor::attach(hook, pid) {
                Ok(e) => e,
                Err(e) => return fail(&format!("floor: {e}")),
            };
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return fail(&format!("cannot start the runtime: {e}")),
            };
            // The handlers go in before "attached" is printed: whoever reads that line may send
            // SIGINT at once, and it must end the wait, not kill the process.
            let stop = match rt.block_on(async { shutdown_signals() }) {
                Ok(stop) => stop,
                Err(e) => return fail(&format!("cannot handle SIGINT/SIGTERM: {e}")),
            };
            println!("attached {hook:?}");
            rt.block_on(stop);
            drop(held);
            ExitCode::SUCCESS
        }
        Cmd::Run(args) => {
            // Start-up competes; the event loop then follows --cpu-policy (agent/src/sched.rs).
            waybill::sched::apply_current(waybill::sched::Mode::Compete);
            // One thread runs the event loop, the exporters and the metrics server: whatever
            // gets the CPU serves all of them, so the CPU watchdog, which watches the ring
            // buffer, also sees a starved exporter, and the event loop yields between drain
            // slices for the exporter to empty the span queue (agent/src/events/pump.rs).
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return fail(&format!("cannot start the runtime: {e}")),
            };
            match rt.block_on(run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("{e:#}")),
            }
        }
    }
}

/// `--no-inject` wins; else `WAYBILL_INJECT` (true/false, 1/0, yes/no, on/off); else the config
/// file's `inject`; default on.
fn inject_enabled(no_inject: bool, env: Option<&str>, file: Option<bool>) -> anyhow::Result<bool> {
    if no_inject {
        return Ok(false);
    }
    let default = file.unwrap_or(true);
    match env.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => match v.as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => anyhow::bail!("WAYBILL_INJECT must be true or false (got {v:?})"),
        },
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("waybill: error: {msg}");
    ExitCode::from(1)
}

/// SIGINT and SIGTERM, handled from this call on (a signal sent later ends the wait instead of
/// killing the process); the future resolves at the first of them. Must run inside a runtime.
fn shutdown_signals() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// The settings in force: flags and their variables over the config file over the defaults.
struct Settings {
    file: config::FileConfig,
    selector: Selector,
    metrics_addr: Option<String>,
    capture_bytes: u32,
    ring_buffer_bytes: u32,
    max_connections: usize,
    idle_timeout_secs: u64,
    span_queue: usize,
    export_backlog: usize,
    export_concurrency: usize,
    red_series_limit: usize,
    cpu_policy: waybill::sched::CpuPolicy,
    /// The file's `inject` (flags and WAYBILL_INJECT are applied in [`inject_enabled`]).
    inject: Option<bool>,
    opt_in_attributes: bool,
}

impl Settings {
    fn resolve(args: &RunArgs) -> anyhow::Result<Self> {
        let mut file = match &args.config {
            Some(p) => config::FileConfig::load(p)?,
            None => config::FileConfig::default(),
        };
        fn list<T: Clone>(flag: &[T], file: &mut Vec<T>) -> Vec<T> {
            if flag.is_empty() { std::mem::take(file) } else { flag.to_vec() }
        }
        let selector = Selector {
            pids: list(&args.pids, &mut file.targets.pids),
            exes: list(&args.exes, &mut file.targets.exes),
            ports: list(&args.ports, &mut file.targets.ports),
            exclude_exes: file.excluded_exes(),
        };
        use config::pick;
        Ok(Settings {
            selector,
            metrics_addr: args.metrics_addr.clone().or(file.metrics_addr.take()),
            capture_bytes: pick(args.capture_bytes, file.capture_bytes, waybill_common::DEFAULT_CAPTURE),
            ring_buffer_bytes: pick(args.ring_buffer_bytes, file.ring_buffer_bytes, 8 * 1024 * 1024),
            max_connections: pick(args.max_connections, file.max_connections, 16384),
            idle_timeout_secs: pick(args.idle_timeout_secs, file.idle_timeout_secs, 300),
            span_queue: pick(args.span_queue, file.span_queue, 8192),
            export_backlog: pick(args.export_backlog, file.export_backlog, export::otlp::DEFAULT_MAX_BACKLOG),
            export_concurrency: pick(
                args.export_concurrency,
                file.export_concurrency,
                export::otlp::DEFAULT_MAX_CONCURRENT,
            ),
            red_series_limit: pick(args.red_series_limit, file.red_series_limit, export::red::DEFAULT_SERIES_LIMIT),
            cpu_policy: pick(args.cpu_policy, file.cpu_policy, waybill::sched::CpuPolicy::Adaptive),
            inject: file.inject,
            opt_in_attributes: args.opt_in_attributes || file.opt_in_attributes.unwrap_or(false),
            file,
        })
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut s = Settings::resolve(&args)?;
    let selector = s.selector.clone();
    if selector.is_empty() {
        anyhow::bail!("nothing to trace: name targets with --pid PID, --exe NAME or --port PORT (each repeatable)");
    }
    for pid in &selector.pids {
        if !process::exists(*pid) {
            anyhow::bail!("no process with PID {pid}: check the PID with `ps -p {pid}` (or select by --exe / --port)");
        }
    }
    if !features::privileged() {
        anyhow::bail!(
            "not enough privileges to load eBPF programs: run as root (sudo waybill run …) or grant \
             CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE; `waybill check` shows what is missing"
        );
    }
    if !s.ring_buffer_bytes.is_power_of_two() || s.ring_buffer_bytes < 4096 {
        anyhow::bail!("--ring-buffer-bytes must be a power of two ≥ 4096 (got {})", s.ring_buffer_bytes);
    }
    for (flag, v) in [
        ("--max-connections", s.max_connections),
        ("--span-queue", s.span_queue),
        ("--export-backlog", s.export_backlog),
        ("--export-concurrency", s.export_concurrency),
        ("--red-series-limit", s.red_series_limit),
        ("--idle-timeout-secs", s.idle_timeout_secs as usize),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} must be above 0");
        }
    }
    // Exporter first: a bad OTEL_* setting fails before anything is attached.
    let otlp = export::otlp::OtlpConfig::from_env()?;
    let otlp_metrics = match &otlp {
        Some(_) => export::otlp::MetricsConfig::from_env()?,
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let red = Arc::new(export::red::Red::new(s.red_series_limit, metrics.red_stats.clone()));
    let _ = metrics.red.set(red.clone());
    let config = ProbeConfig {
        capture_bytes: s.capture_bytes,
        watch_exec: u32::from(!selector.exes.is_empty()),
        watch_ports: u32::from(!selector.ports.is_empty()),
        inject: u32::from(inject_enabled(args.no_inject, std::env::var("WAYBILL_INJECT").ok().as_deref(), s.inject)?),
    };
    let opts = LoadOptions { config, ring_buffer_bytes: s.ring_buffer_bytes, object: args.ebpf_object.clone() };
    let (probes, events) = attach::load(&opts)?;
    tracing::info!(
        hooks = probes.attached.len(),
        skipped = probes.skipped.len(),
        "eBPF programs attached (syscall tracepoints; kprobes/fentry not needed)"
    );
    metrics.probe_attach_failures.set(probes.skipped.len() as u64);
    metrics.inject_active.set(u64::from(matches!(probes.inject, attach::InjectStatus::Active { .. })));
    metrics.inject_unavailable.set(u64::from(matches!(probes.inject, attach::InjectStatus::Unavailable(_))));

    let (tx, rx) = export::span_queue(s.span_queue);
    // RED metrics are measured from every span on its way to the exporter (the pipeline's tee).
    let rules = Arc::new(std::mem::take(&mut s.file));
    let ratio: Option<export::red::SamplingRatio> = if rules.samples() {
        let rules = rules.clone();
        Some(Arc::new(move |r: &waybill::stitch::span::ProcessResource| rules.sampling_ratio(r)))
    } else {
        None
    };
    let tee = export::red::Tee { red: red.clone(), ratio };
    let (metric_stop, metric_stop_rx) = tokio::sync::oneshot::channel();
    let metric_exporter = match otlp_metrics {
        Some(mcfg) => {
            let exporter = export::otlp::build_metric_exporter(&mcfg)?;
            tracing::info!(endpoint = %mcfg.transport.endpoint, interval = ?mcfg.interval, "exporting RED metrics over OTLP");
            Some(export::red::spawn_metric_export(
                exporter,
                red.clone(),
                mcfg.interval,
                mcfg.export_timeout.min(Duration::from_secs(5)),
                metric_stop_rx,
            ))
        }
        None => None,
    };
    let exporter = match otlp {
        Some(mut cfg) => {
            cfg.max_backlog = s.export_backlog;
            cfg.max_concurrent = s.export_concurrency;
            tracing::info!(endpoint = %cfg.endpoint, protocol = ?cfg.protocol, "exporting OTLP");
            export::otlp::spawn_otlp(cfg, rx, metrics.export.clone())?
        }
        None => {
            tracing::info!("OTEL_EXPORTER_OTLP_ENDPOINT not set: printing traces to the terminal");
            export::terminal::spawn_terminal(rx, Box::new(std::io::stdout()))
        }
    };
    let _metrics_server = match &s.metrics_addr {
        Some(addr) => Some(
            metrics::serve(addr.clone(), metrics.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e} (is the port free?)"))?,
        ),
        None => None,
    };

    let cfg = PipelineConfig {
        selector,
        max_connections: s.max_connections,
        idle_timeout: Duration::from_secs(s.idle_timeout_secs),
        rescan_every: Duration::from_secs(2),
        rules,
        cpu_policy: s.cpu_policy,
        ring_buffer_bytes: s.ring_buffer_bytes,
        opt_in_attributes: s.opt_in_attributes,
    };
    let mut pipeline = Pipeline::new(probes, cfg, metrics.clone(), tx, tee);
    let n = pipeline.initial_targets();
    // Start-up parsed vmlinux BTF and target ELF files; that memory is free now: return it.
    // SAFETY: mi_collect has no preconditions.
    unsafe { libmimalloc_sys::mi_collect(true) };
    // Only now map the ring buffer (its pages are resident at once): the start-up peak is then
    // the larger of the two, not their sum.
    let ring = events.map()?;
    // The signal handlers are in place before "ready" is said: a SIGINT or SIGTERM sent as soon
    // as that is seen flushes the spans instead of killing the process.
    let stop = shutdown_signals().map_err(|e| anyhow::anyhow!("cannot handle SIGINT/SIGTERM: {e}"))?;
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(processes = n, "ready");

    let shutdown = async move {
        stop.await;
        tracing::info!("shutting down: flushing spans");
    };
    // The runtime's one thread also drives its timers and epoll: a drain wakes one thread, not a
    // timer thread and then this one.
    tokio::spawn(pipeline.run(ring, shutdown)).await.map_err(|e| anyhow::anyhow!("the event loop failed: {e}"))??;
    // The pipeline owned the only sender: the exporter drains and returns.
    let _ = tokio::time::timeout(Duration::from_secs(10), exporter).await;
    // Last RED export, after every span was measured.
    let _ = metric_stop.send(());
    if let Some(m) = metric_exporter {
        let _ = tokio::time::timeout(Duration::from_secs(6), m).await;
    }
    Ok(())
}
