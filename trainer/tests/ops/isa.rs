//! Each CPU kernel, compiled for every instruction set this CPU has (`shared::cpu::Isa`), gives
//! exactly the bits of its portable copy: none of them lets the compiler reorder a sum. The one
//! exception is the AVX-512 direct convolution, which sums in its own order: it agrees within
//! rounding. On an
//! AVX-512 machine this covers portable, AVX2 and AVX-512; the environment variable
//! `MASKDEEP_ISA` is checked end to end in the workspace's binary tests.

use candle_core::{CpuStorage, Layout, Result, Shape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::cpu::Isa;
use trainer::ops::conv::Geometry;
use trainer::ops::update::{AdamStep, Blend, Momentum};
use trainer::ops::{batch_norm, conv, max_pool, update};

/// Uniform values in [-1, 1) from a fixed seed.
fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// A contiguous f32 CPU tensor of `dims` filled with [`noise`].
fn tensor(dims: &[usize], seed: u64) -> (CpuStorage, Layout) {
    let shape = Shape::from(dims);
    let data = noise(shape.elem_count(), seed);
    (CpuStorage::F32(data), Layout::contiguous(shape))
}

fn values(out: Result<(CpuStorage, Shape)>) -> Vec<f32> {
    match out.unwrap().0 {
        CpuStorage::F32(v) => v,
        _ => panic!("expected an f32 output"),
    }
}

/// Runs `kernel` with every instruction set this CPU has and checks each result against the
/// portable one, bit for bit.
fn same_on_every_isa(what: &str, kernel: impl Fn(Isa) -> Vec<f32>) {
    let want = kernel(Isa::PORTABLE);
    assert!(!want.is_empty(), "{what}: empty output");
    for isa in Isa::supported() {
        same_bits(
            &kernel(isa),
            &want,
            &format!("{what} on {isa} against portable"),
        );
    }
}

#[test]
fn convolution_kernels_give_the_same_bits_on_every_isa() {
    // (input side, kernel, stride, padding, output channels): narrow outputs (patches a pixel
    // per row), same-size planes, strided wide planes, pointwise, the stem's 7x7, and layers with
    // enough output channels that the patches are gathered a channel per row on narrow and wide
    // planes and the weight gradient reads them untransposed.
    for (side, k, stride, padding, c_out) in [
        (8, 3, 1, 1, 5),
        (7, 3, 2, 1, 5),
        (20, 3, 1, 1, 5),
        (34, 3, 2, 1, 5),
        (9, 1, 1, 0, 5),
        (10, 1, 2, 0, 5),
        (40, 7, 2, 3, 5),
        (4, 3, 1, 1, 512),
        (16, 3, 1, 1, 512),
    ] {
        let g = Geometry { k, stride, padding };
        let (n, c_in) = (7, 3);
        let (ho, wo) = (g.out(side), g.out(side));
        let x = tensor(&[n, c_in, side, side], 1);
        let w = tensor(&[c_out, c_in, k, k], 2);
        let dy = tensor(&[n, c_out, ho, wo], 3);
        let what = format!("conv {side} px, {k}x{k} stride {stride}, {c_out} outputs");
        same_on_every_isa(&format!("{what} forward"), |isa| {
            values(conv::cpu::forward(isa, &x.0, &x.1, &w.0, &w.1, g))
        });
        same_on_every_isa(&format!("{what} backward"), |isa| {
            let (x, w, dy) = ((&x.0, &x.1), (&w.0, &w.1), (&dy.0, &dy.1));
            values(conv::cpu::backward(isa, x, w, dy, g, true))
        });
    }
}

#[test]
fn direct_convolution_agrees_with_the_portable_path_within_rounding() {
    // Layers with output channels in multiples of 16 run, on AVX2 and AVX-512, as a direct
    // convolution that sums in another order than portable's im2col + gemm: equal within 1e-5
    // of the largest value, not to the bit; and the same bits on both sets. The forward of
    // each, the input gradient of the stride-1 ones, and the weight gradient of each when no
    // input gradient is asked for (with one, a stride-2 layer's comes from the patches).
    // (side, stride, images, input channels, output channels): image tiles (multiples of 64
    // outputs on small planes), row tiles of 32, 16 and 64 outputs on rows split into tiles of
    // several lengths, more images than one weight-gradient task takes, and planes of 2 and 1
    // pixels, where most taps fall outside.
    for (side, stride, n, c_in, c_out) in [
        (4, 1, 13, 64, 128),
        (9, 2, 13, 64, 128),
        (19, 1, 5, 32, 32),
        (33, 2, 3, 16, 32),
        (35, 1, 3, 16, 48),
        (17, 1, 3, 16, 64),
        (6, 1, 37, 16, 16),
        (2, 2, 5, 64, 64),
        (1, 1, 3, 16, 64),
    ] {
        let g = Geometry {
            k: 3,
            stride,
            padding: 1,
        };
        let out = g.out(side);
        let x = tensor(&[n, c_in, side, side], 12);
        let w = tensor(&[c_out, c_in, 3, 3], 13);
        let dy = tensor(&[n, c_out, out, out], 14);
        let forward = |isa| values(conv::cpu::forward(isa, &x.0, &x.1, &w.0, &w.1, g));
        let backward = |isa, need_dx| {
            let (x, w, dy) = ((&x.0, &x.1), (&w.0, &w.1), (&dy.0, &dy.1));
            values(conv::cpu::backward(isa, x, w, dy, g, need_dx))
        };
        let what = format!("{side} px, stride {stride}, {c_in} -> {c_out} channels");
        same_on_direct_sets(&format!("{what} forward"), forward);
        for need_dx in [true, false] {
            let what = format!("{what}, backward with dx {need_dx}");
            same_on_direct_sets(&what, |isa| backward(isa, need_dx));
        }
    }
}

/// Runs `kernel` on the portable path and on every set with direct kernels (AVX2, AVX-512):
/// each direct result within rounding of portable's, and all of them the same bits.
fn same_on_direct_sets(what: &str, kernel: impl Fn(Isa) -> Vec<f32>) {
    let want = kernel(Isa::PORTABLE);
    let mut narrowest: Option<Vec<f32>> = None;
    for isa in Isa::supported() {
        if !(isa.is_avx2() || isa.is_avx512()) {
            continue;
        }
        let got = kernel(isa);
        close(&got, &want, &format!("{what} on {isa}"));
        match &narrowest {
            Some(first) => same_bits(&got, first, &format!("{what} on {isa} against AVX2")),
            None => narrowest = Some(got),
        }
    }
}

/// Asserts that `got` and `want` hold the same bits.
fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert_eq!(first_diff, None, "{what}: first differing value");
}

