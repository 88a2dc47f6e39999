//! The backbone, the masking and the MaskDeep loss.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use trainer::config::{HeadNorm, Level, TrainConfig};
use trainer::method::ema;
use trainer::method::maskdeep::{l2_normalize_rows, Loss, MaskDeep, Views};
use trainer::method::masking::{masked_pool, visible_count, VisibleCells};
use trainer::nn::heads::Mlp;
use trainer::nn::params;
use trainer::nn::resnet::{Depth, ResNet, ResNetConfig};

fn torchvision_keys(arch: &str) -> BTreeMap<String, Vec<usize>> {
    let path = format!(
        "{}/tests/fixtures/{arch}_state_dict.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("num_batches_tracked") && !l.starts_with("fc."))
        .map(|l| {
            let (name, dims) = l.split_once(' ').unwrap();
            let dims = dims.split(',').map(|d| d.parse().unwrap()).collect();
            (name.to_string(), dims)
        })
        .collect()
}

fn backbone_keys(depth: Depth) -> BTreeMap<String, Vec<usize>> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let cfg = ResNetConfig {
        depth,
        small_stem: false,
        width: 1.0,
    };
    ResNet::new(cfg, vb).unwrap();
    // The names files hold (a BatchNorm's packed `affine` split into `weight` and `bias`).
    params::external(&map)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect()
}

#[test]
fn parameter_names_and_shapes_match_torchvision() {
    for (depth, arch) in [
        (Depth::R18, "resnet18"),
        (Depth::R34, "resnet34"),
        (Depth::R50, "resnet50"),
    ] {
        assert_eq!(backbone_keys(depth), torchvision_keys(arch), "{arch}");
    }
}

