//! Pretraining's progress on stderr: a bar on a terminal, or a plain line every so often when
//! stderr is a log file (every cluster job), so that a long run is never silent.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How a run reports its progress.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProgressMode {
    /// A progress bar (for a terminal).
    Bar,
    /// A plain line at the first step, then at most one per `every`, and at the last step.
    Lines { every: Duration },
    /// Nothing but warnings and kNN results.
    Off,
}

/// One step's figures, as a progress line shows them.
pub struct StepFigures {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub views_per_second: f64,
}

/// Reports the steps of one invocation, from step `start` to `end` of a run of `total`.
pub struct Reporter {
    mode: ProgressMode,
    bar: ProgressBar,
    total: u64,
    start: u64,
    end: u64,
    started: Instant,
    last_line: Option<Instant>,
}

impl Reporter {
    /// A reporter for steps `start..end` of a run of `total` steps.
    pub fn new(mode: ProgressMode, start: u64, end: u64, total: u64) -> Self {
        let bar = if mode == ProgressMode::Bar {
            let bar = ProgressBar::new(total);
            bar.set_position(start);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                    .expect("valid template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        Reporter {
            mode,
            bar,
            total,
            start,
            end,
            started: Instant::now(),
            last_line: None,
        }
    }

    /// Records a logged step (every `log_every` steps: the bar jumps to it).
    pub fn step(&mut self, f: &StepFigures) {
        match self.mode {
            ProgressMode::Bar => {
                self.bar.set_message(format!(
                    "loss {:.4}  {:.0} views/s  epoch {}",
                    f.loss, f.views_per_second, f.epoch
                ));
                self.bar.set_position(f.step);
            }
            ProgressMode::Lines { every } => {
                let due = self.last_line.is_none_or(|t| t.elapsed() >= every);
                if due || f.step == self.end {
                    self.last_line = Some(Instant::now());
                    eprintln!("{}", self.line(f));
                }
            }
            ProgressMode::Off => {}
        }
    }

    /// `step S/T (P%)  epoch E  loss L  lr R  V views/s  ETA D`.
    fn line(&self, f: &StepFigures) -> String {
        let done = f.step.saturating_sub(self.start).max(1);
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        let left = Duration::from_secs_f64(per_step * self.end.saturating_sub(f.step) as f64);
        format!(
            "step {}/{} ({:.1}%)  epoch {}  loss {:.4}  lr {:.2e}  {:.0} views/s  ETA {}",
            f.step,
            self.total,
            100.0 * f.step as f64 / self.total.max(1) as f64,
            f.epoch,
            f.loss,
            f.lr,
            f.views_per_second,
            indicatif::HumanDuration(left)
        )
    }

    /// Prints a line above the bar, or plainly when there is none.
    pub fn say(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
