//! N ranks as N threads of one process: each collective call deposits the rank's values, the last
//! rank to arrive combines them in rank order (so the result does not depend on who came first)
//! and every rank takes the result. A rank that fails (or times out) marks the group failed, and
//! every other rank's current or next call returns an error naming it: no rank hangs.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Result, Tensor};

use super::{Collective, Group};

/// What one collective call combines.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Combine {
    Sum,
    Take(usize),
}

/// The state every rank of the group shares.
struct Round {
    /// Completed calls so far (the current call's number).
    calls: u64,
    /// Each rank's deposit for the current call.
    slots: Vec<Option<(Combine, Vec<f64>)>>,
    /// The current call's result, while ranks are still taking it.
    result: Option<Arc<Vec<f64>>>,
    /// Ranks that have not yet taken `result`.
    to_take: usize,
    /// The first failure: rank and reason.
    failed: Option<(usize, String)>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    changed: Condvar,
}

/// One rank's handle on an in-process group (see [`group`]).
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// The handles of a group of `world` ranks, rank order; each goes to its own thread. A rank that
/// waits longer than `timeout` for the others fails the group.
pub fn group(world: usize, timeout: Duration) -> Vec<Group> {
    let shared = Arc::new(Shared {
        world,
        timeout,
        round: Mutex::new(Round {
            calls: 0,
            slots: vec![None; world],
            result: None,
            to_take: 0,
            failed: None,
        }),
        changed: Condvar::new(),
    });
    (0..world)
        .map(|rank| {
            Arc::new(ThreadRank {
                rank,
                shared: shared.clone(),
            }) as Group
        })
        .collect()
}

/// The error of a call on a failed group.
fn failure(by: usize, reason: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("rank {by} failed: {reason}"))
}

impl ThreadRank {
    /// Waits on the group's condition until `ready` holds, failing on a failed group or after
    /// the timeout (which fails the group).
    fn wait<'a>(
        &self,
        mut round: MutexGuard<'a, Round>,
        what: &str,
        ready: impl Fn(&Round) -> bool,
    ) -> Result<MutexGuard<'a, Round>> {
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            if let Some((by, reason)) = &round.failed {
                return Err(failure(*by, reason));
            }
            if ready(&round) {
                return Ok(round);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> = (0..self.shared.world)
                    .filter(|&r| round.slots[r].is_none())
                    .collect();
                let reason = format!(
                    "waited {:.0} s {what} at collective call {} (ranks not there: {missing:?})",
                    self.shared.timeout.as_secs_f64(),
                    round.calls
                );
                round.failed = Some((self.rank, reason.clone()));
                self.shared.changed.notify_all();
                return Err(failure(self.rank, &reason));
            }
            round = self
                .shared
                .changed
                .wait_timeout(round, left)
                .map_err(|_| candle_core::Error::Msg("collective: a rank panicked".into()))?
                .0;
        }
    }

    /// Deposits `values` for the current call and returns the combined result.
    fn exchange(&self, combine: Combine, values: Vec<f64>) -> Result<Arc<Vec<f64>>> {
        let round = self
            .shared
            .round
            .lock()
            .map_err(|_| candle_core::Error::Msg("collective: a rank panicked".into()))?;
        // The previous call's result must be taken by everyone before a new one starts.
        let mut round = self.wait(round, "for the previous call to finish", |r| {
            r.result.is_none()
        })?;
        round.slots[self.rank] = Some((combine, values));
        if round.slots.iter().all(Option::is_some) {
            let deposits: Vec<(Combine, Vec<f64>)> =
                round.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            let result = match combined(&deposits) {
                Ok(r) => r,
                Err(reason) => {
                    round.failed = Some((self.rank, reason.clone()));
                    self.shared.changed.notify_all();
                    return Err(failure(self.rank, &reason));
                }
            };
            round.result = Some(Arc::new(result));
            round.to_take = self.shared.world;
            self.shared.changed.notify_all();
        }
        let call = round.calls;
        let mut round = self.wait(round, "for the other ranks", |r| {
            r.calls == call && r.result.is_some()
        })?;
        let result = round.result.clone().expect("waited for it");
        round.to_take -= 1;
        if round.to_take == 0 {
            round.result = None;
            round.calls += 1;
            self.shared.changed.notify_all();
        }
        Ok(result)
    }
}

