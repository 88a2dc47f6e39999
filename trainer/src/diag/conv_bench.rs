//! `trainer bench convs`: times the forward and the backward of each distinct convolution of a
//! config's backbone, at the shapes the online encoder runs them on a batch of global views, so
//! that a step's time can be traced to its layers and set beside another library's, layer by
//! layer (`tools/bench-convs.sh` runs PyTorch's on the same shapes).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use crate::config::TrainConfig;
use crate::error::Result;
use crate::nn::resnet::{ConvShape, ResNet};
use crate::ops::conv::{conv2d, gradients};

/// One distinct convolution and its median times.
#[derive(Clone, Debug, Serialize)]
pub struct ConvTime {
    #[serde(flatten)]
    pub shape: ConvShape,
    /// How many of the backbone's convolutions have this shape.
    pub count: usize,
    /// Whether the backward computes the input's gradient (all but the stem's).
    pub input_gradient: bool,
    pub forward_ms: f64,
    /// Weight gradient, and input gradient where `input_gradient`.
    pub backward_ms: f64,
}

/// The convolutions of one backbone on `images` images.
#[derive(Clone, Debug, Serialize)]
pub struct ConvTimes {
    pub images: usize,
    pub layers: Vec<ConvTime>,
    /// Sum over the backbone's convolutions (each shape times its count).
    pub forward_ms: f64,
    pub backward_ms: f64,
}

/// The backbone's convolution shapes on `cfg`'s global views, distinct, in first-run order, with
/// their counts.
fn distinct_shapes(cfg: &TrainConfig) -> Result<Vec<(ConvShape, usize)>> {
    let map = VarMap::new();
    let backbone = ResNet::new(
        cfg.resnet(),
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
    )?;
    let mut distinct: Vec<(ConvShape, usize)> = Vec::new();
    for shape in backbone.conv_shapes(cfg.data.image_size as usize) {
        match distinct.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, count)) => *count += 1,
            None => distinct.push((shape, 1)),
        }
    }
    Ok(distinct)
}

/// Times each distinct convolution of `cfg`'s backbone on `batch_size * global_views` images:
/// one warm-up call, then the median of `reps` calls of the forward and of the backward.
pub fn time_convs(cfg: &TrainConfig, device: &Device, reps: usize) -> Result<ConvTimes> {
    let n = cfg.data.batch_size * cfg.data.global_views;
    let mut layers = Vec::new();
    for (index, (shape, count)) in distinct_shapes(cfg)?.into_iter().enumerate() {
        let g = shape.geometry;
        let out = g.out(shape.side);
        let input = Tensor::randn(0f32, 1.0, (n, shape.c_in, shape.side, shape.side), device)?;
        // The stem's input is the image, which needs no gradient; every later input does.
        let input_gradient = index > 0;
        let x = if input_gradient {
            Var::from_tensor(&input)?.as_tensor().clone()
        } else {
            input
        };
        let w = (Tensor::randn(0f32, 1.0, (shape.c_out, shape.c_in, g.k, g.k), device)? * 0.1)?;
        let dy = Tensor::randn(0f32, 1.0, (n, shape.c_out, out, out), device)?;
        let forward = || -> Result<()> {
            conv2d(&x, &w, g)?;
            Ok(device.synchronize()?)
        };
        let backward = || -> Result<()> {
            gradients(&x, &w, &dy, g)?;
            Ok(device.synchronize()?)
        };
        layers.push(ConvTime {
            shape,
            count,
            input_gradient,
            forward_ms: median_ms(reps, forward)?,
            backward_ms: median_ms(reps, backward)?,
        });
    }
    let total = |f: fn(&ConvTime) -> f64| layers.iter().map(|l| l.count as f64 * f(l)).sum();
    Ok(ConvTimes {
        images: n,
        forward_ms: total(|l| l.forward_ms),
        backward_ms: total(|l| l.backward_ms),
        layers,
    })
}

/// The median of `reps` timed calls of `run`, after one untimed call.
fn median_ms(reps: usize, run: impl Fn() -> Result<()>) -> Result<f64> {
    run()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(shared::stats::median(times))
}