#[test]
fn files_name_batchnorm_parameters_like_torchvision_and_load_back() {
    let map = VarMap::new();
    let cfg = ResNetConfig {
        depth: Depth::R18,
        small_stem: true,
        width: 0.125,
    };
    ResNet::new(cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).unwrap();
    params::init(&map, 3).unwrap();
    let affine = params::sorted(&map)
        .into_iter()
        .find(|(n, _)| n == "bn1.affine")
        .unwrap()
        .1;
    affine
        .set(
            &Tensor::new(
                &[
                    1f32, 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15., 16.,
                ],
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    let files = params::external(&map).unwrap();
    assert!(files.keys().all(|k| !k.contains("affine")));
    let values = |name: &str| files[name].to_vec1::<f32>().unwrap();
    assert_eq!(values("bn1.weight"), [1., 2., 3., 4., 5., 6., 7., 8.]);
    assert_eq!(values("bn1.bias"), [9., 10., 11., 12., 13., 14., 15., 16.]);
    // Initialised like torchvision's: scale 1, shift 0.
    assert!(values("layer1.0.bn2.weight").iter().all(|&v| v == 1.0));
    assert!(values("layer1.0.bn2.bias").iter().all(|&v| v == 0.0));

    // Through a file into a fresh map: every entry equal.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    params::save(&map, &path).unwrap();
    let fresh = VarMap::new();
    ResNet::new(
        cfg,
        VarBuilder::from_varmap(&fresh, DType::F32, &Device::Cpu),
    )
    .unwrap();
    params::load(&fresh, &path).unwrap();
    for ((name, a), (_, b)) in params::sorted(&map)
        .iter()
        .zip(params::sorted(&fresh).iter())
    {
        let d = (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap();
        let d = d
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }

    // Optimiser buffers are named after their parameter: `X.affine.first` splits the same way.
    let state = std::collections::HashMap::from([(
        "bn1.affine.first".to_string(),
        affine.as_tensor().clone(),
    )]);
    let split = params::to_external(state).unwrap();
    assert_eq!(split["bn1.weight.first"].dims(), [8]);
    let joined = params::to_internal(split).unwrap();
    assert_eq!(joined["bn1.affine.first"].to_vec1::<f32>().unwrap()[8], 9.0);

    // A file that lacks a tensor is refused, naming it.
    let mut partial = params::external(&map).unwrap();
    partial.remove("bn1.bias");
    candle_core::safetensors::save(&partial, &path).unwrap();
    let err = params::load(&fresh, &path).unwrap_err().to_string();
    assert!(err.contains("bn1.affine"), "{err}");
}

fn tiny(preset: &str) -> TrainConfig {
    let mut c = TrainConfig::preset(preset).unwrap();
    c.model.width = 0.125;
    c.data.image_size = 32;
    c.model.proj_hidden = 32;
    c.model.proj_dim = 16;
    c.model.pred_hidden = 32;
    c.data.batch_size = 4;
    c
}

#[test]
fn stage_outputs_have_the_documented_strides_and_channels() {
    let cfg = ResNetConfig {
        depth: Depth::R50,
        small_stem: false,
        width: 0.125,
    };
    let map = VarMap::new();
    let net = ResNet::new(cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).unwrap();
    params::init(&map, 0).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let f = net.forward(&x, true).unwrap();
    let dims: Vec<Vec<usize>> = f.levels.iter().map(|t| t.dims().to_vec()).collect();
    assert_eq!(
        dims,
        vec![vec![2, 64, 8, 8], vec![2, 128, 4, 4], vec![2, 256, 2, 2]]
    );
    assert_eq!(cfg.channels(), [64, 128, 256]);
}

#[test]
fn conv_shapes_list_every_convolution_at_the_size_the_forward_runs_it() {
    for (depth, small_stem, side, convs) in [
        (Depth::R18, false, 64, 20),
        (Depth::R18, true, 32, 20),
        (Depth::R50, false, 64, 53),
    ] {
        let cfg = ResNetConfig {
            depth,
            small_stem,
            width: 0.125,
        };
        let map = VarMap::new();
        let net =
            ResNet::new(cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).unwrap();
        let shapes = net.conv_shapes(side);
        assert_eq!(shapes.len(), convs, "{depth:?}");
        // Every 4-D parameter is a convolution weight, and each shape accounts for one.
        let mut weights: Vec<Vec<usize>> = params::sorted(&map)
            .iter()
            .map(|(_, v)| v.dims().to_vec())
            .filter(|d| d.len() == 4)
            .collect();
        let mut listed: Vec<Vec<usize>> = shapes
            .iter()
            .map(|s| vec![s.c_out, s.c_in, s.geometry.k, s.geometry.k])
            .collect();
        weights.sort();
        listed.sort();
        assert_eq!(listed, weights, "{depth:?}");
        assert_eq!(shapes[0].side, side);
        // The last convolution's output is C5.
        params::init(&map, 0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, side, side), &Device::Cpu).unwrap();
        let c5 = net.forward(&x, true).unwrap().levels[2].dims()[2];
        let last = shapes.last().unwrap();
        assert_eq!(last.geometry.out(last.side), c5);
    }
}

#[test]
fn masks_have_exactly_k_cells_per_view_and_group_and_groups_differ() {
    let seed = 1;
    let m = VisibleCells::sample(
        |r| ChaCha8Rng::seed_from_u64(seed + r as u64),
        6,
        4,
        (7, 7),
        0.25,
    );
    let k = visible_count(0.25, 49);
    assert_eq!(k, 12);
    let sets: Vec<&[bool]> = m.visible.chunks(49).collect();
    assert_eq!(sets.len(), 24);
    for s in &sets {
        assert_eq!(s.iter().filter(|&&v| v).count(), k);
    }
    for row in sets.chunks(4) {
        for a in 0..4 {
            for b in a + 1..4 {
                assert_ne!(row[a], row[b], "two groups drew the same cells");
            }
        }
    }
    assert_eq!(visible_count(0.01, 4), 1);
}

#[test]
fn finer_level_mask_is_the_nearest_upsampled_coarse_mask() {
    let seed = 2;
    let m = VisibleCells::sample(
        |r| ChaCha8Rng::seed_from_u64(seed + r as u64),
        2,
        3,
        (7, 7),
        0.25,
    );
    let c5 = m.pooling_weights((7, 7));
    let c4 = m.pooling_weights((14, 14));
    for row in 0..6 {
        for i in 0..14 {
            for j in 0..14 {
                let coarse = c5[row * 49 + (i / 2) * 7 + j / 2] > 0.0;
                let fine = c4[row * 196 + i * 14 + j] > 0.0;
                assert_eq!(coarse, fine);
            }
        }
        let s: f32 = c4[row * 196..(row + 1) * 196].iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "rows average the visible cells");
    }
}

#[test]
fn coarser_level_cells_weigh_the_visible_share_of_the_grid_cells_they_cover() {
    // An 8x8 mask grid (C4 at 32 px) pooled onto a 4x4 level (C5).
    let m = VisibleCells::sample(
        |r| ChaCha8Rng::seed_from_u64(7 + r as u64),
        2,
        3,
        (8, 8),
        0.25,
    );
    let c5 = m.pooling_weights((4, 4));
    for (row, mask) in m.visible.chunks(64).enumerate() {
        let shares: Vec<f32> = (0..16)
            .map(|cell| {
                let (i, j) = (cell / 4, cell % 4);
                let on = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .filter(|(di, dj)| mask[(2 * i + di) * 8 + 2 * j + dj])
                    .count();
                on as f32 / 4.0
            })
            .collect();
        let total: f32 = shares.iter().sum();
        assert!(
            (total - 4.0).abs() < 1e-6,
            "16 of 64 grid cells are visible"
        );
        for (cell, share) in shares.iter().enumerate() {
            let got = c5[row * 16 + cell];
            assert!(
                (got - share / total).abs() < 1e-6,
                "row {row} cell {cell}: {got}"
            );
        }
    }
}

#[test]
fn masked_pooling_equals_a_loop_over_groups() {
    let dev = Device::Cpu;
    let seed = 3;
    let (n, c, h, w, g) = (3, 5, 4, 4, 4);
    let m = VisibleCells::sample(
        |r| ChaCha8Rng::seed_from_u64(seed + r as u64),
        n,
        g,
        (2, 2),
        0.5,
    );
    let feats = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
    let weights = m.pooling_tensor((h, w), DType::F32, &dev).unwrap();
    let pooled: Vec<f32> = masked_pool(&feats, &weights)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let f: Vec<f32> = feats.flatten_all().unwrap().to_vec1().unwrap();
    for b in 0..n {
        for gi in 0..g {
            let coarse = &m.visible[(b * g + gi) * 4..(b * g + gi + 1) * 4];
            for ch in 0..c {
                let (mut sum, mut count) = (0.0f32, 0);
                for i in 0..h {
                    for j in 0..w {
                        if coarse[(i / 2) * 2 + j / 2] {
                            sum += f[((b * c + ch) * h + i) * w + j];
                            count += 1;
                        }
                    }
                }
                let want = sum / count as f32;
                let got = pooled[(b * g + gi) * c + ch];
                assert!((got - want).abs() < 1e-5, "{got} vs {want}");
            }
        }
    }
}

fn batch(cfg: &TrainConfig, seed: u64) -> Tensor {
    let s = cfg.data.image_size as usize;
    let n = cfg.data.global_views * cfg.data.batch_size;
    let dev = Device::Cpu;
    let values: Vec<f32> = {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * 3 * s * s)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect()
    };
    Tensor::from_vec(values, (n, 3, s, s), &dev).unwrap()
}

