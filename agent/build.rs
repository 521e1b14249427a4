//! Embeds the eBPF object built by `cargo xtask build` (path in WAYBILL_EBPF_OBJ, or the default
//! output path of ebpf-probes/). Without it the agent still builds (unit tests, clippy) but
//! `waybill run` says how to build it properly.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("waybill-probes.o");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../ebpf-probes/target/bpfel-unknown-none/release/waybill-probes");
    println!("cargo:rerun-if-env-changed=WAYBILL_EBPF_OBJ");
    let src = env::var_os("WAYBILL_EBPF_OBJ").map(PathBuf::from).unwrap_or(default);
    println!("cargo:rerun-if-changed={}", src.display());
    match fs::read(&src) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object not found at {}: building without it (use `cargo xtask build`)",
                src.display()
            );
            fs::write(&out, b"").unwrap();
        }
    }
}
