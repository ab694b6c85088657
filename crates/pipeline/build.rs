//! Records the libjpeg-turbo version this crate is built against (TurboJPEG has no
//! run-time version call), for the prep fingerprint.

fn main() {
    let version = std::process::Command::new("pkg-config")
        .args(["--modversion", "libturbojpeg"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=VDG_LIBTURBOJPEG_VERSION={version}");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-changed=build.rs");
}