/// The model's loss on the global views `x` with masks drawn from `mask_seed`.
fn loss_on(model: &MaskDeep, x: &Tensor, mask_seed: u64) -> Loss {
    let positions: Vec<u64> = (0..model.config().data.batch_size as u64).collect();
    let views = Views {
        global: x,
        local: None,
        positions: &positions,
    };
    let masks = model.sample_masks(mask_seed, &views).unwrap();
    model.loss(&views, &masks, None).unwrap()
}

/// BYOL's loss by hand on the two-view batch `x` (`b` samples a view): GAP(C5) -> projector ->
/// predictor online, GAP(C5) -> projector on the target; loss = mean of 2 - 2 cos(p1, z2) and
/// 2 - 2 cos(p2, z1). With `per_view` each head runs once per view, so that its BatchNorm sees
/// one view's rows at a time. The BatchNorm statistics depend on the batch, so the networks run
/// on the same batch as the loss under test.
fn byol_by_hand(model: &MaskDeep, x: &Tensor, b: usize, per_view: bool) -> f32 {
    let head = |mlp: &Mlp, input: &Tensor| -> Tensor {
        if per_view {
            let halves = [0, b].map(|at| mlp.forward(&input.narrow(0, at, b).unwrap(), true, 1));
            Tensor::cat(&halves.map(|h| h.unwrap()), 0).unwrap()
        } else {
            mlp.forward(input, true, 1).unwrap()
        }
    };
    let online = model.online.backbone.forward(x, true).unwrap();
    let pooled = online.levels[2].mean((2, 3)).unwrap();
    let p = head(
        &model.predictors[0],
        &head(&model.online.projectors[0], &pooled),
    );
    let t = model.target.backbone.forward(x, true).unwrap();
    let z = head(
        &model.target.projectors[0],
        &t.levels[2].mean((2, 3)).unwrap(),
    );
    let cos = |a: &Tensor, b: &Tensor| -> Vec<f32> {
        let a = l2_normalize_rows(a).unwrap();
        let b = l2_normalize_rows(b).unwrap();
        (a * b).unwrap().sum(1).unwrap().to_vec1().unwrap()
    };
    let c12 = cos(&p.narrow(0, 0, b).unwrap(), &z.narrow(0, b, b).unwrap());
    let c21 = cos(&p.narrow(0, b, b).unwrap(), &z.narrow(0, 0, b).unwrap());
    c12.iter().chain(&c21).map(|c| 2.0 - 2.0 * c).sum::<f32>() / (2 * b) as f32
}