/// The result of one call from every rank's deposit (rank order), or why the deposits disagree.
fn combined(deposits: &[(Combine, Vec<f64>)]) -> std::result::Result<Vec<f64>, String> {
    let (combine, first) = &deposits[0];
    if deposits
        .iter()
        .any(|(c, v)| c != combine || v.len() != first.len())
    {
        let calls: Vec<_> = deposits.iter().map(|(c, v)| (*c, v.len())).collect();
        return Err(format!(
            "the ranks made different collective calls (operation, length per rank: {calls:?})"
        ));
    }
    Ok(match *combine {
        Combine::Sum => {
            let mut sum = first.clone();
            for (_, v) in &deposits[1..] {
                sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
            }
            sum
        }
        Combine::Take(root) => deposits[root].1.clone(),
    })
}

/// `t`'s values as f64 on the host.
fn host_values(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// `values` shaped, typed and placed like `like`.
fn like(values: &[f64], like: &Tensor) -> Result<Tensor> {
    Tensor::from_slice(values, like.shape(), &candle_core::Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        let sum = self.exchange(Combine::Sum, values.to_vec())?;
        values.copy_from_slice(&sum);
        Ok(())
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        let sum = self.exchange(Combine::Sum, host_values(t)?)?;
        like(&sum, t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.world {
            candle_core::bail!(
                "broadcast from rank {root} in a group of {}",
                self.shared.world
            );
        }
        let values = self.exchange(Combine::Take(root), host_values(t)?)?;
        like(&values, t)
    }

    fn abort(&self, reason: &str) {
        if let Ok(mut round) = self.shared.round.lock() {
            if round.failed.is_none() {
                round.failed = Some((self.rank, reason.to_string()));
            }
            self.shared.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f(rank, group)` on `world` threads and returns each rank's result.
    fn on_ranks<T: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(usize, &Group) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let ranks = group(world, timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(r, g)| {
                    let f = &f;
                    s.spawn(move || {
                        let out = f(r, g);
                        if let Err(e) = &out {
                            g.abort(&e.to_string());
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_and_broadcasts_agree_on_every_rank_over_many_calls() {
        let out = on_ranks(3, Duration::from_secs(20), |r, g| {
            let mut last = Vec::new();
            for call in 0..50 {
                let mut host = vec![r as f64, call as f64];
                g.all_reduce_host(&mut host)?;
                assert_eq!(host, vec![3.0, 3.0 * call as f64]);
                let t = Tensor::new(&[r as f32 + 0.5, call as f32], &candle_core::Device::Cpu)?;
                let sum = g.all_reduce(&t)?.to_vec1::<f32>()?;
                assert_eq!(sum, vec![4.5, 3.0 * call as f32]);
                last = g.broadcast(&t, 2)?.to_vec1::<f32>()?;
            }
            Ok(last)
        });
        for r in out {
            assert_eq!(r.unwrap(), vec![2.5, 49.0]);
        }
    }

    #[test]
    fn a_failing_rank_stops_the_others_with_its_name() {
        let out = on_ranks(3, Duration::from_secs(60), |r, g| {
            let mut v = vec![1.0];
            g.all_reduce_host(&mut v)?;
            if r == 1 {
                candle_core::bail!("disk full");
            }
            // Ranks 0 and 2 wait here for rank 1, which never comes.
            g.all_reduce_host(&mut v)?;
            Ok(())
        });
        for (r, result) in out.into_iter().enumerate() {
            let message = result.unwrap_err().to_string();
            if r == 1 {
                assert!(message.contains("disk full"), "{message}");
            } else {
                assert!(message.contains("rank 1 failed: disk full"), "{message}");
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out_instead_of_hanging() {
        let out = on_ranks(2, Duration::from_millis(200), |r, g| {
            if r == 0 {
                g.all_reduce_host(&mut [1.0])?;
            }
            Ok(())
        });
        let message = out[0].as_ref().unwrap_err().to_string();
        assert!(message.contains("ranks not there: [1]"), "{message}");
    }

    #[test]
    fn ranks_that_disagree_on_the_call_fail() {
        let out = on_ranks(2, Duration::from_secs(20), |r, g| {
            let mut v = vec![0.0; r + 1];
            g.all_reduce_host(&mut v)
        });
        for result in out {
            let message = result.unwrap_err().to_string();
            assert!(message.contains("different collective calls"), "{message}");
        }
    }
}
