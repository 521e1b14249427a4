//! Tracepoint record layouts from tracefs `format` files
//! (`/sys/kernel/tracing/events/<category>/<name>/format`, or the same under
//! `/sys/kernel/debug/tracing`), so no tracepoint field offset is compiled into the probes.

use std::{io, path::PathBuf};

use waybill_common::TracepointOffsets;

/// Where tracefs is looked for, in order.
pub const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpField {
    /// Byte offset in the record (the record starts with the `common_*` fields).
    pub offset: u32,
    /// Size in bytes (the whole array for array fields).
    pub size: u32,
    pub signed: bool,
}

/// Errors from reading tracepoint formats.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked for events/ in {roots}); mount it with \
         `mount -t tracefs nodev /sys/kernel/tracing` (as root) and start Waybill again"
    )]
    NotMounted { roots: String },
    #[error(
        "tracepoint {category}/{name} does not exist (no {}); this kernel does not provide it \
         (it needs CONFIG_TRACEPOINTS / a newer kernel)",
        path.display()
    )]
    EventNotFound { category: String, name: String, path: PathBuf },
    #[error("cannot read {}: {source}; run Waybill as root (tracefs needs root or CAP_SYS_ADMIN)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "tracepoint {category}/{name} has no field `{field}`; its layout changed in this kernel, \
         please report it with the output of `uname -r`"
    )]
    FieldNotFound { category: String, name: String, field: String },
    #[error(
        "tracepoint {category}/{name} field `{field}` is {size} bytes, expected {expected}; \
         please report this kernel with the output of `uname -r`"
    )]
    UnexpectedSize { category: String, name: String, field: String, size: u32, expected: &'static str },
}

/// Parses the `field:` lines of a tracepoint `format` file into (name, field), in file order.
/// Lines that are not well-formed field descriptions are skipped.
pub fn parse_format(text: &str) -> Vec<(String, TpField)> {
    text.lines().filter_map(parse_field_line).collect()
}

/// `\tfield:unsigned long clone_flags;\toffset:32;\tsize:8;\tsigned:0;`
fn parse_field_line(line: &str) -> Option<(String, TpField)> {
    let line = line.trim();
    if !line.starts_with("field") {
        return None;
    }
    let (mut decl, mut offset, mut size, mut signed) = (None, None, None, false);
    for part in line.split(';') {
        let Some((key, value)) = part.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            // "field special" appears on some old kernels
            "field" | "field special" => decl = Some(value),
            "offset" => offset = value.parse().ok(),
            "size" => size = value.parse().ok(),
            "signed" => signed = value == "1",
            _ => {}
        }
    }
    let name = field_name(decl?)?;
    Some((name.to_owned(), TpField { offset: offset?, size: size?, signed }))
}

