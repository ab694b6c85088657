//! NTU RGB+D file names: any stem parses without a panic, and a parsed name is exactly the
//! stem it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdg_pipeline::scan::parse_ntu_name;

fuzz_target!(|data: &[u8]| {
    let Ok(stem) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(n) = parse_ntu_name(stem) {
        let joined = format!(
            "{}{}{}{}{}",
            n.setup, n.camera, n.performer, n.replication, n.action
        );
        assert_eq!(joined, stem.strip_suffix("_rgb").unwrap_or(stem));
    }
});