/// Asserts that `got` equals `want` within 1e-5 of `want`'s largest magnitude.
fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-5 * scale, "{what}: off by {worst} of {scale}");
}

#[test]
fn batch_norm_kernels_give_the_same_bits_on_every_isa() {
    let (n, c, side) = (5, 3, 7);
    let dims = [n, c, side, side];
    let x = tensor(&dims, 4);
    let dy = tensor(&dims, 5);
    let residual = tensor(&dims, 6);
    // [weight, bias, mean, var], variances positive.
    let mut p = noise(4 * c, 7);
    p[3 * c..].iter_mut().for_each(|v| *v = v.abs() + 0.1);
    let params = (CpuStorage::F32(p), Layout::contiguous(4 * c));
    same_on_every_isa("batch-norm stats", |isa| {
        values(batch_norm::cpu::stats(isa, &x.0, &x.1, None))
    });
    for relu in [false, true] {
        let forward = |isa| {
            let r = Some((&residual.0, &residual.1));
            batch_norm::cpu::forward(isa, (&x.0, &x.1), (&params.0, &params.1), r, relu)
        };
        same_on_every_isa(&format!("batch-norm forward, relu {relu}"), |isa| {
            values(forward(isa))
        });
        let (y, _) = forward(Isa::PORTABLE).unwrap();
        let y = (y, x.1.clone());
        same_on_every_isa(&format!("batch-norm backward, relu {relu}"), |isa| {
            values(batch_norm::cpu::backward(
                isa,
                (&x.0, &x.1),
                (&dy.0, &dy.1),
                (&y.0, &y.1),
                (&params.0, &params.1),
                relu,
                true,
                None,
            ))
        });
    }
}

#[test]
fn max_pool_kernel_gives_the_same_bits_on_every_isa() {
    for side in [5, 8, 33] {
        let x = tensor(&[3, 4, side, side], 8);
        same_on_every_isa(&format!("max-pool {side} px"), |isa| {
            values(max_pool::cpu::forward(isa, &x.0, &x.1))
        });
    }
}

#[test]
fn update_kernels_give_the_same_bits_on_every_isa() {
    // Longer than one parallel chunk, and not a multiple of any vector width.
    let len = (1 << 15) + 1234;
    let (w, g, v) = (noise(len, 9), noise(len, 10), noise(len, 11));
    let v: Vec<f32> = v.iter().map(|x| x * x).collect();
    same_on_every_isa("EMA blend", |isa| {
        let mut dst = w.clone();
        let op = Blend {
            keep: 0.99,
            take: 0.01,
            square: false,
        };
        update::cpu::blend(isa, &op, &mut dst, &g);
        dst
    });
    for trust in [None, Some(0.001)] {
        same_on_every_isa(&format!("momentum, trust {trust:?}"), |isa| {
            let mut m = v.clone();
            let op = Momentum {
                momentum: 0.9,
                decay: 1e-4,
                trust,
            };
            update::cpu::momentum(isa, &op, &mut m, &w, &g);
            m
        });
    }
    same_on_every_isa("AdamW step", |isa| {
        let mut dst = w.clone();
        let op = AdamStep {
            lr: 1e-3,
            decay: 0.05,
            corrections: (0.1, 0.01),
            eps: 1e-8,
        };
        update::cpu::adam_step(isa, &op, &mut dst, &g, &v);
        dst
    });
}
