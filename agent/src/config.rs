//! `waybill run --config waybill.yaml`: everything the flags set, plus per-service rules.
//!
//! Precedence, lowest first: built-in defaults < the file < environment variables < flags.
//! (clap already merges the last two: a flag wins over its `WAYBILL_*` variable.) Target lists
//! (`pids`, `exes`, `ports`) given by flags replace the file's list of the same kind.
//!
//! Unknown keys and bad values are errors that name the key, the file, and the line and column
//! (serde_yaml_ng reports positions for every error raised while a value is read, including the
//! range checks below).
//!
//! ```yaml
//! targets: { exes: [python3, nginx], ports: [8080] }
//! metrics_addr: 127.0.0.1:9464
//! capture_bytes: 4096
//! services:
//!   - match: { exe: nginx }       # or service_name: shop (the resource's service.name)
//!     sampling_ratio: 0.25        # spans kept (consistent on the trace id); metrics count all
//!   - match: { exe: pgbouncer }
//!     trace: false                # never trace these processes, even when selected
//! ```

use std::{fmt, path::Path};

use serde::{Deserialize, Deserializer, de};

use crate::stitch::span::{AttrValue, ProcessResource};

/// The file's contents. Every field is optional: what is absent falls back to the defaults.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub targets: Targets,
    pub metrics_addr: Option<String>,
    #[serde(default, deserialize_with = "capture_bytes")]
    pub capture_bytes: Option<u32>,
    #[serde(default, deserialize_with = "ring_buffer_bytes")]
    pub ring_buffer_bytes: Option<u32>,
    #[serde(default, deserialize_with = "max_connections")]
    pub max_connections: Option<usize>,
    #[serde(default, deserialize_with = "idle_timeout_secs")]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default, deserialize_with = "span_queue")]
    pub span_queue: Option<usize>,
    #[serde(default, deserialize_with = "export_backlog")]
    pub export_backlog: Option<usize>,
    #[serde(default, deserialize_with = "export_concurrency")]
    pub export_concurrency: Option<usize>,
    #[serde(default, deserialize_with = "red_series_limit")]
    pub red_series_limit: Option<usize>,
    /// `false`: no `traceparent` injection (as `--no-inject`).
    pub inject: Option<bool>,
    /// `adaptive`, `batch` or `idle` (as `--cpu-policy`).
    pub cpu_policy: Option<crate::sched::CpuPolicy>,
    /// `true`: spans also carry the semantic conventions' Opt-In attributes (as
    /// `--opt-in-attributes`).
    pub opt_in_attributes: Option<bool>,
    /// Per-service rules, applied in order: the first rule whose `match` fits wins.
    #[serde(default)]
    pub services: Vec<ServiceRule>,
}

/// What to trace (the flags `--pid`, `--exe`, `--port`).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub exes: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A rule for the processes it matches.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceRule {
    #[serde(rename = "match")]
    pub matcher: Match,
    /// `false`: never trace matching processes (checked by executable name when a process is
    /// selected; `service_name` rules cannot exclude, the name is known only once traced).
    #[serde(default = "yes")]
    pub trace: bool,
    /// Share of traces whose spans are exported (0.0–1.0, consistent on the trace id; spans that
    /// joined a caller's sampled trace are always kept). RED metrics count every request.
    #[serde(default, deserialize_with = "ratio")]
    pub sampling_ratio: Option<f64>,
    /// `false`: never insert `traceparent` into this service's outgoing requests (its children
    /// inherit it). Injection switched off globally (`--no-inject`) cannot be turned on here.
    pub inject: Option<bool>,
}

/// Which processes a rule is for. Every given field must fit; at least one must be given.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Executable file name, `comm` or `argv[0]` (as `--exe`).
    pub exe: Option<String>,
    /// The resource's `service.name` (the process's own `OTEL_SERVICE_NAME`, or the default).
    pub service_name: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source} (check the path given to --config)")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl FileConfig {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid { path: path.display().to_string(), message })
    }

    /// Parses YAML text; the error names the key and its line.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let cfg: FileConfig = serde_yaml_ng::from_str(text).map_err(|e| locate(text, &e))?;
        for (i, r) in cfg.services.iter().enumerate() {
            if r.matcher.exe.is_none() && r.matcher.service_name.is_none() {
                return Err(format!(
                    "services[{i}].match: give `exe` or `service_name` (a rule without one would match every process)"
                ));
            }
            if !r.trace && r.matcher.exe.is_none() {
                return Err(format!(
                    "services[{i}].trace: false needs `match.exe` (the service name is only known once a process is traced)"
                ));
            }
        }
        Ok(cfg)
    }

    /// Executable names that must never be traced.
    pub fn excluded_exes(&self) -> Vec<String> {
        self.services.iter().filter(|r| !r.trace).filter_map(|r| r.matcher.exe.clone()).collect()
    }

    /// The sampling ratio for a traced process: the first matching rule's, else 1.0.
    pub fn sampling_ratio(&self, r: &ProcessResource) -> f64 {
        self.services.iter().find(|rule| rule.matcher.fits(r)).and_then(|rule| rule.sampling_ratio).unwrap_or(1.0)
    }

    /// Whether a rule switches injection off for this process.
    pub fn no_inject(&self, r: &ProcessResource) -> bool {
        self.services.iter().find(|rule| rule.matcher.fits(r)).and_then(|rule| rule.inject) == Some(false)
    }

    /// Whether any rule switches injection off (else nothing needs checking per process).
    pub fn any_no_inject(&self) -> bool {
        self.services.iter().any(|r| r.inject == Some(false))
    }

    /// Whether any rule samples at all (else the exporter path skips the check).
    pub fn samples(&self) -> bool {
        self.services.iter().any(|r| r.sampling_ratio.is_some_and(|v| v < 1.0))
    }
}

