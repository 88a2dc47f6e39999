//! Which samples each step sees: a seeded permutation per epoch, split across ranks, and
//! counter-based random streams keyed by (seed, epoch, sample, view).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// splitmix64: a strong 64-bit mix, used to turn keys into independent seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of one (seed, epoch, sample, view): the same key gives the same numbers
/// whatever the thread, prefetch depth or machine.
pub fn view_rng(seed: u64, epoch: u64, sample: u64, view: u64) -> ChaCha8Rng {
    let key = mix(mix(mix(mix(seed) ^ epoch) ^ sample) ^ view);
    ChaCha8Rng::seed_from_u64(key)
}

/// The order in which one rank visits the dataset, epoch by epoch.
#[derive(Clone, Debug)]
pub struct Sampler {
    len: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
    batch_size: usize,
}

impl Sampler {
    /// A sampler over `len` samples for `rank` of `world_size`, in batches of `batch_size`.
    pub fn new(
        len: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
        batch_size: usize,
    ) -> crate::Result<Self> {
        if world_size == 0 || rank >= world_size || batch_size == 0 {
            return Err(crate::Error::Invalid(format!(
                "need batch_size >= 1 and 0 <= rank < world_size, got batch {batch_size}, rank {rank}, world {world_size}"
            )));
        }
        let s = Sampler {
            len,
            seed,
            rank,
            world_size,
            batch_size,
        };
        if s.steps_per_epoch() == 0 {
            return Err(crate::Error::Invalid(format!(
                "{len} samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )));
        }
        Ok(s)
    }

    /// Full batches each rank gets per epoch (the tail that cannot fill a batch on every rank is dropped).
    pub fn steps_per_epoch(&self) -> usize {
        self.len / self.world_size / self.batch_size
    }

    /// The epoch's global order: a permutation of `0..len` that depends only on seed and epoch.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.len as u32).collect();
        let mut rng = view_rng(self.seed, epoch, u64::MAX, u64::MAX);
        // Fisher-Yates with the crate's unbiased range sampling.
        for i in (1..order.len()).rev() {
            let j = rand::Rng::random_range(&mut rng, 0..=i);
            order.swap(i, j);
        }
        order
    }

    /// The samples of global step `step` (counted from the start of training) for this rank.
    ///
    /// Position `p` of the epoch order goes to rank `p % world_size`: ranks get disjoint,
    /// equal parts, and a given step's global batch does not depend on how it is split.
    pub fn batch(&self, order: &[u32], step: usize) -> Vec<u32> {
        let within = step % self.steps_per_epoch();
        let start = within * self.batch_size;
        (start..start + self.batch_size)
            .map(|k| order[k * self.world_size + self.rank])
            .collect()
    }

    /// The epoch that global step `step` belongs to.
    pub fn epoch_of(&self, step: usize) -> u64 {
        (step / self.steps_per_epoch()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_disjoint_equal_and_cover_the_global_order() {
        let (n, world, batch) = (103, 3, 4);
        let samplers: Vec<_> = (0..world)
            .map(|r| Sampler::new(n, 9, r, world, batch).unwrap())
            .collect();
        let order = samplers[0].epoch_order(2);
        assert_eq!(
            order,
            samplers[2].epoch_order(2),
            "global order does not depend on rank"
        );
        let mut seen = std::collections::HashSet::new();
        for s in &samplers {
            assert_eq!(s.steps_per_epoch(), 8);
            for step in 0..s.steps_per_epoch() {
                for id in s.batch(&order, step) {
                    assert!(seen.insert(id), "sample {id} seen twice");
                }
            }
        }
        assert_eq!(seen.len(), 8 * 4 * 3);
        let single = Sampler::new(n, 9, 0, 1, batch).unwrap();
        assert_eq!(
            single.epoch_order(2),
            order,
            "global order does not depend on world size"
        );
        assert_ne!(single.epoch_order(3), order);
    }

    #[test]
    fn keyed_streams_differ_by_every_key_part() {
        use rand::Rng;
        let a: u64 = view_rng(1, 2, 3, 4).random();
        assert_eq!(a, view_rng(1, 2, 3, 4).random::<u64>());
        for other in [
            view_rng(0, 2, 3, 4),
            view_rng(1, 0, 3, 4),
            view_rng(1, 2, 0, 4),
            view_rng(1, 2, 3, 0),
        ] {
            let mut other = other;
            assert_ne!(a, other.random::<u64>());
        }
    }
}
