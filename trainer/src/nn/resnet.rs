//! ResNet-18/34/50 with torchvision's structure and parameter names, returning the C3, C4 and C5
//! stage outputs. Knobs: a small-image stem (3x3 conv, stride 1, no max-pool) and a width multiplier.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::batch_norm::BatchNorm;
use crate::nn::conv::Conv;
use crate::ops::conv::Geometry;
use crate::ops::max_pool::max_pool_3x3_s2;

/// The ImageNet stem's max-pool window ([`max_pool_3x3_s2`]).
const MAX_POOL: Geometry = Geometry {
    k: 3,
    stride: 2,
    padding: 1,
};

/// Which ResNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Depth {
    #[serde(rename = "resnet18")]
    R18,
    #[serde(rename = "resnet34")]
    R34,
    #[serde(rename = "resnet50")]
    R50,
}

impl Depth {
    /// Parses `resnet18`, `resnet34` or `resnet50` (also `18`, `34`, `50`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim_start_matches("resnet") {
            "18" => Some(Depth::R18),
            "34" => Some(Depth::R34),
            "50" => Some(Depth::R50),
            _ => None,
        }
    }

    /// torchvision's name of this architecture.
    pub fn name(self) -> &'static str {
        match self {
            Depth::R18 => "resnet18",
            Depth::R34 => "resnet34",
            Depth::R50 => "resnet50",
        }
    }

    fn blocks(self) -> [usize; 4] {
        match self {
            Depth::R18 => [2, 2, 2, 2],
            Depth::R34 | Depth::R50 => [3, 4, 6, 3],
        }
    }

    fn bottleneck(self) -> bool {
        self == Depth::R50
    }
}

/// The shape of a backbone.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub depth: Depth,
    /// 3x3 stride-1 stem without max-pool, for 32-96 px images.
    pub small_stem: bool,
    /// Multiplies every stage's width (1.0 = torchvision's widths).
    pub width: f64,
}

impl ResNetConfig {
    /// Width of stage `i` (0..4) before the bottleneck expansion.
    fn stage_width(&self, i: usize) -> usize {
        ((64 << i) as f64 * self.width).round().max(1.0) as usize
    }

    fn expansion(&self) -> usize {
        if self.depth.bottleneck() {
            4
        } else {
            1
        }
    }

    /// Channels of C3, C4 and C5.
    pub fn channels(&self) -> [usize; 3] {
        [1, 2, 3].map(|i| self.stage_width(i) * self.expansion())
    }

    /// Total stride of C3, C4 and C5 relative to the input.
    pub fn strides(&self) -> [usize; 3] {
        if self.small_stem {
            [2, 4, 8]
        } else {
            [8, 16, 32]
        }
    }
}

/// One convolution of a backbone as its forward runs it on square images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConvShape {
    pub c_in: usize,
    /// Side of the (square) input in pixels.
    pub side: usize,
    pub c_out: usize,
    #[serde(flatten)]
    pub geometry: Geometry,
}

/// Conv followed by BatchNorm, as torchvision names them (`convN`, `bnN`).
struct ConvBn {
    conv: Conv,
    bn: BatchNorm,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: &VarBuilder,
        conv: &str,
        bn: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv::new(vb.pp(conv), c_in, c_out, k, stride, padding)?,
            bn: BatchNorm::new(vb.pp(bn), c_out)?,
        })
    }

    /// The convolution's shape on a `side`-pixel input.
    fn shape(&self, side: usize) -> ConvShape {
        let (c_out, c_in) = self.conv.channels();
        ConvShape {
            c_in,
            side,
            c_out,
            geometry: self.conv.geometry(),
        }
    }

    /// Convolution, BatchNorm, `residual` added when given and, when `relu`, a ReLU.
    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        match residual {
            None => self.bn.forward_conv(&self.conv, x, train, relu),
            Some(_) => self
                .bn
                .forward(&self.conv.forward(x)?, train, relu, residual),
        }
    }
}

