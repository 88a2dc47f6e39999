//! kNN, the linear probe and feature files where the answer is known.

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::eval::cache::{self, Header, Precision};
use trainer::eval::features::{per_class_subset, LabelledFeatures, Origin, PREPROCESSING};
use trainer::eval::knn::{knn, neighbours, vote, Tiling};
use trainer::eval::linear::sweep;

fn origin() -> Origin {
    Origin {
        backbone: "test backbone".into(),
        fingerprint: 7,
        image_size: 32,
    }
}

fn class_names(classes: usize) -> Vec<String> {
    (0..classes).map(|c| format!("class{c}")).collect()
}

/// L2-normalises each `dim`-wide row of `x` in place.
fn normalise(x: &mut [f32], dim: usize) {
    for row in x.chunks_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

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
    normalise(&mut x, dim);
    LabelledFeatures::from_vec(x, dim, labels, class_names(classes), origin()).unwrap()
}

#[test]
fn separable_features_score_100_percent() {
    let train = features(5, 20, 0.1, true, 1);
    let val = features(5, 10, 0.1, true, 2);
    let acc = knn(&train, &val, &[20], 0.07, &Device::Cpu, &mut |_, _| {}).unwrap()[0];
    assert_eq!((acc.top1, acc.top5), (100.0, 100.0));
    let probes = sweep(&train, &val, 30, &[0.1, 1.0], 0).unwrap();
    assert_eq!(probes.len(), 2);
    for (probe, acc) in &probes {
        assert_eq!(acc.top1, 100.0, "lr {}", probe.lr);
    }
    // Each head follows its own rate: one that barely moves stays below the others.
    let probes = sweep(&train, &val, 2, &[1e-6, 1.0], 0).unwrap();
    assert!(
        probes[0].1.top1 < probes[1].1.top1,
        "{:?}",
        probes.iter().map(|p| p.1).collect::<Vec<_>>()
    );
}

#[test]
fn uninformative_features_score_near_chance() {
    let train = features(10, 30, 1.0, false, 3);
    let val = features(10, 30, 1.0, false, 4);
    let acc = knn(&train, &val, &[20], 0.07, &Device::Cpu, &mut |_, _| {}).unwrap()[0];
    assert!(acc.top1 < 25.0, "{acc:?}");
    assert!(acc.top5 > 30.0 && acc.top5 < 70.0, "{acc:?}");
}

#[test]
fn the_nearest_neighbour_decides_with_k_1() {
    // Train: class 0 at +x, class 1 at +y; val points lean towards one or the other.
    let train = LabelledFeatures::from_vec(
        vec![1., 0., 0., 1.],
        2,
        vec![0, 1],
        class_names(2),
        origin(),
    )
    .unwrap();
    let mut v = vec![0.9f32, 0.1, 0.2, 0.8];
    normalise(&mut v, 2);
    let val = LabelledFeatures::from_vec(v, 2, vec![0, 0], class_names(2), origin()).unwrap();
    let acc = knn(&train, &val, &[1], 0.07, &Device::Cpu, &mut |_, _| {}).unwrap()[0];
    assert_eq!(acc.top1, 50.0);
    assert_eq!(acc.top5, 100.0);
}

/// Random unit rows with random labels.
fn random_features(n: usize, dim: usize, classes: usize, seed: u64) -> LabelledFeatures {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    normalise(&mut x, dim);
    let labels = (0..n)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    LabelledFeatures::from_vec(x, dim, labels, class_names(classes), origin()).unwrap()
}

