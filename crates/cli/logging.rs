//! The tracing subscriber, and an indicatif bar that log lines do not tear.

use std::io::Write;
use std::sync::Mutex;

use indicatif::ProgressBar;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A progress bar counting `units` (`videos`, `frames`, `batches`, `runs`) on a terminal, or
/// `None` when `quiet` or stderr is not a terminal (logs then carry the progress). The bar is
/// registered with [`set_bar`].
pub fn new_bar(quiet: bool, units: &str) -> Option<ProgressBar> {
    let bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = ProgressBar::new(0);
        let template = format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:32.cyan/blue}} {{pos}}/{{len}} {units} {{msg}} ETA {{eta}}"
        );
        b.set_style(
            indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    });
    set_bar(bar.clone());
    bar
}

/// Sets the bar that log output must print around (or clears it).
pub fn set_bar(bar: Option<ProgressBar>) {
    if let Ok(mut b) = BAR.lock() {
        *b = bar;
    }
}

/// Runs `f` with the bar (if any) hidden.
///
/// Re-entrant: log lines written inside `f` go through [`suspend`] again (the tracing
/// writer), and indicatif's `suspend` would wait on itself, so nested calls just run `f`.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    thread_local! {
        static SUSPENDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if SUSPENDED.with(|s| s.get()) {
        return f();
    }
    let bar = BAR.lock().ok().and_then(|b| b.clone());
    match bar {
        Some(bar) => bar.suspend(|| {
            SUSPENDED.with(|s| s.set(true));
            let r = f();
            SUSPENDED.with(|s| s.set(false));
            r
        }),
        None => f(),
    }
}

struct BarWriter(Vec<u8>);

impl Write for BarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BarWriter {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        suspend(|| {
            let _ = std::io::stderr().write_all(&buf);
        });
    }
}

struct MakeBarWriter;

impl<'a> MakeWriter<'a> for MakeBarWriter {
    type Writer = BarWriter;
    fn make_writer(&'a self) -> Self::Writer {
        BarWriter(Vec::new())
    }
}

/// Installs the subscriber: warn with `-q`, info by default, debug with `-v`, trace with
/// `-vv`; `RUST_LOG` overrides.
pub fn init(quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(MakeBarWriter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logging_inside_suspend_does_not_deadlock() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let bar =
                ProgressBar::with_draw_target(Some(10), indicatif::ProgressDrawTarget::hidden());
            set_bar(Some(bar));
            // What `tracing::info!` inside `suspend` does: the writer suspends again.
            let v = suspend(|| suspend(|| 7));
            set_bar(None);
            let _ = tx.send(v);
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(got, Ok(7), "nested suspend hung");
    }
}