/// A residual block: basic (two 3x3) or bottleneck (1x1, 3x3, 1x1), with an optional projection.
struct Block {
    layers: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        vb: VarBuilder,
        bottleneck: bool,
        c_in: usize,
        width: usize,
        stride: usize,
    ) -> Result<Self> {
        let (layers, c_out) = if bottleneck {
            let c_out = width * 4;
            let layers = vec![
                ConvBn::new(&vb, "conv1", "bn1", c_in, width, 1, 1, 0)?,
                ConvBn::new(&vb, "conv2", "bn2", width, width, 3, stride, 1)?,
                ConvBn::new(&vb, "conv3", "bn3", width, c_out, 1, 1, 0)?,
            ];
            (layers, c_out)
        } else {
            let layers = vec![
                ConvBn::new(&vb, "conv1", "bn1", c_in, width, 3, stride, 1)?,
                ConvBn::new(&vb, "conv2", "bn2", width, width, 3, 1, 1)?,
            ];
            (layers, width)
        };
        let downsample = if stride != 1 || c_in != c_out {
            Some(ConvBn::new(
                &vb.pp("downsample"),
                "0",
                "1",
                c_in,
                c_out,
                1,
                stride,
                0,
            )?)
        } else {
            None
        };
        Ok(Block { layers, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, train, false, None)?,
            None => x.clone(),
        };
        let (last, inner) = self.layers.split_last().expect("blocks have layers");
        let mut y = x.clone();
        for layer in inner {
            y = layer.forward(&y, train, true, None)?;
        }
        // The last BatchNorm takes the shortcut and the ReLU.
        last.forward(&y, train, true, Some(&shortcut))
    }
}

/// The backbone.
pub struct ResNet {
    config: ResNetConfig,
    stem: ConvBn,
    stages: [Vec<Block>; 4],
}

/// The stage outputs a backbone returns.
pub struct StageOutputs {
    /// C3, C4, C5 (strides 8, 16, 32 with the ImageNet stem).
    pub levels: [Tensor; 3],
}

impl ResNet {
    /// Builds the backbone under `vb` (parameters named as in torchvision).
    pub fn new(config: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let stem_width = config.stage_width(0);
        let stem = if config.small_stem {
            ConvBn::new(&vb, "conv1", "bn1", 3, stem_width, 3, 1, 1)?
        } else {
            ConvBn::new(&vb, "conv1", "bn1", 3, stem_width, 7, 2, 3)?
        };
        let mut c_in = stem_width;
        let blocks = config.depth.blocks();
        let stage = |i: usize, c_in: &mut usize| -> Result<Vec<Block>> {
            let width = config.stage_width(i);
            let vb = vb.pp(format!("layer{}", i + 1));
            (0..blocks[i])
                .map(|b| {
                    let stride = if b == 0 && i > 0 { 2 } else { 1 };
                    let block = Block::new(
                        vb.pp(b.to_string()),
                        config.depth.bottleneck(),
                        *c_in,
                        width,
                        stride,
                    )?;
                    *c_in = width * config.expansion();
                    Ok(block)
                })
                .collect()
        };
        let stages = [
            stage(0, &mut c_in)?,
            stage(1, &mut c_in)?,
            stage(2, &mut c_in)?,
            stage(3, &mut c_in)?,
        ];
        Ok(ResNet {
            config,
            stem,
            stages,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Runs the backbone on normalised `[batch, 3, H, W]` images; BatchNorm uses batch statistics
    /// (and updates its running statistics) when `train`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<StageOutputs> {
        let mut x = self.stem.forward(x, train, true, None)?;
        if !self.config.small_stem {
            x = max_pool_3x3_s2(&x)?;
        }
        let mut levels = Vec::with_capacity(3);
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(&x, train)?;
            }
            if i > 0 {
                levels.push(x.clone());
            }
        }
        let levels: [Tensor; 3] = levels.try_into().expect("three stages after the first");
        Ok(StageOutputs { levels })
    }

    /// Every convolution's shape, in the order the forward runs them, on `side`-pixel images.
    pub fn conv_shapes(&self, side: usize) -> Vec<ConvShape> {
        let mut shapes = vec![self.stem.shape(side)];
        let mut side = self.stem.conv.geometry().out(side);
        if !self.config.small_stem {
            side = MAX_POOL.out(side);
        }
        for block in self.stages.iter().flatten() {
            if let Some(d) = &block.downsample {
                shapes.push(d.shape(side));
            }
            for layer in &block.layers {
                shapes.push(layer.shape(side));
                side = layer.conv.geometry().out(side);
            }
        }
        shapes
    }

    /// Global-average-pooled C5: the representation that probes and export use.
    pub fn embed(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let [_, _, c5] = self.forward(x, train)?.levels;
        c5.mean((2, 3))
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.embed(x, false)
    }
}
