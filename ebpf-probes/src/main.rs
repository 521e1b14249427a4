//! Waybill's kernel programs. One file per hook family:
//! - `syscalls.rs`: socket I/O, accept/connect/close/listen (tracepoints, portable);
//! - `process.rs`: exec / fork / exit;
//! - `inject.rs`: kernel-decided trace ids and `traceparent` injection (sock_ops + sk_msg);
//! - `floor.rs`: empty programs for the benchmark's per-hook floor (never attached by `run`);
//! - `maps.rs`: every map with its bound; `events.rs`: record emitters; `helpers.rs`: target
//!   filter, loss counters, the BTF-driven fd → socket walk.
#![no_std]
#![no_main]

mod events;
mod floor;
mod go_tls;
mod helpers;
mod inject;
mod maps;
mod probe;
mod process;
mod ssl;
mod syscalls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: bpf_get_current_task and bpf_probe_read_kernel are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
