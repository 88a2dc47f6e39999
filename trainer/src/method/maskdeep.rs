//! MaskDeep (and BYOL, its unmasked special case): the online and target branches and the
//! multi-group, multi-target loss over masked levels. See `docs/METHOD.md`.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::{HeadNorm, Targets, TrainConfig};
use crate::method::masking::{masked_pool, VisibleCells};
use crate::nn::heads::Mlp;
use crate::nn::params;
use crate::nn::resnet::ResNet;

/// Encoder plus one projector per masked level (the part the target copies).
pub struct Branch {
    pub backbone: ResNet,
    pub projectors: Vec<Mlp>,
}

impl Branch {
    fn new(cfg: &TrainConfig, vb: &VarBuilder) -> Result<Self> {
        let resnet = cfg.resnet();
        let channels = resnet.channels();
        let backbone = ResNet::new(resnet, vb.pp("backbone"))?;
        let projectors = level_heads(cfg, |level, name| {
            Mlp::new(
                vb.pp("projector").pp(name),
                channels[level],
                cfg.model.proj_hidden,
                cfg.model.proj_dim,
            )
        })?;
        Ok(Branch {
            backbone,
            projectors,
        })
    }
}

fn level_heads(
    cfg: &TrainConfig,
    mut make: impl FnMut(usize, &str) -> Result<Mlp>,
) -> Result<Vec<Mlp>> {
    let indices = cfg.level_indices();
    indices
        .iter()
        .zip(&cfg.method.levels)
        .map(|(&i, level)| make(i, level.name()))
        .collect()
}

/// The two networks and their parameters.
pub struct MaskDeep {
    cfg: TrainConfig,
    levels: Vec<usize>,
    /// Online parameters: `backbone.*`, `projector.<level>.*`, `predictor.<level>.*`.
    pub online_vars: VarMap,
    /// Target parameters: `backbone.*`, `projector.<level>.*` (an EMA of the online ones).
    pub target_vars: VarMap,
    pub online: Branch,
    pub predictors: Vec<Mlp>,
    pub target: Branch,
    /// [`MaskDeep::target_weights`], made once (not uploaded every step).
    target_weights: Tensor,
    device: Device,
}

/// The loss of one step.
pub struct Loss {
    /// Weighted sum over levels (the value to minimise).
    pub total: Tensor,
    /// Per masked level, unweighted.
    pub per_level: Vec<Tensor>,
}

impl Loss {
    /// The same values without the graph behind them.
    pub fn detach(&self) -> Result<Loss> {
        Ok(Loss {
            total: self.total.detach(),
            per_level: self.per_level.iter().map(Tensor::detach).collect(),
        })
    }

    /// `[total, per level...]` on the host, read in one copy (one device synchronisation).
    pub fn values(&self) -> Result<Vec<f64>> {
        let mut terms = vec![&self.total];
        terms.extend(&self.per_level);
        let values = Tensor::stack(&terms, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(values)
    }

    /// The mean of `losses` (one when there is one), term by term.
    pub fn mean(losses: &[Loss]) -> Result<Loss> {
        let mean = |terms: Vec<&Tensor>| -> Result<Tensor> {
            match terms.as_slice() {
                [one] => Ok((*one).clone()),
                _ => Tensor::stack(&terms, 0)?.mean(0),
            }
        };
        let levels = losses.first().map_or(0, |l| l.per_level.len());
        Ok(Loss {
            total: mean(losses.iter().map(|l| &l.total).collect())?,
            per_level: (0..levels)
                .map(|i| mean(losses.iter().map(|l| &l.per_level[i]).collect()))
                .collect::<Result<_>>()?,
        })
    }
}

/// Where the forward pass spends its time, and the ops of the target branch (whose graph is cut
/// before the loss), filled when asked for (synchronises the device).
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardProfile {
    pub online_encoder: Duration,
    pub heads: Duration,
    pub target: Duration,
    pub target_ops: usize,
    /// Time spent counting `target_ops` (not part of the step's work).
    pub counting: Duration,
}

/// A step's inputs: normalised views, global first.
pub struct Views<'a> {
    /// `[global_views * batch, 3, S, S]`, view-major.
    pub global: &'a Tensor,
    /// `[local_views * batch, 3, s, s]`, view-major, when the config has local views.
    pub local: Option<&'a Tensor>,
    /// Each sample's position in the step's global batch (over every rank and micro-batch): it
    /// keys the sample's masks.
    pub positions: &'a [u64],
}

