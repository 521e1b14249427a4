//! Feature-probe programs: loaded (never attached) at start-up to learn whether this kernel
//! accepts a hook type. `waybill check` and the loader use the answer to choose hooks.

use aya_ebpf::{macros::fentry, programs::FEntryContext};

/// Loads only where BPF trampolines are allowed (refused with EPERM under some lockdown setups
/// and on kernels without CONFIG_DEBUG_INFO_BTF / trampoline support).
#[fentry(function = "tcp_sendmsg")]
pub fn fentry_probe_tcp_sendmsg(_ctx: FEntryContext) -> u32 {
    0
}