/// The dense reference: every similarity in f64, fully sorted (ties to the lower index).
fn dense_neighbours(train: &LabelledFeatures, val: &LabelledFeatures, k: usize) -> Vec<Vec<u32>> {
    let (t, v, dim) = (
        train.block(0..train.len()),
        val.block(0..val.len()),
        val.dim(),
    );
    (0..val.len())
        .map(|i| {
            let sims: Vec<f64> = (0..train.len())
                .map(|j| {
                    (0..dim)
                        .map(|d| v[i * dim + d] as f64 * t[j * dim + d] as f64)
                        .sum()
                })
                .collect();
            let mut order: Vec<u32> = (0..train.len() as u32).collect();
            order.sort_by(|&a, &b| {
                sims[b as usize]
                    .total_cmp(&sims[a as usize])
                    .then(a.cmp(&b))
            });
            order.truncate(k);
            order
        })
        .collect()
}

/// Top-1 and top-5 of the dense reference's weighted votes.
fn dense_accuracy(
    train: &LabelledFeatures,
    val: &LabelledFeatures,
    found: &[Vec<u32>],
    k: usize,
) -> (f64, f64) {
    let (t, v, dim) = (
        train.block(0..train.len()),
        val.block(0..val.len()),
        val.dim(),
    );
    let classes = train.classes.len();
    let (mut top1, mut top5) = (0, 0);
    for (i, nn) in found.iter().enumerate() {
        let mut votes = vec![0f64; classes];
        for &j in &nn[..k] {
            let sim: f32 = (0..dim)
                .map(|d| v[i * dim + d] * t[j as usize * dim + d])
                .sum();
            votes[train.labels[j as usize] as usize] += (sim as f64 / 0.07).exp();
        }
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]).then(a.cmp(&b)));
        let l = val.labels[i] as usize;
        top1 += (order[0] == l) as usize;
        top5 += order[..5].contains(&l) as usize;
    }
    let n = val.len() as f64;
    (100.0 * top1 as f64 / n, 100.0 * top5 as f64 / n)
}

#[test]
fn streamed_knn_equals_the_dense_computation_on_every_device() {
    let train = random_features(500, 24, 10, 11);
    let val = random_features(60, 24, 10, 12);
    let dense = dense_neighbours(&train, &val, 30);
    for device in trainer::device::available() {
        // Blocks and tiles that do not divide the sizes, and one block holding everything.
        for tiling in [
            Tiling {
                train_block: 37,
                val_tile: 7,
            },
            Tiling {
                train_block: 10_000,
                val_tile: 1_000,
            },
        ] {
            let mut reported = Vec::new();
            let found = neighbours(&train, &val, 30, &device, tiling, &mut |done, of| {
                reported.push((done, of))
            })
            .unwrap();
            let blocks = 500usize.div_ceil(tiling.train_block);
            assert_eq!(reported.len(), blocks, "one report per block");
            assert_eq!(reported.last(), Some(&(500, 500)));
            for (i, want) in dense.iter().enumerate() {
                let got: Vec<u32> = found.of(i).map(|(_, j)| j).collect();
                assert_eq!(&got, want, "val row {i} on {device:?} with {tiling:?}");
            }
            for k in [1, 20, 30] {
                let acc = vote(&found, &train, &val, k, 0.07);
                let (top1, top5) = dense_accuracy(&train, &val, &dense, k);
                assert!(
                    (acc.top1 - top1).abs() < 1e-9 && (acc.top5 - top5).abs() < 1e-9,
                    "k={k}: streamed {acc:?}, dense {top1} / {top5}"
                );
            }
        }
    }
}

#[test]
fn features_of_different_backbones_or_classes_are_refused() {
    let train = random_features(20, 8, 3, 1);
    let mut other = origin();
    other.fingerprint += 1;
    let val = LabelledFeatures::from_vec(
        train.block(0..20),
        8,
        train.labels.clone(),
        class_names(3),
        other,
    )
    .unwrap();
    let err = knn(&train, &val, &[5], 0.07, &Device::Cpu, &mut |_, _| {})
        .expect_err("different backbones must be refused")
        .to_string();
    assert!(err.contains("different backbones"), "{err}");
    let mut names = class_names(3);
    names.swap(0, 1);
    let val =
        LabelledFeatures::from_vec(train.block(0..20), 8, train.labels.clone(), names, origin())
            .unwrap();
    let err = sweep(&train, &val, 1, &[1.0], 0)
        .err()
        .expect("different class lists must be refused")
        .to_string();
    assert!(err.contains("class 0 is `class0`"), "{err}");
}