#[test]
fn byol_preset_loss_equals_an_independent_byol_loss() {
    let cfg = tiny("byol-r18-small");
    let model = MaskDeep::new(&cfg, &Device::Cpu).unwrap();
    let x = batch(&cfg, 5);
    let loss: f32 = loss_on(&model, &x, 0).total.to_scalar().unwrap();
    let byol = byol_by_hand(&model, &x, cfg.data.batch_size, false);
    assert!((loss - byol).abs() < 1e-5, "{loss} vs {byol}");
}

#[test]
fn bf16_on_the_cpu_is_refused_with_the_fix() {
    let mut cfg = tiny("maskdeep-r18-small");
    cfg.model.bf16 = true;
    let err = MaskDeep::new(&cfg, &Device::Cpu).err().expect("refused");
    let message = err.to_string();
    assert!(message.contains("bf16=false"), "{message}");
}

#[test]
fn per_view_head_batch_norm_equals_heads_run_once_per_view() {
    let mut cfg = tiny("byol-r18-small");
    cfg.method.head_bn = HeadNorm::PerView;
    let model = MaskDeep::new(&cfg, &Device::Cpu).unwrap();
    let x = batch(&cfg, 5);
    let loss: f32 = loss_on(&model, &x, 0).total.to_scalar().unwrap();
    let b = cfg.data.batch_size;
    let per_view = byol_by_hand(&model, &x, b, true);
    assert!((loss - per_view).abs() < 1e-5, "{loss} vs {per_view}");
    // And the statistics really are per view: the joint computation gives another loss.
    let joint = byol_by_hand(&model, &x, b, false);
    assert!((loss - joint).abs() > 1e-4, "{loss} vs joint {joint}");
}

#[test]
fn every_trainable_parameter_gets_a_gradient_and_the_target_none() {
    let mut cfg = tiny("maskdeep-r18-small");
    cfg.method.levels = vec![Level::C3, Level::C4, Level::C5];
    cfg.method.level_weights = vec![1.0, 1.0, 1.0];
    let model = MaskDeep::new(&cfg, &Device::Cpu).unwrap();
    let x = batch(&cfg, 6);
    let grads = loss_on(&model, &x, 0).total.backward().unwrap();
    for (name, var) in params::trainable(&model.online_vars) {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm.is_finite(), "{name}");
    }
    for (name, var) in params::sorted(&model.target_vars) {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "target {name} got a gradient"
        );
    }
}