impl Views<'_> {
    /// Samples per view.
    pub fn batch(&self) -> usize {
        self.positions.len()
    }
}

impl MaskDeep {
    /// Builds both branches on `device`, initialised from `cfg.seed`; the target starts as a copy.
    /// Mixed precision (`bf16`) is refused on the CPU, whose matmuls have no bf16 kernels.
    pub fn new(cfg: &TrainConfig, device: &Device) -> Result<Self> {
        if cfg.model.bf16 && device.is_cpu() {
            candle_core::bail!(
                "bf16 mixed precision runs on CUDA only (the CPU's matmuls have no bf16 kernels): \
                 use --device cuda, or --set bf16=false on the CPU"
            );
        }
        let online_vars = VarMap::new();
        let target_vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&online_vars, DType::F32, device);
        let online = Branch::new(cfg, &vb)?;
        let predictors = level_heads(cfg, |_, name| {
            Mlp::new(
                vb.pp("predictor").pp(name),
                cfg.model.proj_dim,
                cfg.model.pred_hidden,
                cfg.model.proj_dim,
            )
        })?;
        let target = Branch::new(
            cfg,
            &VarBuilder::from_varmap(&target_vars, DType::F32, device),
        )?;
        params::init(&online_vars, cfg.run.seed)?;
        params::copy_all(&target_vars_view(&online_vars, &target_vars), &target_vars)?;
        Ok(MaskDeep {
            target_weights: target_weights(cfg, device)?,
            cfg: cfg.clone(),
            levels: cfg.level_indices(),
            online_vars,
            target_vars,
            online,
            predictors,
            target,
            device: device.clone(),
        })
    }

    /// The optimiser of the online parameters that the config names.
    pub fn optimizer(&self) -> Result<crate::train::optim::Optimizer> {
        let rule =
            crate::train::optim::Rule::from_config(self.cfg.optim.optimizer, self.cfg.optim.trust);
        crate::train::optim::Optimizer::new(
            rule,
            params::trainable(&self.online_vars),
            self.cfg.optim.momentum,
            self.cfg.optim.weight_decay,
        )
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Samples the visible cells of step `step`: one set per (online view, sample, group) on the
    /// mask grid (`mask_grid`, by default the coarsest masked level) of each view size, each
    /// (view, sample) from its own stream keyed by (seed, step, the sample's position, view); all
    /// visible when `visible_ratio` is 1.
    pub fn sample_masks(&self, step: u64, views: &Views) -> Result<Vec<VisibleCells>> {
        let grid_level = self.cfg.mask_grid().expect("validated: at least one level");
        let stride = self.cfg.resnet().strides()[grid_level.index()];
        let (seed, batch) = (self.cfg.run.seed, views.batch());
        let mut out = Vec::new();
        let mut first_view = 0;
        let mut add = |t: &Tensor| -> Result<()> {
            let (rows, _, h, w) = t.dims4()?;
            let grid = (h.div_ceil(stride), w.div_ceil(stride));
            let groups = self.cfg.method.groups;
            out.push(if self.cfg.method.visible_ratio >= 1.0 {
                VisibleCells::all(rows, groups, grid)
            } else {
                // Rows are view-major: row r is sample r % batch of view r / batch.
                let rng_of_row = |r: usize| {
                    let view = (first_view + r / batch) as u64;
                    mask_rng(seed, step, views.positions[r % batch], view)
                };
                VisibleCells::sample(
                    rng_of_row,
                    rows,
                    groups,
                    grid,
                    self.cfg.method.visible_ratio,
                )
            });
            first_view += rows / batch;
            Ok(())
        };
        add(views.global)?;
        if let Some(local) = views.local {
            add(local)?;
        }
        Ok(out)
    }

    /// Row blocks of the heads' BatchNorm for a head fed `views` views: one per view under
    /// `head_bn = per_view`, else one.
    fn head_blocks(&self, views: usize) -> usize {
        match self.cfg.method.head_bn {
            HeadNorm::Joint => 1,
            HeadNorm::PerView => views,
        }
    }

    /// The loss for `views` with the visible cells from [`Self::sample_masks`].
    pub fn loss(
        &self,
        views: &Views,
        masks: &[VisibleCells],
        times: Option<&mut ForwardProfile>,
    ) -> Result<Loss> {
        let mut clock = Clock::new(&self.device, times.is_some());
        let dtype = self.cfg.model.compute_dtype();
        let mut inputs = vec![views.global];
        inputs.extend(views.local);
        let feats = inputs
            .iter()
            .map(|x| self.online.backbone.forward(&x.to_dtype(dtype)?, true))
            .collect::<Result<Vec<_>>>()?;
        let t_enc = clock.lap()?;

        // Online: pooled -> projector -> predictor, per level; rows ordered (view, sample, group).
        let blocks = self.head_blocks(self.cfg.data.global_views + self.cfg.data.local_views);
        let mut preds = Vec::with_capacity(self.levels.len());
        for (li, &level) in self.levels.iter().enumerate() {
            let mut rows = Vec::with_capacity(feats.len());
            for (f, mask) in feats.iter().zip(masks) {
                let fmap = &f.levels[level];
                let (n, c, h, w) = fmap.dims4()?;
                let weights = mask.pooling_tensor((h, w), fmap.dtype(), &self.device)?;
                let pooled = masked_pool(fmap, &weights)?
                    .to_dtype(DType::F32)?
                    .reshape((n * self.cfg.method.groups, c))?;
                rows.push(pooled);
            }
            let pooled = Tensor::cat(&rows, 0)?;
            let z = self.online.projectors[li].forward(&pooled, true, blocks)?;
            preds.push(l2_normalize_rows(
                &self.predictors[li].forward(&z, true, blocks)?,
            )?);
        }
        let t_heads = clock.lap()?;

        // Target: unmasked global views, global average pool, projector; no gradient.
        let tfeats = self
            .target
            .backbone
            .forward(&views.global.to_dtype(dtype)?, true)?;
        let mut targets = Vec::with_capacity(self.levels.len());
        let mut target_graph = Vec::new();
        let blocks = self.head_blocks(self.cfg.data.global_views);
        for (li, &level) in self.levels.iter().enumerate() {
            let pooled = tfeats.levels[level].mean((2, 3))?.to_dtype(DType::F32)?;
            let z = l2_normalize_rows(&self.target.projectors[li].forward(&pooled, true, blocks)?)?;
            if times.is_some() {
                target_graph.push(z.clone());
            }
            targets.push(z.detach());
        }
        let t_target = clock.lap()?;
        let counting = Instant::now();
        let target_ops = crate::train::step::graph_ops(&target_graph);
        drop(target_graph);
        let counting = counting.elapsed();
        if let Some(t) = times {
            t.online_encoder += t_enc;
            t.heads += t_heads;
            t.target += t_target;
            t.target_ops = target_ops;
            t.counting = counting;
        }

        let weights = &self.target_weights;
        let mut per_level = Vec::with_capacity(self.levels.len());
        let mut total: Option<Tensor> = None;
        for (li, (p, z)) in preds.iter().zip(&targets).enumerate() {
            let l = multi_target_loss(p, z, weights, views.batch(), self.cfg.method.groups)?;
            let weighted = (&l * self.cfg.method.level_weights[li])?;
            total = Some(match total {
                None => weighted,
                Some(t) => (t + weighted)?,
            });
            per_level.push(l);
        }
        Ok(Loss {
            total: total.expect("at least one level"),
            per_level,
        })
    }
}