fn header(rows: usize, dim: usize, precision: Precision) -> Header {
    Header {
        rows,
        dim,
        precision,
        classes: class_names(4),
        origin: origin(),
        checkpoint: None,
        step: None,
        preprocessing: PREPROCESSING.into(),
        dataset: "shards".into(),
    }
}

/// Writes `set` to a feature file at `path`, `batch` rows per call of the sink, from row `first`.
fn write_file(path: &std::path::Path, set: &LabelledFeatures, precision: Precision) {
    let h = header(set.len(), set.dim(), precision);
    cache::write(path, &h, &set.labels, &mut |first, sink| {
        for s in (first..set.len()).step_by(7) {
            sink(&set.block(s..(s + 7).min(set.len())))?;
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn feature_files_read_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let set = random_features(50, 12, 4, 5);
    let path = dir.path().join("f32.feat");
    write_file(&path, &set, Precision::F32);
    let (h, back) = cache::open(&path).unwrap();
    assert_eq!(h, header(50, 12, Precision::F32));
    assert_eq!(back.labels, set.labels);
    assert_eq!(back.block(0..50), set.block(0..50));
    assert_eq!(back.gather(&[3, 1]), set.gather(&[3, 1]));
    assert!(!cache::partial_path(&path).exists());

    let path = dir.path().join("f16.feat");
    write_file(&path, &set, Precision::F16);
    let (_, back) = cache::open(&path).unwrap();
    let worst = back
        .block(0..50)
        .iter()
        .zip(set.block(0..50))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst > 0.0 && worst < 1e-3, "f16 error {worst}");
    let exact = knn(&set, &set, &[5], 0.07, &Device::Cpu, &mut |_, _| {}).unwrap();
    let half = knn(&back, &back, &[5], 0.07, &Device::Cpu, &mut |_, _| {}).unwrap();
    assert_eq!(exact, half);
}

#[test]
fn truncated_or_damaged_feature_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let set = random_features(40, 8, 4, 6);
    let path = dir.path().join("a.feat");
    write_file(&path, &set, Precision::F32);
    let bytes = std::fs::read(&path).unwrap();

    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = cache::open(&path).err().expect("truncated").to_string();
    assert!(err.contains("truncated"), "{err}");

    let mut flipped = bytes.clone();
    let at = bytes.len() - 200;
    flipped[at] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    let err = cache::open(&path).err().expect("damaged").to_string();
    assert!(err.contains("checksum"), "{err}");

    std::fs::write(&path, b"not features at all").unwrap();
    let err = cache::open(&path)
        .err()
        .expect("not a feature file")
        .to_string();
    assert!(err.contains("not a feature file"), "{err}");
}

#[test]
fn a_killed_extraction_continues_from_its_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let set = random_features(30, 8, 4, 7);
    let path = dir.path().join("b.feat");
    let h = header(30, 8, Precision::F32);
    // The first attempt writes 14 rows and 3 values of the next, then fails.
    let err = cache::write(&path, &h, &set.labels, &mut |first, sink| {
        assert_eq!(first, 0);
        sink(&set.block(0..14))?;
        sink(&set.block(14..15)[..3])?;
        Err(trainer::error::Error::Data("killed".into()))
    });
    assert!(err.is_err());
    assert!(!path.exists() && cache::partial_path(&path).exists());
    // The second starts at the first incomplete row and completes the same file.
    let mut asked = None;
    cache::write(&path, &h, &set.labels, &mut |first, sink| {
        asked = Some(first);
        sink(&set.block(first..30))
    })
    .unwrap();
    assert_eq!(asked, Some(14));
    let (_, back) = cache::open(&path).unwrap();
    assert_eq!(back.block(0..30), set.block(0..30));

    // A partial file of another extraction is not continued.
    let other = header(30, 8, Precision::F16);
    let err = cache::write(&path, &other, &set.labels, &mut |_, sink| {
        sink(&set.block(0..5))?;
        Err(trainer::error::Error::Data("killed".into()))
    });
    assert!(err.is_err());
    let mut asked = None;
    cache::write(&path, &h, &set.labels, &mut |first, sink| {
        asked = Some(first);
        sink(&set.block(first..30))
    })
    .unwrap();
    assert_eq!(asked, Some(0));
}