impl Match {
    fn fits(&self, r: &ProcessResource) -> bool {
        let exe_ok = self.exe.as_deref().is_none_or(|want| {
            r.attributes
                .iter()
                .any(|(k, v)| k == "process.executable.name" && matches!(v, AttrValue::Str(s) if s == want))
        });
        let name_ok = self.service_name.as_deref().is_none_or(|want| r.service_name == want);
        exe_ok && name_ok
    }
}

/// The error's text, with the line of the offending key itself: for a value rejected by a range
/// check, serde_yaml_ng reports where the enclosing mapping starts, so look for the key from there.
fn locate(text: &str, e: &serde_yaml_ng::Error) -> String {
    let msg = e.to_string();
    let (Some(loc), Some(key)) = (e.location(), msg.split('`').nth(1).filter(|_| msg.contains(BAD_VALUE))) else {
        return msg;
    };
    let found = text.lines().enumerate().skip(loc.line().saturating_sub(1)).find(|(_, l)| {
        l.trim_start_matches([' ', '-', '{']).starts_with(&format!("{key}:")) || l.contains(&format!(" {key}:"))
    });
    match found {
        Some((i, _)) => {
            let head = msg.split(" at line ").next().unwrap_or(&msg);
            format!("{head} at line {}", i + 1)
        }
        None => msg,
    }
}

/// Marks the range-check errors [`locate`] re-positions.
const BAD_VALUE: &str = "bad value:";

/// `flag` if given (flag or env), else the file's value, else `default`.
pub fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

fn checked<'de, D, T, F>(d: D, key: &'static str, what: &'static str, ok: F) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Copy + fmt::Display,
    F: Fn(T) -> bool,
{
    let v = Option::<T>::deserialize(d)?;
    match v {
        Some(x) if !ok(x) => Err(de::Error::custom(format!("`{key}` {BAD_VALUE} {x} is not {what}"))),
        _ => Ok(v),
    }
}

fn capture_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let max = waybill_common::MAX_CAPTURE as u32;
    checked(d, "capture_bytes", "a capture size from 64 to 8192 bytes", move |v: u32| (64..=max).contains(&v))
}

fn ring_buffer_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    checked(d, "ring_buffer_bytes", "a power of two ≥ 4096", |v: u32| v >= 4096 && v.is_power_of_two())
}

fn positive<'de, D, T>(d: D, key: &'static str) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Copy + fmt::Display + Default + PartialOrd,
{
    checked(d, key, "a number above 0", |v: T| v > T::default())
}

macro_rules! positive_fields {
    ($($name:ident: $t:ty),*) => {$(
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$t>, D::Error> {
            positive(d, stringify!($name))
        }
    )*};
}
positive_fields!(
    max_connections: usize,
    idle_timeout_secs: u64,
    span_queue: usize,
    export_backlog: usize,
    export_concurrency: usize,
    red_series_limit: usize
);

