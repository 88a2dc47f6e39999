//! The streaming pipeline: deterministic whatever the threads or prefetch, resumable at any
//! step, robust to damaged records.

use shared::dataset::Dataset;
use shared::pipeline::{
    Batch, Output, Pipeline, PipelineConfig, ViewData, IMAGENET_MEAN, IMAGENET_STD,
};
use shared::shard::Encoding;
use shared::synth::{write_packed_train, SynthSpec};
use std::path::Path;
use std::sync::Arc;

fn packed(dir: &Path, encoding: Encoding) -> Arc<Dataset> {
    let spec = SynthSpec {
        seed: 1,
        classes: 3,
        train_per_class: 8,
        val_per_class: 0,
        test_per_class: 0,
        size: 40,
    };
    let shards = write_packed_train(&spec, dir, encoding).unwrap();
    Arc::new(Dataset::open(&shards).unwrap())
}

fn config(threads: usize, prefetch: usize) -> PipelineConfig {
    let mut views = shared::views::preset("multicrop-small").unwrap();
    views.truncate(3);
    for v in &mut views {
        v.blur_p = 0.5;
        v.blur_kernel = 5;
    }
    PipelineConfig {
        views,
        batch_size: 5,
        seed: 42,
        threads,
        prefetch,
        rank: 0,
        world_size: 1,
        start_step: 0,
        end_step: 10,
        output: Output::U8,
    }
}

fn collect(ds: &Arc<Dataset>, c: PipelineConfig) -> Vec<Batch> {
    Pipeline::start(ds.clone(), c)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn bytes(b: &Batch) -> Vec<&[u8]> {
    b.views
        .iter()
        .map(|v| match v {
            ViewData::U8(d) => &d[..],
            ViewData::F32(_) => panic!("u8 expected"),
        })
        .collect()
}

#[test]
fn identical_batches_whatever_threads_and_prefetch_and_resumable() {
    let t = tempfile::tempdir().unwrap();
    let ds = packed(t.path(), Encoding::Raw);
    let a = collect(&ds, config(1, 1));
    let b = collect(&ds, config(3, 4));
    assert_eq!(a.len(), 10);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.step, &x.sample_ids, &x.labels),
            (y.step, &y.sample_ids, &y.labels)
        );
        assert_eq!(bytes(x), bytes(y), "step {}", x.step);
        assert_eq!(x.sizes, vec![64, 64, 32]);
        assert_eq!(bytes(x)[2].len(), 5 * 3 * 32 * 32);
    }
    // 24 samples / 5 = 4 steps an epoch: each epoch visits distinct samples, epochs differ.
    let epoch0: Vec<u32> = a[..4].iter().flat_map(|b| b.sample_ids.clone()).collect();
    let mut uniq = epoch0.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 20);
    assert_eq!(a[4].epoch, 1);
    assert_ne!(a[0].sample_ids, a[4].sample_ids);
    for b in &a {
        for (id, label) in b.sample_ids.iter().zip(&b.labels) {
            assert_eq!(*label, ds.meta(*id as usize).unwrap().label);
        }
    }
    // The two views of a sample differ (independent random streams).
    assert_ne!(
        &bytes(&a[0])[0][..3 * 64 * 64],
        &bytes(&a[0])[1][..3 * 64 * 64]
    );

    // Handing every batch back for reuse changes nothing.
    let mut p = Pipeline::start(ds.clone(), config(2, 1)).unwrap();
    for x in &a {
        let y = p.next().unwrap().unwrap();
        assert_eq!(bytes(x), bytes(&y), "recycled buffers, step {}", x.step);
        p.recycle(y.views);
    }
    assert!(p.next().is_none());

    // Resumed at step 6: the same batches as the uninterrupted run.
    let resumed = collect(
        &ds,
        PipelineConfig {
            start_step: 6,
            ..config(2, 2)
        },
    );
    assert_eq!(resumed.len(), 4);
    for (x, y) in resumed.iter().zip(&a[6..]) {
        assert_eq!((x.step, &x.sample_ids), (y.step, &y.sample_ids));
        assert_eq!(bytes(x), bytes(y));
    }
}