#[test]
fn the_monitoring_subset_takes_a_fixed_number_of_images_per_class() {
    use shared::synth::{write_packed_train, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        seed: 1,
        classes: 3,
        train_per_class: 10,
        val_per_class: 0,
        test_per_class: 0,
        size: 16,
    };
    let path = write_packed_train(&spec, dir.path(), shared::shard::Encoding::Raw).unwrap();
    let set = shared::dataset::Dataset::open(&path).unwrap();
    let labels = |idx: &[usize]| trainer::eval::features::labels_of(&set, idx).unwrap();
    let subset = per_class_subset(&set, 4, 0).unwrap();
    assert_eq!(subset.len(), 12);
    assert!(subset.windows(2).all(|w| w[0] < w[1]), "in dataset order");
    let got = labels(&subset);
    for c in 0..3 {
        assert_eq!(got.iter().filter(|&&l| l == c).count(), 4, "class {c}");
    }
    assert_eq!(
        subset,
        per_class_subset(&set, 4, 0).unwrap(),
        "fixed by the seed"
    );
    assert_ne!(
        subset,
        per_class_subset(&set, 4, 1).unwrap(),
        "drawn from the seed"
    );
    let all: Vec<usize> = (0..30).collect();
    assert_eq!(per_class_subset(&set, 0, 0).unwrap(), all);
    assert_eq!(per_class_subset(&set, 100, 0).unwrap(), all);
}

/// Packed shards of `per_class` noisy 40 px images of each of four flat colours, drawn from
/// `seed`: classes a random backbone's features separate, whatever the crop.
fn colour_shards(dir: &std::path::Path, per_class: usize, seed: u64) -> shared::dataset::Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let colours = [
        [200u8, 40, 40],
        [40, 180, 40],
        [40, 40, 200],
        [200, 200, 40],
    ];
    for (c, colour) in colours.iter().enumerate() {
        let class = dir.join("images").join(format!("colour{c}"));
        std::fs::create_dir_all(&class).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(40, 40, |_, _| {
                image::Rgb(colour.map(|v| v.saturating_add(rng.random_range(0..50))))
            });
            img.save(class.join(format!("{i}.png"))).unwrap();
        }
    }
    let out = dir.join("shards");
    shared::synth::pack_class_folders(&dir.join("images"), &out, shared::shard::Encoding::Raw)
        .unwrap();
    shared::dataset::Dataset::open(&out).unwrap()
}

/// Train and val shards of four colour classes and a small random backbone of 32 px.
fn protocol_setup(
    dir: &std::path::Path,
) -> (
    trainer::method::maskdeep::MaskDeep,
    Origin,
    std::sync::Arc<shared::dataset::Dataset>,
    shared::dataset::Dataset,
) {
    let mut cfg = trainer::config::TrainConfig::preset("maskdeep-r18-small").unwrap();
    for kv in ["width=0.25", "image_size=32"] {
        cfg.set(kv).unwrap();
    }
    let model = trainer::method::maskdeep::MaskDeep::new(&cfg, &Device::Cpu).unwrap();
    let origin = Origin::of(&model, "random".into()).unwrap();
    (
        model,
        origin,
        std::sync::Arc::new(colour_shards(&dir.join("train"), 30, 1)),
        colour_shards(&dir.join("val"), 10, 2),
    )
}

