//! Benchmark manifests: any text loads or fails with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdg_data::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Manifest::from_toml(text, std::path::Path::new("fuzz.toml")) {
        // A manifest that loads can be used: every class maps into known domains.
        for c in &m.classes {
            for d in c.native.keys() {
                assert!(m.domains.iter().any(|x| &x.name == d), "{d}");
            }
        }
    }
});
