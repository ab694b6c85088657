//! Helpers of this crate's unit tests.

use std::path::Path;
use std::time::Duration;

/// Makes a named pipe at `path` (with the `mkfifo` program).
pub(crate) fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", path.display());
}

/// Runs `f` on a helper thread and returns its result, or panics naming `what` when it has
/// not returned within `secs`: a call that blocks (on a named pipe) fails the test instead of
/// hanging it.
pub(crate) fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}