fn protocol_job<'a>(
    (model, origin, train, val): &'a (
        trainer::method::maskdeep::MaskDeep,
        Origin,
        std::sync::Arc<shared::dataset::Dataset>,
        shared::dataset::Dataset,
    ),
    out: &'a std::path::Path,
    resume: bool,
) -> trainer::eval::protocol::ProtocolJob<'a> {
    trainer::eval::protocol::ProtocolJob {
        backbone: &model.online.backbone,
        origin,
        spec: trainer::eval::protocol::ProtocolSpec {
            epochs: 10,
            batch: 32,
            lrs: vec![1e-4, 1.0],
            seed: 0,
            image_size: 32,
        },
        train: std::sync::Arc::clone(train),
        val,
        test: Some(val),
        out,
        resume,
        threads: 2,
        device: &Device::Cpu,
    }
}

fn run_protocol(
    job: &trainer::eval::protocol::ProtocolJob,
    stop_at: Option<u64>,
) -> trainer::error::Result<trainer::eval::protocol::ProtocolReport> {
    job.run(trainer::eval::protocol::Hooks {
        steps: &mut |_, _| {},
        scoring: &mut |_, _, _| {},
        stop: &|step| Some(step) == stop_at,
    })
}

#[test]
fn the_linear_protocol_learns_above_chance_and_reports_each_rate() {
    let dir = tempfile::tempdir().unwrap();
    let setup = protocol_setup(dir.path());
    let out = dir.path().join("probe");
    let report = run_protocol(&protocol_job(&setup, &out, false), None).unwrap();
    let tops: Vec<f64> = report.val.iter().map(|(_, _, a)| a.top1).collect();
    assert_eq!(report.val.len(), 2, "one row per rate");
    assert_eq!(report.val[1].1, 32.0 / 256.0, "rates scale with the batch");
    // Chance is 25%; the head whose rate barely moves it stays below the one that learns.
    assert!(tops[1] >= 90.0, "{tops:?}");
    assert!(tops[0] < tops[1], "{tops:?}");
    assert_eq!((report.best_lr, report.best_val.top1), (1.0, tops[1]));
    assert_eq!(report.test.unwrap(), report.best_val, "test is val here");
    assert!(out.join(trainer::eval::protocol::RESULTS_FILE).is_file());
    // A second run into the same folder without --resume is refused.
    let again = run_protocol(&protocol_job(&setup, &out, false), None);
    assert!(matches!(again, Err(trainer::error::Error::Run(_))));
}

#[test]
fn a_stopped_and_resumed_protocol_run_ends_like_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let setup = protocol_setup(dir.path());
    let whole = dir.path().join("whole");
    let parts = dir.path().join("parts");
    let a = run_protocol(&protocol_job(&setup, &whole, false), None).unwrap();
    // 120 images, batch 32: 3 steps an epoch, 30 in all; stop mid-epoch at step 5.
    let stopped = run_protocol(&protocol_job(&setup, &parts, false), Some(5));
    assert!(
        matches!(
            stopped,
            Err(trainer::error::Error::Interrupted { step: 5, .. })
        ),
        "{:?}",
        stopped.err()
    );
    let b = run_protocol(&protocol_job(&setup, &parts, true), None).unwrap();
    assert_eq!(a.val, b.val);
    let heads = "probe-step-00000030.safetensors";
    assert_eq!(
        std::fs::read(whole.join(heads)).unwrap(),
        std::fs::read(parts.join(heads)).unwrap(),
        "the heads and their optimiser state are bit-identical"
    );
    // Only the newest checkpoint's heads are kept.
    let files = std::fs::read_dir(&parts).unwrap().count();
    assert_eq!(files, 3, "state, heads, results");
    // Another setting is refused on resume, naming it.
    let mut other = protocol_job(&setup, &parts, true);
    other.spec.epochs = 11;
    let refused = run_protocol(&other, None).err().unwrap().to_string();
    assert!(refused.contains("another linear-probe run"), "{refused}");
}
