//! The one training step: per micro-batch masks -> forward -> loss -> backward (gradients summed
//! over the micro-batches) -> gradient hook -> optimiser -> EMA. Pretraining, `trainer bench` and
//! `trainer parity` all run it; the data-parallel all-reduce of the gradients goes into the hook
//! ([`crate::dist::gradients`]), and SyncBN's group rides on the forward and backward.

use std::cell::Cell;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use crate::dist::{sync_bn, Group};
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

/// The model, its optimiser, the gradient hook and the SyncBN group: everything a step changes.
pub struct TrainStep {
    pub model: MaskDeep,
    pub optimizer: Optimizer,
    hook: Box<dyn GradientHook>,
    sync_bn: Option<Group>,
}

impl TrainStep {
    /// Steps `model` with `optimizer`, without a gradient hook.
    pub fn new(model: MaskDeep, optimizer: Optimizer) -> Self {
        TrainStep {
            model,
            optimizer,
            hook: Box::new(NoHook),
            sync_bn: None,
        }
    }

    /// Replaces the gradient hook.
    pub fn with_hook(mut self, hook: Box<dyn GradientHook>) -> Self {
        self.hook = hook;
        self
    }

    /// Synchronises BatchNorm over `group` in the forward and backward passes (SyncBN).
    pub fn with_sync_bn(mut self, group: Group) -> Self {
        self.sync_bn = Some(group);
        self
    }

    /// Runs step number `step` (which, with the samples' positions, fixes the masks) on the
    /// micro-batches `micro` (one for a plain step; their gradients are averaged, as if they
    /// were one batch) and returns the loss averaged over them, without a graph; fills `profile`
    /// when given (the forward phases of the first micro-batch).
    pub fn run(
        &mut self,
        micro: &[Views],
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
        let mut forward = ForwardProfile::default();
        let (mut backward, mut graph) = (Duration::ZERO, 0);
        let mut grads: Option<GradStore> = None;
        let mut losses = Vec::with_capacity(micro.len());
        let scope = self.sync_bn.as_ref().map(sync_bn::Scope::enter);
        for (i, views) in micro.iter().enumerate() {
            let masks = self.model.sample_masks(step, views)?;
            let first = timed && i == 0;
            let loss = self
                .model
                .loss(views, &masks, first.then_some(&mut forward))?;
            if first {
                graph = graph_ops(std::slice::from_ref(&loss.total));
            }
            let t_backward = Instant::now();
            let objective = match micro.len() {
                1 => loss.total.clone(),
                k => (&loss.total / k as f64)?,
            };
            let g = objective.backward()?;
            match &mut grads {
                None => grads = Some(g),
                Some(sum) => sum.extend(g)?,
            }
            backward += lap(t_backward)?;
            losses.push(loss.detach()?);
        }
        drop(scope);
        let mut grads =
            grads.ok_or_else(|| candle_core::Error::Msg("a step without data".into()))?;
        let t_hook = Instant::now();
        self.hook.on_gradients(&mut grads)?;
        backward += lap(t_hook)?;
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
                graph_ops: graph,
                update_ops,
            };
        }
        Loss::mean(&losses)
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
