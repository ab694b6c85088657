//! PKU-MMD label files: any text parses without a panic, and every row kept is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdg_pipeline::scan::{PKU_ACTIONS, parse_label_rows};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for base in [0, 1] {
        let (rows, problems) = parse_label_rows(text, base);
        let lines = text.lines().count();
        for r in &rows {
            assert!((1..=PKU_ACTIONS).contains(&r.action));
            assert!(r.start <= r.end);
            assert!(r.line >= 1 && r.line <= lines);
        }
        assert!(rows.len() + problems.len() <= lines);
    }
});
