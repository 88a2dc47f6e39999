//! Data-parallel training: ranks that each run the same step on their part of the global batch and
//! agree through one small interface, [`Collective`]. Two implementations: [`threads`] (N ranks
//! as N threads of one process, on the CPU: the tests' and several sockets' engine) and, with the
//! `nccl` feature, [`nccl`] (one process per GPU, NVIDIA's collective library). [`launch`] reads
//! the rank a launcher gave this process (torchrun, SLURM, `--gpus`); [`rendezvous`] hands NCCL's
//! unique id from rank 0 to the others; [`gradients`] averages the gradients after each backward;
//! [`sync_bn`] makes BatchNorm's statistics those of the global batch; [`watchdog`] ends a rank
//! that stopped making progress.

pub mod gradients;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod sync_bn;
pub mod threads;
pub mod watchdog;

use std::sync::Arc;
use std::time::Duration;

use candle_core::{Result, Tensor};

/// How long a rank waits for the others at one collective call before it gives up and stops the
/// group with an error (a hung or dead rank must not hang the others forever). Rank 0's kNN
/// evaluation and checkpoints happen while the others wait, so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What every rank of a data-parallel group can do together. Every rank calls the same methods
/// in the same order with tensors of the same shapes.
pub trait Collective: Send + Sync {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Sums `values` over the ranks, in place, on the host (BatchNorm's f64 sums on the CPU).
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()>;
    /// The sum of `t` over the ranks, on `t`'s device, in `t`'s dtype.
    fn all_reduce(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t`, on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Tells the other ranks that this one failed with `reason`: their current or next call
    /// fails with an error that names this rank.
    fn abort(&self, reason: &str);
}

/// A shared handle on a rank's collective.
pub type Group = Arc<dyn Collective>;

/// The group of one: every collective is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_host(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn abort(&self, _reason: &str) {}
}

/// The one-rank group.
pub fn solo() -> Group {
    Arc::new(Solo)
}
