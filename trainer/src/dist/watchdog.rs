//! A rank's watchdog: NCCL's collectives run on the GPU, so a rank whose peer died waits inside a
//! device synchronisation that no timeout of ours reaches. The training loop beats once per
//! step; when no beat comes for the timeout, the watchdog ends the process with an error that
//! names the rank (checkpoints are written atomically, so the last one stays intact), and the
//! launcher sees a failed rank.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The shared state: the last beat, and whether the loop has finished.
struct Beat {
    last: Instant,
    done: bool,
}

/// Watches one rank's training loop while alive.
pub struct Watchdog {
    state: Arc<(Mutex<Beat>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching: `expire` runs (on the watchdog's thread) when `timeout` passes without a
    /// [`Self::beat`]. The production `expire` reports and exits the process.
    pub fn start(timeout: Duration, expire: impl FnOnce(Duration) + Send + 'static) -> Self {
        let state = Arc::new((
            Mutex::new(Beat {
                last: Instant::now(),
                done: false,
            }),
            Condvar::new(),
        ));
        let watched = state.clone();
        let thread = std::thread::spawn(move || {
            let (lock, changed) = &*watched;
            let Ok(mut beat) = lock.lock() else { return };
            loop {
                if beat.done {
                    return;
                }
                let quiet = beat.last.elapsed();
                if quiet >= timeout {
                    drop(beat);
                    expire(quiet);
                    return;
                }
                beat = match changed.wait_timeout(beat, timeout - quiet) {
                    Ok((b, _)) => b,
                    Err(_) => return,
                };
            }
        });
        Watchdog {
            state,
            thread: Some(thread),
        }
    }

    /// Says the loop made progress.
    pub fn beat(&self) {
        if let Ok(mut beat) = self.state.0.lock() {
            beat.last = Instant::now();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Ok(mut beat) = self.state.0.lock() {
            beat.done = true;
        }
        self.state.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watchdog of NCCL rank `rank`: exits the process after `timeout` without progress.
pub fn exit_when_stuck(rank: usize, timeout: Duration) -> Watchdog {
    Watchdog::start(timeout, move |quiet| {
        eprintln!(
            "error: rank {rank} made no progress for {:.0} s: another rank died or hangs (its \
             launcher's log names it). Stopping; the last checkpoint is intact, resume with \
             --resume",
            quiet.as_secs_f64()
        );
        std::process::exit(1);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A watchdog of `timeout` whose expiry sets the returned flag.
    fn flagged(timeout: Duration) -> (Watchdog, Arc<AtomicBool>) {
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let dog = Watchdog::start(timeout, move |_| flag.store(true, Ordering::SeqCst));
        (dog, fired)
    }

    #[test]
    fn silence_expires_and_beats_keep_it_quiet() {
        let (dog, fired) = flagged(Duration::from_millis(300));
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(100));
            dog.beat();
        }
        assert!(!fired.load(Ordering::SeqCst), "fired despite the beats");
        std::thread::sleep(Duration::from_millis(600));
        assert!(
            fired.load(Ordering::SeqCst),
            "did not fire after the silence"
        );
        drop(dog);
    }

    #[test]
    fn a_finished_loop_stops_its_watchdog() {
        let (dog, fired) = flagged(Duration::from_millis(200));
        drop(dog);
        std::thread::sleep(Duration::from_millis(400));
        assert!(!fired.load(Ordering::SeqCst));
    }
}
