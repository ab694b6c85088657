//! Records the git revision the `vdg` binary was built from (`VDG_GIT_REV`), for run records,
//! and, in CUDA builds, writes the toolkit's library folder (`VDG_CUDA_RPATH`, set by
//! `target/cuda/env.sh` from `scripts/setup-cuda`) into the binary's run-time search path.
use std::process::Command;

fn main() {
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    println!(
        "cargo:rustc-env=VDG_GIT_REV={rev}{}",
        if dirty { "-dirty" } else { "" }
    );
    println!("cargo:rerun-if-env-changed=VDG_CUDA_RPATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some()
        && let Some(dir) = std::env::var_os("VDG_CUDA_RPATH")
    {
        // Only the toolkit's libraries (cuBLAS, cuRAND, NVRTC, the runtime); the driver
        // (libcuda.so.1) comes from the system, never from the link-time stub.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.to_string_lossy());
    }
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
}