/// `[online views * groups, global views]`: the weight of each (online view, group, target)
/// cosine, summing to 1 over included pairs.
fn target_weights(cfg: &TrainConfig, device: &Device) -> Result<Tensor> {
    let n_global = cfg.data.global_views;
    let n_views = n_global + cfg.data.local_views;
    let groups = cfg.method.groups;
    let include = |i: usize, j: usize| cfg.method.targets == Targets::All || i != j;
    let pairs = (0..n_views)
        .flat_map(|i| (0..n_global).map(move |j| (i, j)))
        .filter(|&(i, j)| include(i, j))
        .count();
    let mut w = Vec::with_capacity(n_views * groups * n_global);
    for i in 0..n_views {
        for _ in 0..groups {
            for j in 0..n_global {
                let on = include(i, j) as u8 as f32;
                w.push(on / (pairs * groups) as f32);
            }
        }
    }
    Tensor::from_vec(w, (n_views * groups, n_global), device)
}

/// The random stream of the masks of one (step, sample position, view): a function of these only,
/// so that a resumed run draws what an uninterrupted one would, and a batch split over ranks or
/// micro-batches what the whole batch would.
pub fn mask_rng(seed: u64, step: u64, position: u64, view: u64) -> rand_chacha::ChaCha8Rng {
    shared::sampler::view_rng(seed ^ 0x6d61_736b_6465_6570, step, position, view)
}

