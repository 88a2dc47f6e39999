//! End-to-end tests of `loader synth`, `pack`, `merge`, `verify` and `inspect` through the binary.

use e2e::*;
use shared::dataset::Dataset;
use shared::decode::decode_rgb;
use shared::resize::{Filter, RgbResizer, SizePolicy};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn synth_is_deterministic_and_pack_does_not_depend_on_threads() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    synth(&a, 4, 6, 40);
    synth(&b, 4, 6, 40);
    for split in ["train", "val", "test"] {
        for class in fs::read_dir(a.join(split)).unwrap() {
            let name = class.unwrap().file_name();
            let (x, y) = (a.join(split).join(&name), b.join(split).join(&name));
            assert_eq!(folder_bytes(&x), folder_bytes(&y), "synth differs in {x:?}");
        }
    }
    // Each split has its own images: the first test image of a class is not its first val image.
    let first = |split: &str| fs::read(a.join(split).join("00-disk/00000.png")).unwrap();
    assert_ne!(first("test"), first("val"));
    let (p1, p2) = (t.path().join("p1"), t.path().join("p2"));
    let src = a.join("train");
    let common = ["--short-side", "32", "--shard-size", "64K", "--json"];
    let o1 = json(&loader_ok(
        &[
            &["pack", p(&src), "--out", p(&p1), "--threads", "1"][..],
            &common,
        ]
        .concat(),
    ));
    loader_ok(
        &[
            &["pack", p(&src), "--out", p(&p2), "--threads", "2"][..],
            &common,
        ]
        .concat(),
    );
    assert_eq!(o1["images"], 24);
    assert_eq!(o1["failed"], 0);
    assert!(
        o1["shards"].as_u64().unwrap() >= 2,
        "64K shards must split 24 images: {o1}"
    );
    assert_eq!(folder_bytes(&p1), folder_bytes(&p2));
    loader_ok(&["verify", p(&p1)]);

    let ds = Dataset::open(&p1).unwrap();
    assert_eq!(
        ds.manifest().classes,
        vec!["00-disk", "01-square", "02-triangle", "03-star"]
    );
    assert_eq!(ds.manifest().counts_per_class, vec![6; 4]);
    let labels: Vec<u32> = (0..ds.len()).map(|i| ds.meta(i).unwrap().label).collect();
    assert_eq!(
        labels,
        [0, 1, 2, 3]
            .iter()
            .flat_map(|&c| [c; 6])
            .collect::<Vec<_>>()
    );
}

#[test]
fn raw_pixels_equal_decode_then_resize_of_photo_like_jpegs() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let names = write_photo_like_jpegs(&t.path().join("photos"), 6);
    for (i, photo) in names.iter().enumerate() {
        let class = src.join(if i % 2 == 0 { "even" } else { "odd" });
        fs::create_dir_all(&class).unwrap();
        fs::copy(photo, class.join(photo.file_name().unwrap())).unwrap();
    }
    let out = t.path().join("out");
    loader_ok(&["pack", p(&src), "--out", p(&out), "--short-side", "96"]);
    let ds = Dataset::open(&out).unwrap();
    let sources = ds.source_paths().unwrap();
    assert_eq!(ds.len(), 6);
    let policy = SizePolicy {
        short_side: Some(96),
        max_side: None,
        upscale: false,
    };
    let mut resizer = RgbResizer::default();
    for i in 0..ds.len() {
        let meta = ds.meta(i).unwrap();
        let rel = &sources[meta.source_id as usize];
        let img = decode_rgb(&fs::read(src.join(rel)).unwrap(), u64::MAX).unwrap();
        let (w, h) = policy.output_size(img.width, img.height);
        assert_eq!(w.min(h), 96);
        let want = resizer
            .resize(img.as_ref(), w, h, Filter::Bilinear)
            .unwrap();
        assert_eq!((meta.width, meta.height), (w, h));
        assert_eq!(
            ds.payload(i).unwrap(),
            &want.pixels[..],
            "record {i} ({rel})"
        );
        let class = if rel.starts_with("even/") { 0 } else { 1 };
        assert_eq!(meta.label, class);
    }

    // JPEG payloads decode back close to the raw ones.
    let jpeg = t.path().join("jpeg");
    loader_ok(&[
        "pack",
        p(&src),
        "--out",
        p(&jpeg),
        "--short-side",
        "96",
        "--encoding",
        "jpeg",
        "--quality",
        "95",
    ]);
    let dj = Dataset::open(&jpeg).unwrap();
    for i in 0..ds.len() {
        let (a, b) = (ds.image(i).unwrap(), dj.image(i).unwrap());
        let mean = a
            .pixels
            .iter()
            .zip(&b.pixels)
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / a.pixels.len() as f64;
        assert!(
            mean < 4.0,
            "record {i}: JPEG q95 differs by {mean} on average"
        );
    }
}

