//! The one training step: masks -> forward -> loss -> backward -> gradient hook -> optimiser ->
//! EMA. Pretraining, `trainer bench` and `trainer parity` all run it; the data-parallel
//! all-reduce of the gradients goes into the hook.

use std::cell::Cell;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use crate::method::ema;
use crate::method::maskdeep::{ForwardProfile, Loss, MaskDeep, Views};
use crate::train::optim::Optimizer;

/// Called with the gradients between the backward pass and the update; may change them.
pub trait GradientHook {
    /// Sees (and may rewrite) the step's gradients.
    fn on_gradients(&mut self, grads: &mut GradStore) -> Result<()>;
}

/// The hook of a single process: leaves the gradients alone.
pub struct NoHook;

impl GradientHook for NoHook {
    fn on_gradients(&mut self, _grads: &mut GradStore) -> Result<()> {
        Ok(())
    }
}

/// The schedules' values for one step.
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    /// Learning rate.
    pub lr: f64,
    /// EMA momentum of the target.
    pub tau: f64,
}

/// Where a step spends its time and how many ops it runs, when asked for (synchronises the
/// device between phases).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepProfile {
    pub forward: ForwardProfile,
    pub backward: Duration,
    pub update: Duration,
    pub total: Duration,
    /// Nodes of the online graph (each runs its backward).
    pub graph_ops: usize,
    /// Ops the optimiser and the EMA applied.
    pub update_ops: usize,
}

/// The model, its optimiser and the gradient hook: everything a step changes.
pub struct TrainStep {
    pub model: MaskDeep,
    pub optimizer: Optimizer,
    hook: Box<dyn GradientHook>,
}

impl TrainStep {
    /// Steps `model` with `optimizer`, without a gradient hook.
    pub fn new(model: MaskDeep, optimizer: Optimizer) -> Self {
        TrainStep {
            model,
            optimizer,
            hook: Box::new(NoHook),
        }
    }

    /// Replaces the gradient hook.
    pub fn with_hook(mut self, hook: Box<dyn GradientHook>) -> Self {
        self.hook = hook;
        self
    }

    /// Runs step number `step` (which fixes its masks, see [`mask_rng`]) on `views` and returns
    /// its loss; fills `profile` when given.
    pub fn run(
        &mut self,
        views: &Views,
        step: u64,
        rates: Rates,
        profile: Option<&mut StepProfile>,
    ) -> Result<Loss> {
        let device = self.model.device().clone();
        let timed = profile.is_some();
        let lap = |since: Instant| -> Result<Duration> {
            if timed {
                device.synchronize()?;
            }
            Ok(since.elapsed())
        };
        let start = Instant::now();
        let mut rng = mask_rng(self.model.config().run.seed, step);
        let masks = self.model.sample_masks(&mut rng, views)?;
        let mut forward = ForwardProfile::default();
        let loss = self
            .model
            .loss(views, &masks, timed.then_some(&mut forward))?;
        let t_backward = Instant::now();
        let mut grads = loss.total.backward()?;
        self.hook.on_gradients(&mut grads)?;
        let backward = lap(t_backward)?;
        let t_update = Instant::now();
        let mut update_ops = self.optimizer.step(&grads, rates.lr)?;
        update_ops += ema::update(&self.model.online_vars, &self.model.target_vars, rates.tau)?;
        let update = lap(t_update)?;
        let total = start.elapsed() - forward.counting;
        STEPS_RUN.with(|n| n.set(n.get() + 1));
        if let Some(p) = profile {
            *p = StepProfile {
                forward,
                backward,
                update,
                total,
                graph_ops: graph_ops(std::slice::from_ref(&loss.total)),
                update_ops,
            };
        }
        Ok(loss)
    }
}

thread_local! {
    static STEPS_RUN: Cell<u64> = const { Cell::new(0) };
}

/// How many steps [`TrainStep::run`] has completed on the calling thread: lets a test check that
/// an entry point (pretraining, bench, parity) trains through it.
pub fn steps_run_on_this_thread() -> u64 {
    STEPS_RUN.with(Cell::get)
}

/// The ops of the autograd graph behind `roots`: the tensors made by an op that leads back to a
/// variable (each runs its backward when the graph is differentiated), counted once each.
pub fn graph_ops(roots: &[Tensor]) -> usize {
    let mut seen = std::collections::HashSet::new();
    for root in roots {
        for node in root.sorted_nodes() {
            if !node.is_variable() {
                seen.insert(node.id());
            }
        }
    }
    seen.len()
}

/// The random stream of step `step`'s masks: a function of (seed, step) only, so that a resumed
/// run draws what an uninterrupted one would.
pub fn mask_rng(seed: u64, step: u64) -> rand_chacha::ChaCha8Rng {
    shared::sampler::view_rng(seed ^ 0x6d61_736b_6465_6570, step, 0, 0)
}
