//! kNN and the linear probe where the answer is known.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::eval::features::LabelledFeatures;
use trainer::eval::knn::knn;
use trainer::eval::linear::linear_probe;
use trainer::method::maskdeep::l2_normalize_rows;

/// `per_class` points per class around the class's own axis (separable when `noise` is small),
/// or pure noise when `informative` is false.
fn features(
    classes: usize,
    per_class: usize,
    noise: f32,
    informative: bool,
    seed: u64,
) -> LabelledFeatures {
    let dim = 16;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Vec::new();
    let mut labels = Vec::new();
    for c in 0..classes {
        for _ in 0..per_class {
            for d in 0..dim {
                let signal = if informative && d == c { 1.0 } else { 0.0 };
                x.push(signal + noise * rng.random_range(-1.0f32..1.0));
            }
            labels.push(c as u32);
        }
    }
    let x = Tensor::from_vec(x, (classes * per_class, dim), &Device::Cpu).unwrap();
    LabelledFeatures {
        x: l2_normalize_rows(&x).unwrap(),
        labels,
        classes,
    }
}

#[test]
fn separable_features_score_100_percent() {
    let train = features(5, 20, 0.1, true, 1);
    let val = features(5, 10, 0.1, true, 2);
    let acc = knn(&train, &val, 20, 0.07).unwrap();
    assert_eq!((acc.top1, acc.top5), (100.0, 100.0));
    let acc = linear_probe(&train, &val, 30, 1.0, 0).unwrap();
    assert_eq!(acc.top1, 100.0);
}

#[test]
fn uninformative_features_score_near_chance() {
    let train = features(10, 30, 1.0, false, 3);
    let val = features(10, 30, 1.0, false, 4);
    let acc = knn(&train, &val, 20, 0.07).unwrap();
    assert!(acc.top1 < 25.0, "{acc:?}");
    assert!(acc.top5 > 30.0 && acc.top5 < 70.0, "{acc:?}");
}

#[test]
fn the_nearest_neighbour_decides_with_k_1() {
    // Train: class 0 at +x, class 1 at +y; val points lean towards one or the other.
    let dev = Device::Cpu;
    let train = LabelledFeatures {
        x: Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap(),
        labels: vec![0, 1],
        classes: 2,
    };
    let val = LabelledFeatures {
        x: l2_normalize_rows(&Tensor::new(&[[0.9f32, 0.1], [0.2, 0.8]], &dev).unwrap()).unwrap(),
        labels: vec![0, 0],
        classes: 2,
    };
    let acc = knn(&train, &val, 1, 0.07).unwrap();
    assert_eq!(acc.top1, 50.0);
    assert_eq!(acc.top5, 100.0);
}