#[test]
fn broken_files_are_reported_and_strict_fails() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let formats = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/formats");
    for (split, class) in [("valid", "good"), ("broken", "bad")] {
        let dir = src.join(class);
        fs::create_dir_all(&dir).unwrap();
        for e in fs::read_dir(formats.join(split)).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let out = t.path().join("out");
    let summary = json(&loader_ok(&["pack", p(&src), "--out", p(&out), "--json"]));
    let failures = summary["failures"].as_array().unwrap();
    let failed: Vec<&str> = failures
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        [
            "bad/empty.jpg",
            "bad/header_only.png",
            "bad/text.jpg",
            "bad/truncated.jpg",
            "bad/truncated.png"
        ]
    );
    assert!(failures
        .iter()
        .all(|f| !f["reason"].as_str().unwrap().is_empty()));
    assert_eq!(summary["images"], 16);
    loader_ok(&["verify", p(&out)]);

    let strict = loader(&[
        "pack",
        p(&src),
        "--out",
        p(&t.path().join("strict")),
        "--strict",
    ]);
    assert!(!strict.status.success());
    assert!(String::from_utf8_lossy(&strict.stderr).contains("5 files failed"));
}

#[test]
fn missing_source_and_unwritable_output_name_the_path() {
    let t = tempfile::tempdir().unwrap();
    let out = loader(&[
        "pack",
        p(&t.path().join("nowhere")),
        "--out",
        p(&t.path().join("o")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));

    let src = t.path().join("src");
    synth(&src, 2, 2, 32);
    let file = t.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let out = loader(&["pack", p(&src.join("train")), "--out", p(&file.join("sub"))]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validation_layout_with_label_files() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 3, 2, 32);
    let train = t.path().join("train");
    loader_ok(&["pack", p(&syn.join("train")), "--out", p(&train)]);
    // Flatten val/ into one folder with ImageNet-style names and a LOC_val_solution.csv.
    let flat = t.path().join("flat");
    fs::create_dir_all(&flat).unwrap();
    let mut loc = String::from("ImageId,PredictionString\n");
    let mut plain = String::from("path,class\n");
    let mut n = 0;
    for class in ["02-triangle", "00-disk"] {
        for e in fs::read_dir(syn.join("val").join(class)).unwrap() {
            n += 1;
            let id = format!("ILSVRC2012_val_{n:08}");
            fs::copy(e.unwrap().path(), flat.join(format!("{id}.JPEG"))).unwrap();
            loc.push_str(&format!("{id},{class} 1 2 3 4\n"));
            plain.push_str(&format!("{id}.JPEG,{class}\n"));
        }
    }
    for (name, text) in [("LOC_val_solution.csv", &loc), ("labels.csv", &plain)] {
        let labels = t.path().join(name);
        fs::write(&labels, text).unwrap();
        let out = t.path().join(format!("val-{name}"));
        loader_ok(&[
            "pack",
            p(&flat),
            "--out",
            p(&out),
            "--labels",
            p(&labels),
            "--classes-from",
            p(&train),
            "--strict",
        ]);
        let ds = Dataset::open(&out).unwrap();
        assert_eq!(
            ds.manifest().classes,
            vec!["00-disk", "01-square", "02-triangle"]
        );
        assert_eq!(ds.manifest().counts_per_class, vec![3, 0, 3], "{name}");
    }
}

#[test]
fn tampered_and_truncated_shards_are_detected() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 2, 5, 32);
    let out = t.path().join("out");
    loader_ok(&["pack", p(&syn.join("train")), "--out", p(&out)]);
    let shard = out.join("shard-00000.mds");
    let clean = fs::read(&shard).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let record3 = *ds.meta(3).unwrap();
    drop(ds);

    // A flipped byte inside record 3's payload: named by shard and record.
    let mut bytes = clean.clone();
    bytes[record3.offset as usize + 7] ^= 1;
    fs::write(&shard, &bytes).unwrap();
    let v = loader(&["verify", p(&out)]);
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(!v.status.success());
    assert!(err.contains("shard-00000.mds: record 3 "), "{err}");
    assert!(
        !err.contains("record 3: record 3"),
        "the record is named once: {err}"
    );

    // A flipped byte in padding, index and header: still found.
    for at in [record3.offset as usize - 1, clean.len() - 10, 20] {
        let mut bytes = clean.clone();
        bytes[at] ^= 0x80;
        fs::write(&shard, &bytes).unwrap();
        let v = loader(&["verify", p(&out)]);
        assert!(!v.status.success(), "flip at {at} not found");
        assert!(String::from_utf8_lossy(&v.stderr).contains("shard-00000.mds"));
    }

    // Truncated: every command that reads the shard fails with a message, not a panic.
    fs::write(&shard, &clean[..clean.len() / 2]).unwrap();
    for args in [vec!["verify", p(&out)], vec!["inspect", p(&out)]] {
        let o = loader(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("truncated") && !err.contains("panicked"),
            "{err}"
        );
    }
}

