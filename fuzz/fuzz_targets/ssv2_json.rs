//! Something-Something v2 annotation JSON: any text parses without a panic, and every id
//! kept is a safe file name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdg_pipeline::scan::ssv2::{is_safe_id, parse_entries, parse_labels};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_labels(text);
    if let Ok(entries) = parse_entries(text) {
        for (id, _) in entries.into_iter().flatten() {
            assert!(is_safe_id(&id), "{id:?}");
            assert!(!id.contains('/') && !id.contains(".."));
        }
    }
});