#[test]
fn ema_update_follows_its_formula() {
    let cfg = tiny("maskdeep-r18-small");
    let model = MaskDeep::new(&cfg, &Device::Cpu).unwrap();
    // Move the online weights away from the target's, then blend.
    params::init(&model.online_vars, 99).unwrap();
    let before: Vec<(String, Vec<f32>)> = params::trainable(&model.target_vars)
        .iter()
        .map(|(n, v)| (n.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    ema::update(&model.online_vars, &model.target_vars, 0.9).unwrap();
    let online = model.online_vars.data().lock().unwrap();
    for ((name, old), (_, new)) in before.iter().zip(params::trainable(&model.target_vars)) {
        let o: Vec<f32> = online[name].flatten_all().unwrap().to_vec1().unwrap();
        let new: Vec<f32> = new.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..old.len() {
            let want = 0.9 * old[i] + 0.1 * o[i];
            assert!((new[i] - want).abs() < 1e-6, "{name}[{i}]");
        }
    }
}

#[test]
fn the_loss_decreases_when_training_on_a_tiny_fixed_batch() {
    use trainer::train::optim::{Optimizer, Rule};
    use trainer::train::step::{Rates, TrainStep};
    let cfg = tiny("maskdeep-r18-small");
    let model = MaskDeep::new(&cfg, &Device::Cpu).unwrap();
    let opt = Optimizer::new(Rule::Sgd, params::trainable(&model.online_vars), 0.9, 0.0).unwrap();
    let mut trainer = TrainStep::new(model, opt);
    let x = batch(&cfg, 8);
    let positions: Vec<u64> = (0..cfg.data.batch_size as u64).collect();
    let views = Views {
        global: &x,
        local: None,
        positions: &positions,
    };
    let rates = Rates {
        lr: 0.05,
        tau: 0.99,
    };
    let mut losses = Vec::new();
    for step in 0..15 {
        let loss = trainer
            .run(std::slice::from_ref(&views), step, rates, None)
            .unwrap()
            .total;
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    let first: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = losses[12..].iter().sum::<f32>() / 3.0;
    assert!(last < 0.8 * first, "loss {first} -> {last}: {losses:?}");
}

#[test]
fn a_step_case_holds_the_weights_views_cells_losses_and_gradients() {
    let cfg = tiny("maskdeep-r18-small");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.safetensors");
    let summary = trainer::diag::step_case::write(&cfg, 5, &path).unwrap();
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let scalar = |k: &str| t[k].to_vec1::<f32>().unwrap()[0];
    let weighted: f32 = cfg
        .method
        .levels
        .iter()
        .zip(&cfg.method.level_weights)
        .map(|(l, w)| *w as f32 * scalar(&format!("loss.{}", l.name())))
        .sum();
    assert!((weighted - scalar("loss.total")).abs() < 1e-6);
    assert_eq!(summary.total, scalar("loss.total"));
    let n = cfg.data.global_views * cfg.data.batch_size;
    let s = cfg.data.image_size as usize;
    assert_eq!(t["views"].dims(), &[n, 3, s, s]);
    // Every (view, sample, group) sees exactly K cells of the coarsest level's grid.
    let visible = t["visible"].to_dtype(DType::F32).unwrap();
    let (rows, groups, cells) = visible.dims3().unwrap();
    assert_eq!((rows, groups), (n, cfg.method.groups));
    let k = visible_count(cfg.method.visible_ratio, cells) as f32;
    let per_row: Vec<f32> = visible
        .sum(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(per_row.iter().all(|&c| c == k), "{per_row:?}");
    // Both branches' weights and a gradient for every trainable online parameter, under the
    // names files use (PyTorch's).
    let model = MaskDeep::new(&cfg, &Device::Cpu).unwrap();
    for (name, _) in params::external(&model.online_vars).unwrap() {
        assert!(t.contains_key(&format!("online.{name}")), "{name}");
        if !params::is_buffer(&name) {
            assert!(t.contains_key(&format!("grad.{name}")), "{name}");
        }
    }
    for (name, _) in params::external(&model.target_vars).unwrap() {
        assert!(t.contains_key(&format!("target.{name}")), "{name}");
    }
}