#[test]
fn ranks_split_the_global_batch() {
    let t = tempfile::tempdir().unwrap();
    let ds = packed(t.path(), Encoding::Jpeg);
    let base = PipelineConfig {
        world_size: 2,
        batch_size: 3,
        end_step: 4,
        ..config(2, 2)
    };
    let r0 = collect(
        &ds,
        PipelineConfig {
            rank: 0,
            ..base.clone()
        },
    );
    let r1 = collect(&ds, PipelineConfig { rank: 1, ..base });
    for (a, b) in r0.iter().zip(&r1) {
        assert!(a.sample_ids.iter().all(|id| !b.sample_ids.contains(id)));
    }
}

#[test]
fn normalised_output_matches_u8_output() {
    let t = tempfile::tempdir().unwrap();
    let ds = packed(t.path(), Encoding::Raw);
    let u = collect(
        &ds,
        PipelineConfig {
            end_step: 1,
            ..config(2, 1)
        },
    );
    let f = collect(
        &ds,
        PipelineConfig {
            end_step: 1,
            output: Output::F32 {
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
            ..config(2, 1)
        },
    );
    let (ViewData::U8(u), ViewData::F32(f)) = (&u[0].views[0], &f[0].views[0]) else {
        panic!()
    };
    let plane = 64 * 64;
    for (i, (a, b)) in u.iter().zip(f).enumerate() {
        let c = (i / plane) % 3;
        let want = (*a as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        assert!((want - b).abs() < 1e-5);
    }
}

#[test]
fn damaged_records_are_skipped_and_counted() {
    let t = tempfile::tempdir().unwrap();
    let ds = packed(t.path(), Encoding::Raw);
    let victim = 7usize;
    let meta = *ds.meta(victim).unwrap();
    // Find the shard holding the victim and flip a byte of its payload.
    let (mut shard_file, mut local) = (String::new(), victim);
    for (s, summary) in ds.shards().iter().zip(&ds.manifest().shards) {
        if local < s.len() {
            shard_file = summary.file.clone();
            break;
        }
        local -= s.len();
    }
    drop(ds);
    let path = t.path().join("shards").join(shard_file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[meta.offset as usize + 5] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    let ds = Arc::new(Dataset::open(&t.path().join("shards")).unwrap());
    let batches = collect(
        &ds,
        PipelineConfig {
            end_step: 8,
            ..config(2, 2)
        },
    );
    assert_eq!(batches.len(), 8, "the stream goes on");
    let skipped: Vec<u32> = batches
        .iter()
        .flat_map(|b| b.skipped.iter().map(|s| s.0))
        .collect();
    assert!(skipped.iter().all(|&id| id == victim as u32));
    assert!(
        !skipped.is_empty(),
        "two epochs visit every used sample; the victim must come up"
    );
    assert!(batches
        .iter()
        .all(|b| !b.sample_ids.contains(&(victim as u32))));
}

#[test]
fn dropping_the_pipeline_midway_does_not_hang() {
    let t = tempfile::tempdir().unwrap();
    let ds = packed(t.path(), Encoding::Raw);
    let mut p = Pipeline::start(
        ds,
        PipelineConfig {
            end_step: 1000,
            ..config(2, 2)
        },
    )
    .unwrap();
    p.next().unwrap().unwrap();
    // The drop joins the workers: it must return, not wait for 1000 steps or hang. A hang fails
    // the test after a minute instead of stalling the suite.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(p);
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("dropping the pipeline midway hung");
}

#[test]
fn view_shards_hold_exactly_the_streamed_batches() {
    use shared::viewshards::{write_views, ViewShards, ViewsJob};
    let t = tempfile::tempdir().unwrap();
    let ds = packed(t.path(), Encoding::Raw);
    let c = config(2, 2);
    let job = ViewsJob {
        source: t.path().join("shards"),
        views: c.views.clone(),
        seed: c.seed,
        epochs: 2,
        batch_size: c.batch_size,
        threads: 2,
        shard_size: 1 << 16,
        out: t.path().join("views"),
    };
    let m = write_views(&job, &mut |_, _| {}).unwrap();
    assert_eq!(m.steps_per_epoch, 4);
    assert_eq!(m.records, 2 * 4 * 5);
    assert!(
        m.shards.len() > 1,
        "64K shards must split 40 samples of 3 views"
    );
    let vs = ViewShards::open(&job.out).unwrap();
    let streamed = collect(&ds, PipelineConfig { end_step: 8, ..c });
    for (step, batch) in streamed.iter().enumerate() {
        for j in 0..5 {
            let s = vs.sample(step * 5 + j).unwrap();
            assert_eq!(
                (s.sample_id, s.label),
                (batch.sample_ids[j] as u64, batch.labels[j])
            );
            for (v, view) in s.views.iter().enumerate() {
                let per = view.len();
                assert_eq!(
                    *view,
                    &bytes(batch)[v][j * per..(j + 1) * per],
                    "step {step} sample {j} view {v}"
                );
            }
        }
    }
    assert!(vs.sample(40).is_err());

    // `verify` reads views.json folders too, and finds a flipped byte.
    assert!(shared::dataset::verify(&job.out, &mut |_| {})
        .unwrap()
        .is_empty());
    let shard = job.out.join(&m.shards[0].file);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[4096 + 10] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let damage = shared::dataset::verify(&job.out, &mut |_| {}).unwrap();
    assert!(damage.iter().any(|d| d.record == Some(0)), "{damage:?}");
}

#[test]
fn killed_views_job_resumes_to_the_same_bytes() {
    use shared::viewshards::{write_views, ViewsJob, VIEWS_MANIFEST, VIEWS_PROGRESS};
    let t = tempfile::tempdir().unwrap();
    packed(t.path(), Encoding::Raw);
    let c = config(2, 2);
    let job = |out: &str| ViewsJob {
        source: t.path().join("shards"),
        views: c.views.clone(),
        seed: c.seed,
        epochs: 3,
        batch_size: c.batch_size,
        threads: 2,
        // About three samples per shard: shards end in the middle of steps.
        shard_size: 3 * 3 * 3 * (64 * 64 + 64 * 64 + 32 * 32) as u64,
        out: t.path().join(out),
    };
    let whole = write_views(&job("whole"), &mut |_, _| {}).unwrap();

    // Kill the job (a panic stands in for the signal) after 7 of 12 steps.
    let killed = job("killed");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_views(&killed, &mut |done, _| assert!(done < 7, "killed"))
    }));
    assert!(outcome.is_err());
    assert!(killed.out.join(VIEWS_PROGRESS).exists());
    assert!(!killed.out.join(VIEWS_MANIFEST).exists());

    let mut first_step = None;
    let resumed = write_views(&killed, &mut |done, _| {
        first_step.get_or_insert(done);
    })
    .unwrap();
    assert!(
        first_step.unwrap() > 4,
        "resumed from step {first_step:?}, not after the finished shards"
    );
    assert!(!killed.out.join(VIEWS_PROGRESS).exists());
    assert_eq!(resumed.shards, whole.shards);
    assert_eq!(resumed.skipped, whole.skipped);
    for s in &whole.shards {
        assert_eq!(
            std::fs::read(killed.out.join(&s.file)).unwrap(),
            std::fs::read(job("whole").out.join(&s.file)).unwrap(),
            "{}",
            s.file
        );
    }

    // Another job into the same folder is refused while the interrupted one is unfinished.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_views(&killed, &mut |done, _| assert!(done < 3, "killed"))
    }));
    assert!(outcome.is_err());
    let other = ViewsJob {
        seed: 7,
        ..job("killed")
    };
    let err = write_views(&other, &mut |_, _| {}).unwrap_err().to_string();
    assert!(
        err.contains(VIEWS_PROGRESS) && err.contains("new --out"),
        "{err}"
    );
}
