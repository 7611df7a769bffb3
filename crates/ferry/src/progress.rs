//! Job progress: a bar on a terminal, a log line every few seconds elsewhere (CI logs, Kubernetes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Always a bar.
    Bar,
    /// Log lines every 10 seconds.
    Log,
    /// Nothing until the summary.
    Off,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    log: bool,
    total: usize,
    objects: usize,
    failed: usize,
    records: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode, total: usize, skipped: usize) -> Self {
        let bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            ProgressMode::Log | ProgressMode::Off => false,
        };
        let bar = bar.then(|| {
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} objects  {msg}  ETA {eta}",
                )
                .expect("the template is valid"),
            );
            if skipped > 0 {
                b.println(format!("{skipped} objects already done, skipped"));
            }
            b
        });
        let log = bar.is_none() && mode != ProgressMode::Off;
        let now = Instant::now();
        Self { bar, log, total, objects: 0, failed: 0, records: 0, started: now, last_log: now }
    }

    pub(crate) fn records(&mut self, n: u64) {
        self.records += n;
    }

    pub(crate) fn object_done(&mut self, records: u64, failed: bool) {
        self.records += records;
        self.objects += 1;
        self.failed += usize::from(failed);
        let rate = self.records as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        if let Some(b) = &self.bar {
            b.set_position(self.objects as u64);
            b.set_message(format!("{} records  {rate:.1} rec/s  {} failed", self.records, self.failed));
        } else if self.log && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let left = self.total - self.objects;
            let eta = if rate > 0.0 { left as f64 * self.records as f64 / self.objects as f64 / rate } else { 0.0 };
            tracing::info!(
                "{}/{} objects, {} records, {rate:.1} rec/s, {} failed, ETA {eta:.0}s",
                self.objects,
                self.total,
                self.records,
                self.failed
            );
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