#[test]
fn killed_pack_resumes_to_the_same_bytes() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 4, 40, 64);
    let src = syn.join("train");
    let args = |out: &Path| -> Vec<String> {
        [
            "pack",
            p(&src),
            "--out",
            p(out),
            "--shard-size",
            "64K",
            "--threads",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };
    let clean = t.path().join("clean");
    loader_ok(&args(&clean).iter().map(String::as_str).collect::<Vec<_>>());

    let killed = t.path().join("killed");
    let mut child = Command::new(bin("loader"))
        .args(args(&killed))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once at least one shard is complete (the progress file exists).
    let start = Instant::now();
    while !killed.join("progress.json").exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("manifest.json").exists(),
        "the pack finished before it could be killed"
    );
    // Leave what a kill between a shard's rename and the progress update would leave, plus a torn temp file.
    let extra = killed.join("shard-00500.mds.tmp");
    fs::write(&extra, b"partial").unwrap();

    let again = json(&loader_ok(
        &[
            &args(&killed).iter().map(String::as_str).collect::<Vec<_>>()[..],
            &["--json"],
        ]
        .concat(),
    ));
    assert!(again["resumed_files"].as_u64().unwrap() > 0, "{again}");
    assert!(!extra.exists() || fs::read(&extra).unwrap() == b"partial");
    let _ = fs::remove_file(&extra);
    assert_eq!(folder_bytes(&clean), folder_bytes(&killed));

    // Run again on a finished pack: nothing to do, same bytes.
    let done = json(&loader_ok(
        &[
            &args(&killed).iter().map(String::as_str).collect::<Vec<_>>()[..],
            &["--json"],
        ]
        .concat(),
    ));
    assert_eq!(done["already_complete"], true);
}