/// `2 - 2 * cos`, averaged with `weights [views * groups, targets]` and over the batch.
/// `p`: `[views * batch * groups, d]` rows ordered (view, sample, group), unit length;
/// `z`: `[targets * batch, d]` rows ordered (view, sample), unit length.
pub fn multi_target_loss(
    p: &Tensor,
    z: &Tensor,
    weights: &Tensor,
    batch: usize,
    groups: usize,
) -> Result<Tensor> {
    let d = p.dim(1)?;
    let views = p.dim(0)? / (batch * groups);
    let targets = z.dim(0)? / batch;
    let p = p
        .reshape((views, batch, groups, d))?
        .transpose(0, 1)?
        .reshape((batch, views * groups, d))?;
    let z = z
        .reshape((targets, batch, d))?
        .transpose(0, 1)?
        .transpose(1, 2)?
        .contiguous()?;
    let cos = p.matmul(&z)?; // [batch, views * groups, targets]
    let mean_cos = (cos.broadcast_mul(weights)?.sum_all()? / batch as f64)?;
    (mean_cos * -2.0)? + 2.0
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// The online parameters that the target mirrors (all but the predictors), as a map view.
fn target_vars_view(online: &VarMap, target: &VarMap) -> VarMap {
    let view = VarMap::new();
    {
        let target_names = target.data().lock().expect("var map lock");
        let online_data = online.data().lock().expect("var map lock");
        let mut data = view.data().lock().expect("var map lock");
        for (name, var) in online_data.iter() {
            if target_names.contains_key(name) {
                data.insert(name.clone(), var.clone());
            }
        }
    }
    view
}

/// Wall-clock laps that wait for the device first, when enabled.
struct Clock<'a> {
    device: &'a Device,
    enabled: bool,
    last: Instant,
}

impl<'a> Clock<'a> {
    fn new(device: &'a Device, enabled: bool) -> Self {
        Clock {
            device,
            enabled,
            last: Instant::now(),
        }
    }

    fn lap(&mut self) -> Result<Duration> {
        if !self.enabled {
            return Ok(Duration::ZERO);
        }
        self.device.synchronize()?;
        let now = Instant::now();
        let d = now - self.last;
        self.last = now;
        Ok(d)
    }
}
