//! Each augmentation against its torchvision reference (tools/make_augment_fixtures.py), within a
//! stated tolerance: (largest per-channel difference, mean absolute difference).

use shared::augment::*;
use shared::cpu::Isa;
use shared::decode::RgbRef;
use shared::resize::Filter;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> (u32, u32, Vec<u8>) {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/augment")
        .join(format!("{name}.png"));
    let img = image::open(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run tools/make_augment_fixtures.py)",
                path.display()
            )
        })
        .to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

fn check(name: &str, got: &[u8], max_ok: u8, mean_ok: f64) {
    let (_, _, want) = fixture(name);
    assert_eq!(got.len(), want.len(), "{name}: size");
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    let mean = got
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .sum::<f64>()
        / got.len() as f64;
    eprintln!("{name}: max {max}, mean {mean:.4}");
    assert!(
        max <= max_ok && mean <= mean_ok,
        "{name}: max diff {max} (ok {max_ok}), mean {mean:.4} (ok {mean_ok})"
    );
}

/// `f` applied to the input fixture with every instruction set this CPU has: each must give the
/// portable copy's bytes exactly. Returns those bytes.
fn with_input(f: impl Fn(Isa, &mut Vec<u8>, u32, u32)) -> Vec<u8> {
    let (w, h, input) = fixture("input");
    let run = |isa| {
        let mut px = input.clone();
        f(isa, &mut px, w, h);
        px
    };
    let portable = run(Isa::PORTABLE);
    for isa in Isa::supported() {
        assert!(
            run(isa) == portable,
            "{isa} differs from the portable kernel"
        );
    }
    portable
}

#[test]
fn colour_ops_match_torchvision_pil_path() {
    // Pillow blends in float and truncates, as we do: exact up to float rounding at .0 boundaries.
    for f in [1.3f32, 0.7] {
        check(
            &format!("brightness_{f}"),
            &with_input(|isa, p, _, _| adjust_brightness(isa, p, f)),
            1,
            0.01,
        );
    }
    for f in [1.4f32, 0.6] {
        check(
            &format!("contrast_{f}"),
            &with_input(|isa, p, _, _| adjust_contrast(isa, p, f)),
            1,
            0.01,
        );
    }
    for f in [1.2f32, 0.8] {
        check(
            &format!("saturation_{f}"),
            &with_input(|isa, p, _, _| adjust_saturation(isa, p, f)),
            1,
            0.01,
        );
    }
    check(
        "grayscale",
        &with_input(|isa, p, _, _| grayscale(isa, p)),
        0,
        0.0,
    );
    check(
        "solarize_128",
        &with_input(|isa, p, _, _| solarize(isa, p, 128)),
        0,
        0.0,
    );
    check("hflip", &with_input(|_, p, w, _| hflip(p, w)), 0, 0.0);
}

#[test]
fn hue_matches_within_pillows_8_bit_hsv_quantisation() {
    // torchvision's PIL path rounds hue, saturation and value to 8 bits; ours stays in float
    // (as torchvision's tensor path does), so small differences are expected.
    for f in [0.1f32, -0.07] {
        check(
            &format!("hue_{f}"),
            &with_input(|isa, p, _, _| adjust_hue(isa, p, f)),
            6,
            1.0,
        );
    }
}

#[test]
fn blur_matches_torchvision_kernel() {
    for (k, s) in [(9usize, 1.5f32), (23, 0.4)] {
        let out = with_input(|isa, p, w, h| {
            gaussian_blur(isa, p, w, h, k, s, &mut BlurScratch::default())
        });
        check(&format!("blur_{k}_{s}"), &out, 1, 0.01);
    }
}

#[test]
fn fused_crop_resize_matches_pil_crop_then_bicubic_resize() {
    let (w, h, px) = fixture("input");
    let crop = CropBox {
        top: 10,
        left: 20,
        height: 50,
        width: 60,
    };
    let mut out = Vec::new();
    let src = RgbRef {
        width: w,
        height: h,
        pixels: &px,
    };
    crop_resize(
        &mut Default::default(),
        src,
        crop,
        32,
        Filter::Bicubic,
        &mut out,
    )
    .unwrap();
    // The fused crop lets the filter read source pixels just outside the box at its edges, where
    // PIL's crop-then-resize clamps to the box: the edge rows differ a little, the inside matches.
    check("crop_10_20_50_60_to_32", &out, 12, 0.3);
}
