//! Feature probing, BTF-driven offsets, loading and attaching the eBPF programs.

pub mod attach;
pub mod btf;
pub mod elf;
pub mod features;
pub mod floor;
pub mod mounts;
pub mod targets;
pub mod tracefs;
pub mod uprobes;