#[test]
fn parts_merge_into_the_same_records() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 3, 5, 32);
    let src = syn.join("train");
    let whole = t.path().join("whole");
    loader_ok(&["pack", p(&src), "--out", p(&whole)]);
    let parts = t.path().join("parts");
    loader_ok(&["pack", p(&src), "--out", p(&parts), "--part", "1/2"]);
    let early = loader(&["merge", p(&parts)]);
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("1 of 2 parts"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    loader_ok(&["pack", p(&src), "--out", p(&parts), "--part", "0/2"]);
    loader_ok(&["merge", p(&parts)]);
    loader_ok(&["verify", p(&parts)]);
    let (a, b) = (
        Dataset::open(&whole).unwrap(),
        Dataset::open(&parts).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    assert_eq!(a.manifest().counts_per_class, b.manifest().counts_per_class);
    for i in 0..a.len() {
        assert_eq!(a.meta(i).unwrap().source_id, b.meta(i).unwrap().source_id);
        assert_eq!(a.payload(i).unwrap(), b.payload(i).unwrap());
    }
}

#[test]
fn inspect_reports_and_dumps_a_record() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 2, 3, 48);
    let out = t.path().join("out");
    loader_ok(&["pack", p(&syn.join("train")), "--out", p(&out)]);
    let info = json(&loader_ok(&["inspect", p(&out), "--json"]));
    assert_eq!(info["records"], 6);
    assert_eq!(info["encoding"], "raw");
    assert_eq!(info["classes"][1]["name"], "01-square");
    assert_eq!(info["width"]["max"], 48);
    let png = t.path().join("r.png");
    loader_ok(&["inspect", p(&out), "--dump", "4", "--to", p(&png)]);
    let img = image_size(&png);
    assert_eq!(img, (48, 48));
    let bad = loader(&["inspect", p(&out), "--dump", "99", "--to", p(&png)]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("out of range"));
}

fn image_size(path: &Path) -> (u32, u32) {
    let img = decode_rgb(&fs::read(path).unwrap(), u64::MAX).unwrap();
    (img.width, img.height)
}

#[test]
fn bench_profiles_shards_and_image_folders() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 2, 4, 48);
    let out = t.path().join("out");
    loader_ok(&[
        "pack",
        p(&syn.join("train")),
        "--out",
        p(&out),
        "--encoding",
        "jpeg",
    ]);
    for src in [out, syn.join("val")] {
        let args = [
            "bench",
            p(&src),
            "--preset",
            "multicrop-small",
            "--threads",
            "2",
            "--samples",
            "8",
            "--repeats",
            "1",
            "--json",
        ];
        let r = json(&loader_ok(&args));
        assert!(r["samples_per_second"].as_f64().unwrap() > 0.0, "{r}");
        let views =
            r["views_per_second"].as_f64().unwrap() / r["samples_per_second"].as_f64().unwrap();
        assert!(
            (views - 8.0).abs() < 1e-6,
            "multicrop-small has 8 views: {r}"
        );
        assert_eq!(r["scaling"].as_array().unwrap().len(), 2);
        assert!(
            r["stage_ms_per_sample_1_thread"]["decode"]
                .as_f64()
                .unwrap()
                > 0.0,
            "JPEG and files are decoded: {r}"
        );
    }
}

#[test]
fn views_command_writes_view_shards() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 2, 6, 48);
    let out = t.path().join("out");
    loader_ok(&["pack", p(&syn.join("train")), "--out", p(&out)]);
    let views = t.path().join("views");
    let args = [
        "views",
        p(&out),
        "--preset",
        "byol-small",
        "--epochs",
        "2",
        "--batch",
        "4",
        "--seed",
        "3",
        "--out",
        p(&views),
    ];
    loader_ok(&args);
    let vs = shared::viewshards::ViewShards::open(&views).unwrap();
    assert_eq!(vs.len(), 2 * 3 * 4);
    assert_eq!(vs.sample(0).unwrap().views.len(), 2);
    assert_eq!(vs.sample(0).unwrap().views[0].len(), 3 * 64 * 64);
    // Same seed, same bytes.
    let again = t.path().join("again");
    loader_ok(&[&args[..args.len() - 1], &[p(&again)]].concat());
    assert_eq!(folder_bytes(&views), folder_bytes(&again));
}

/// `loader views` of one epoch of the packed `shards` into `views`.
fn one_epoch_of_views(shards: &Path, views: &Path) {
    loader_ok(&[
        "views",
        p(shards),
        "--preset",
        "byol-small",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--out",
        p(views),
    ]);
}