fn ratio<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    checked(d, "sampling_ratio", "a ratio from 0.0 to 1.0", |v: f64| (0.0..=1.0).contains(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    fn res(service: &str, exe: &str) -> ProcessResource {
        ProcessResource {
            pid: 1,
            service_name: service.into(),
            attributes: vec![("process.executable.name".into(), exe.to_string().into())],
        }
    }

    #[test]
    fn full_file_parses() {
        let c = FileConfig::parse(
            "targets:\n  pids: [1, 2]\n  exes: [nginx]\n  ports: [8080]\nmetrics_addr: 127.0.0.1:9464\n\
             capture_bytes: 512\nring_buffer_bytes: 65536\nmax_connections: 10\nidle_timeout_secs: 5\n\
             span_queue: 7\nexport_backlog: 9\nred_series_limit: 3\ninject: false\ncpu_policy: batch\n\
             opt_in_attributes: true\n\
             services:\n  - match: { service_name: shop }\n    sampling_ratio: 0.5\n\
             \x20 - match: { exe: pgbouncer }\n    trace: false\n\
             \x20 - match: { exe: curl }\n    inject: false\n",
        )
        .unwrap();
        assert_eq!(c.targets, Targets { pids: vec![1, 2], exes: vec!["nginx".into()], ports: vec![8080] });
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(
            (c.capture_bytes, c.ring_buffer_bytes, c.max_connections, c.idle_timeout_secs),
            (Some(512), Some(65536), Some(10), Some(5))
        );
        assert_eq!((c.span_queue, c.export_backlog, c.red_series_limit), (Some(7), Some(9), Some(3)));
        assert_eq!(c.inject, Some(false));
        assert_eq!(c.cpu_policy, Some(crate::sched::CpuPolicy::Batch));
        assert_eq!(c.opt_in_attributes, Some(true));
        assert_eq!(c.excluded_exes(), ["pgbouncer"]);
        assert_eq!(c.sampling_ratio(&res("shop", "python3")), 0.5);
        assert_eq!(c.sampling_ratio(&res("other", "python3")), 1.0);
        assert!(c.no_inject(&res("x", "curl")) && !c.no_inject(&res("shop", "python3")));
        assert!(c.samples());
        assert_eq!(FileConfig::parse("").unwrap(), FileConfig::default());
    }

    #[test]
    fn first_matching_rule_wins_and_all_fields_must_fit() {
        let c = FileConfig::parse(
            "services:\n  - match: { exe: python3, service_name: shop }\n    sampling_ratio: 0.1\n\
             \x20 - match: { exe: python3 }\n    sampling_ratio: 0.2\n",
        )
        .unwrap();
        assert_eq!(c.sampling_ratio(&res("shop", "python3")), 0.1);
        assert_eq!(c.sampling_ratio(&res("cart", "python3")), 0.2);
        assert_eq!(c.sampling_ratio(&res("shop", "node")), 1.0);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = FileConfig::parse("capture_bytes: 512\nmetrcs_addr: x\n").unwrap_err();
        assert!(e.contains("unknown field `metrcs_addr`") && e.contains("line 2"), "{e}");
        let e = FileConfig::parse("services:\n  - match: { exe: a }\n    sampling_ratio: 1.5\n").unwrap_err();
        assert!(e.contains("`sampling_ratio`") && e.contains("1.5 is not a ratio") && e.ends_with("line 3"), "{e}");
        let e = FileConfig::parse("capture_bytes: 512\nring_buffer_bytes: 5000\n").unwrap_err();
        assert!(e.contains("5000 is not a power of two") && e.ends_with("line 2"), "{e}");
        let e = FileConfig::parse("span_queue: 1\nmax_connections: 0\n").unwrap_err();
        assert!(e.contains("`max_connections`") && e.ends_with("line 2"), "{e}");
        let e = FileConfig::parse("capture_bytes: 512\ncpu_policy: fast\n").unwrap_err();
        assert!(e.contains("unknown variant `fast`") && e.contains("adaptive") && e.contains("line 2"), "{e}");
        let e = FileConfig::parse("capture_bytes: 9\n").unwrap_err();
        assert!(e.contains("9 is not a capture size"), "{e}");
        let e = FileConfig::parse("targets:\n  ports: [http]\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = FileConfig::parse("services:\n  - match: {}\n").unwrap_err();
        assert!(e.contains("services[0].match"), "{e}");
        let e = FileConfig::parse("services:\n  - match: { service_name: x }\n    trace: false\n").unwrap_err();
        assert!(e.contains("services[0].trace"), "{e}");
        let e = FileConfig::parse("services:\n  - match: { exe: x }\n    smapling: 1\n").unwrap_err();
        assert!(e.contains("unknown field `smapling`") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn missing_file_says_so() {
        let e = FileConfig::load(Path::new("/nonexistent/waybill.yaml")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/waybill.yaml") && e.contains("--config"), "{e}");
    }

    /// The config shipped in the DaemonSet's ConfigMap is one the agent accepts.
    #[test]
    fn shipped_kubernetes_config_parses() {
        let manifest = include_str!("../../deploy/kubernetes/waybill.yaml");
        let start = manifest.find("  waybill.yaml: |\n").expect("ConfigMap key") + "  waybill.yaml: |\n".len();
        let body: String = manifest[start..]
            .lines()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let c = FileConfig::parse(&body).unwrap();
        assert_eq!(c.targets.exes, ["java", "python3", "node", "nginx"]);
        assert_eq!(c.excluded_exes(), ["pgbouncer"]);
    }

    #[test]
    fn precedence() {
        assert_eq!(pick(Some(3), Some(2), 1), 3);
        assert_eq!(pick(None, Some(2), 1), 2);
        assert_eq!(pick(None::<u32>, None, 1), 1);
    }
}