/// The name in a C declaration such as `char comm[16]`, `const void * skaddr`,
/// `u8 saddr[sizeof(struct sockaddr_in6)]` or `__data_loc char[] name`.
fn field_name(decl: &str) -> Option<&str> {
    let mut decl = decl.trim_end();
    // Drop trailing array dimensions, which may contain spaces themselves.
    while decl.ends_with(']') {
        let mut depth = 0usize;
        let open = decl.char_indices().rev().find_map(|(i, c)| {
            match c {
                ']' => depth += 1,
                '[' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
            None
        })?;
        decl = decl[..open].trim_end();
    }
    let name = decl.rsplit(|c: char| c.is_whitespace() || c == '*').next()?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(name)
}

fn default_roots() -> Vec<PathBuf> {
    TRACEFS_ROOTS.iter().map(PathBuf::from).collect()
}

/// All fields of tracepoint `category/name`, read from the first mounted tracefs.
pub fn fields(category: &str, name: &str) -> Result<Vec<(String, TpField)>, TracefsError> {
    fields_in(&default_roots(), category, name)
}

/// One field of tracepoint `category/name` (e.g. `field("task", "task_newtask", "pid")`).
pub fn field(category: &str, name: &str, field: &str) -> Result<TpField, TracefsError> {
    find(&fields(category, name)?, category, name, field)
}

/// [`TracepointOffsets`] from `task/task_newtask`.
pub fn tracepoint_offsets() -> Result<TracepointOffsets, TracefsError> {
    tracepoint_offsets_in(&default_roots())
}

fn tracepoint_offsets_in(roots: &[PathBuf]) -> Result<TracepointOffsets, TracefsError> {
    newtask_offsets(&fields_in(roots, "task", "task_newtask")?)
}

/// Reads `events/<category>/<name>/format` from the first root that has an `events` directory.
fn fields_in(roots: &[PathBuf], category: &str, name: &str) -> Result<Vec<(String, TpField)>, TracefsError> {
    let Some(root) = roots.iter().find(|r| r.join("events").is_dir()) else {
        let roots = roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(TracefsError::NotMounted { roots });
    };
    let path = root.join("events").join(category).join(name).join("format");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(parse_format(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(TracefsError::EventNotFound { category: category.to_owned(), name: name.to_owned(), path })
        }
        Err(source) => Err(TracefsError::Io { path, source }),
    }
}

fn find(fields: &[(String, TpField)], category: &str, name: &str, field: &str) -> Result<TpField, TracefsError> {
    fields.iter().find(|(n, _)| n == field).map(|&(_, f)| f).ok_or_else(|| TracefsError::FieldNotFound {
        category: category.to_owned(),
        name: name.to_owned(),
        field: field.to_owned(),
    })
}

fn newtask_offsets(fields: &[(String, TpField)]) -> Result<TracepointOffsets, TracefsError> {
    let (category, name) = ("task", "task_newtask");
    let get = |field: &str, ok: fn(u32) -> bool, expected: &'static str| {
        let f = find(fields, category, name, field)?;
        if ok(f.size) {
            Ok(f)
        } else {
            Err(TracefsError::UnexpectedSize {
                category: category.to_owned(),
                name: name.to_owned(),
                field: field.to_owned(),
                size: f.size,
                expected,
            })
        }
    };
    let pid = get("pid", |s| s == 4, "4")?;
    let clone_flags = get("clone_flags", |s| s == 4 || s == 8, "4 or 8")?;
    Ok(TracepointOffsets {
        newtask_pid: pid.offset,
        newtask_clone_flags: clone_flags.offset,
        newtask_clone_flags_size: clone_flags.size,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// task/task_newtask on Linux 6.18.
    const NEWTASK: &str = "name: task_newtask
ID: 205
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;
\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:40;\tsize:2;\tsigned:1;

print fmt: \"pid=%d comm=%s clone_flags=%llx oom_score_adj=%hd\", REC->pid, REC->comm, REC->clone_flags, REC->oom_score_adj
";

    fn f(offset: u32, size: u32, signed: bool) -> TpField {
        TpField { offset, size, signed }
    }

    #[test]
    fn parses_newtask_format() {
        let fields = parse_format(NEWTASK);
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "common_type",
                "common_flags",
                "common_preempt_count",
                "common_pid",
                "pid",
                "comm",
                "clone_flags",
                "oom_score_adj"
            ]
        );
        assert_eq!(fields[3].1, f(4, 4, true));
        assert_eq!(fields[4].1, f(8, 4, true));
        assert_eq!(fields[5].1, f(12, 16, false));
        assert_eq!(fields[6].1, f(32, 8, false));
        assert_eq!(fields[7].1, f(40, 2, true));
        let offs = newtask_offsets(&fields).unwrap();
        assert_eq!(
            offs,
            TracepointOffsets { newtask_pid: 8, newtask_clone_flags: 32, newtask_clone_flags_size: 8, _pad: 0 }
        );
    }

    #[test]
    fn parses_odd_declarations() {
        let text = "\tfield:unsigned long clone_flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u8 saddr[sizeof(struct sockaddr_in6)];\toffset:28;\tsize:28;\tsigned:0;
\tfield:__data_loc char[] filename;\toffset:16;\tsize:4;\tsigned:0;
\tfield:int grid[2][3];\toffset:40;\tsize:24;\tsigned:1;
\tfield:char *ptr;\toffset:64;\tsize:8;\tsigned:0;
\tfield special:int old_style;\toffset:72;\tsize:4;
\tfield:int broken;\toffset:x;\tsize:4;\tsigned:1;
\tfield:int no_size;\toffset:4;
\tfield:;\toffset:4;\tsize:4;\tsigned:1;
print fmt: \"field:int fake;\toffset:1;\"";
        let fields = parse_format(text);
        let want = [
            ("clone_flags", f(32, 8, false)),
            ("skaddr", f(8, 8, false)),
            ("saddr", f(28, 28, false)),
            ("filename", f(16, 4, false)),
            ("grid", f(40, 24, true)),
            ("ptr", f(64, 8, false)),
            ("old_style", f(72, 4, false)),
        ];
        let got: Vec<(&str, TpField)> = fields.iter().map(|(n, f)| (n.as_str(), *f)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn newtask_size_checks() {
        let four =
            NEWTASK.replace("u64 clone_flags;\toffset:32;\tsize:8", "unsigned long clone_flags;\toffset:32;\tsize:4");
        assert_eq!(newtask_offsets(&parse_format(&four)).unwrap().newtask_clone_flags_size, 4);

        let two = NEWTASK.replace("offset:32;\tsize:8", "offset:32;\tsize:2");
        let e = newtask_offsets(&parse_format(&two)).unwrap_err();
        assert!(matches!(&e, TracefsError::UnexpectedSize { field, size: 2, .. } if field == "clone_flags"), "{e:?}");
        assert!(e.to_string().contains("expected 4 or 8"), "{e}");

        let no_pid = NEWTASK.replace("pid_t pid;", "pid_t tid;");
        let e = newtask_offsets(&parse_format(&no_pid)).unwrap_err();
        assert!(matches!(&e, TracefsError::FieldNotFound { field, .. } if field == "pid"), "{e:?}");
        assert!(e.to_string().contains("task/task_newtask has no field `pid`"), "{e}");
    }

    /// A fake tracefs tree under the temp dir, removed on drop.
    struct FakeRoots(PathBuf);

    impl FakeRoots {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("waybill-tracefs-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            FakeRoots(dir)
        }
        /// (unmounted primary root, debugfs-style fallback root)
        fn roots(&self) -> Vec<PathBuf> {
            vec![self.0.join("tracing"), self.0.join("debug/tracing")]
        }
        fn add(&self, root: usize, category: &str, name: &str, text: &str) {
            let dir = self.roots()[root].join("events").join(category).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("format"), text).unwrap();
        }
    }

    impl Drop for FakeRoots {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_from_roots_with_fallback() {
        let fake = FakeRoots::new("roots");
        let roots = fake.roots();
        std::fs::create_dir_all(&roots[0]).unwrap(); // exists but not mounted (no events/)
        let e = tracepoint_offsets_in(&roots).unwrap_err();
        assert!(matches!(e, TracefsError::NotMounted { .. }), "{e:?}");
        assert!(e.to_string().contains("mount -t tracefs"), "{e}");

        fake.add(1, "sched", "sched_process_exit", "");
        let e = tracepoint_offsets_in(&roots).unwrap_err();
        assert!(
            matches!(&e, TracefsError::EventNotFound { category, name, .. } if category == "task" && name == "task_newtask")
        );

        fake.add(1, "task", "task_newtask", NEWTASK);
        assert_eq!(tracepoint_offsets_in(&roots).unwrap().newtask_clone_flags, 32);
        let fields = fields_in(&roots, "task", "task_newtask").unwrap();
        assert_eq!(find(&fields, "task", "task_newtask", "comm").unwrap(), f(12, 16, false));

        // the first root wins once it is mounted
        fake.add(0, "task", "task_newtask", &NEWTASK.replace("offset:32", "offset:48"));
        assert_eq!(tracepoint_offsets_in(&roots).unwrap().newtask_clone_flags, 48);
    }

    #[test]
    fn real_task_newtask() {
        let e = match tracepoint_offsets() {
            Ok(offs) => {
                eprintln!("task_newtask: {offs:?}");
                assert!(offs.newtask_pid >= 8, "pid after the common fields");
                assert!(matches!(offs.newtask_clone_flags_size, 4 | 8));
                assert_eq!(field("task", "task_newtask", "comm").unwrap().size, 16);
                assert!(field("task", "task_newtask", "common_pid").unwrap().signed);
                return;
            }
            Err(e) => e,
        };
        match e {
            TracefsError::NotMounted { .. } | TracefsError::EventNotFound { .. } | TracefsError::Io { .. } => {
                eprintln!("note: skipping the real tracefs test: {e}");
            }
            e => panic!("{e}"),
        }
    }
}
