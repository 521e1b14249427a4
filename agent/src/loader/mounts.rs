//! Pseudo file systems the loader needs: tracefs (tracepoint ids and formats) and, for
//! `waybill check`'s lockdown report, securityfs. Minimal hosts and containers often have
//! neither mounted; as root we mount them at their standard places.

use std::{ffi::CString, fs, path::Path};

fn mounted(fstype: &str) -> Option<String> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == fstype).then(|| dir.to_string())
    })
}

fn mount(fstype: &str, target: &str) -> Result<(), String> {
    if !Path::new(target).exists() {
        return Err(format!("{target} does not exist"));
    }
    let src = CString::new(fstype).expect("no NUL");
    let tgt = CString::new(target).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error().to_string()) }
}

/// Makes sure tracefs is mounted; returns its path or a message saying how to mount it.
pub fn ensure_tracefs() -> Result<String, String> {
    if let Some(p) = mounted("tracefs") {
        return Ok(p);
    }
    if Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok("/sys/kernel/debug/tracing".into());
    }
    mount("tracefs", "/sys/kernel/tracing")
        .map(|()| {
            tracing::info!("mounted tracefs at /sys/kernel/tracing");
            "/sys/kernel/tracing".to_string()
        })
        .map_err(|e| {
            format!(
                "tracefs is not mounted and mounting it failed ({e}): run `mount -t tracefs nodev /sys/kernel/tracing`"
            )
        })
}

/// Mounts securityfs if absent (only used to read the lockdown mode); failures are ignored.
pub fn ensure_securityfs() {
    if mounted("securityfs").is_none() && mount("securityfs", "/sys/kernel/security").is_ok() {
        tracing::debug!("mounted securityfs at /sys/kernel/security");
    }
}