/// The stderr of a failed `loader` run (and that it failed).
fn loader_err(args: &[&str]) -> String {
    let out = loader(args);
    assert!(!out.status.success(), "loader {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn only_the_same_job_resumes_into_a_finished_pack() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 3, 4, 32);
    let (train, val) = (syn.join("train"), syn.join("val"));
    let out = t.path().join("out");
    loader_ok(&["pack", p(&train), "--out", p(&out)]);
    let packed = folder_bytes(&out);

    // The same source and options: nothing to do, and it says so.
    let again = loader_ok(&["pack", p(&train), "--out", p(&out)]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("nothing to do"), "{said}");
    assert!(!said.contains("images/s"), "{said}");

    // Another source with the same classes (the val split by mistake): refused, naming the file.
    let err = loader_err(&["pack", p(&val), "--out", p(&out)]);
    assert!(
        err.contains("another job") && err.contains("its file 3"),
        "{err}"
    );

    // The same source with one more image: refused, naming it.
    let first_class = fs::read_dir(&train)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let image = fs::read_dir(&first_class)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::copy(&image, first_class.join("zz-added.png")).unwrap();
    let err = loader_err(&["pack", p(&train), "--out", p(&out)]);
    assert!(
        err.contains("another job") && err.contains("zz-added.png"),
        "{err}"
    );

    // Other options: refused, naming them.
    fs::remove_file(first_class.join("zz-added.png")).unwrap();
    let err = loader_err(&["pack", p(&train), "--out", p(&out), "--short-side", "40"]);
    assert!(err.contains("other options"), "{err}");
    assert_eq!(folder_bytes(&out), packed, "nothing was written");

    // A folder of view shards is not a pack.
    let views = t.path().join("views");
    one_epoch_of_views(&out, &views);
    let err = loader_err(&["pack", p(&train), "--out", p(&views)]);
    assert!(err.contains("view shards"), "{err}");
}

#[test]
fn small_mistakes_get_messages_that_say_what_happened() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 2, 4, 32);
    let train = syn.join("train");

    // Files that are not images are counted; an empty image file is reported as empty.
    let class = fs::read_dir(&train)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::write(class.join("notes.txt"), "not an image").unwrap();
    fs::write(class.join("empty.jpg"), b"").unwrap();
    let out = t.path().join("out");
    let packed = json(&loader_ok(&["pack", p(&train), "--out", p(&out), "--json"]));
    assert_eq!(packed["not_images"], 1, "{packed}");
    let reasons: Vec<&str> = packed["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("empty file")),
        "{reasons:?}"
    );

    // A flat folder of images without --labels: the error points at --labels / --unlabelled.
    let flat = t.path().join("flat");
    fs::create_dir_all(&flat).unwrap();
    for e in fs::read_dir(&class).unwrap() {
        let path = e.unwrap().path();
        fs::copy(&path, flat.join(path.file_name().unwrap())).unwrap();
    }
    let err = loader_err(&["pack", p(&flat), "--out", p(&t.path().join("flat-out"))]);
    assert!(
        err.contains("--labels") && err.contains("--unlabelled"),
        "{err}"
    );

    // inspect and verify know view shards.
    let views = t.path().join("views");
    one_epoch_of_views(&out, &views);
    let shown = json(&loader_ok(&["inspect", p(&views), "--json"]));
    assert_eq!(shown["kind"], "view shards", "{shown}");
    let shard = fs::read_dir(&views)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "mds"))
        .unwrap();
    let mut bytes = fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&shard, bytes).unwrap();
    let err = loader_err(&["verify", p(&views)]);
    assert!(
        err.contains("loader views") && !err.contains("repack"),
        "{err}"
    );
    for line in err.lines().filter(|l| l.contains("record")) {
        assert_eq!(
            line.matches("record").count(),
            1,
            "the record is named once: {line}"
        );
    }
}

#[test]
fn a_closed_output_pipe_ends_loader_quietly() {
    let t = tempfile::tempdir().unwrap();
    let syn = t.path().join("syn");
    synth(&syn, 2, 4, 32);
    let out = t.path().join("out");
    loader_ok(&["pack", p(&syn.join("train")), "--out", p(&out)]);
    // `loader inspect DIR | head -0`: the reader is gone before loader writes its summary.
    let mut child = Command::new(bin("loader"))
        .args(["inspect", p(&out)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let done = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
