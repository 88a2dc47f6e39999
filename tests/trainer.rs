//! synth -> pack -> pretrain -> eval -> plot -> export through the real binaries, on a tiny dataset.

use e2e::{bin, json, loader_ok, p, synth};
use std::path::Path;
use std::process::{Command, Output};

fn trainer(args: &[&str]) -> Output {
    let out = Command::new(bin("trainer"))
        .args(args)
        .output()
        .expect("run trainer");
    assert!(
        out.status.success(),
        "trainer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `trainer ARGS...`, expects it to fail, and returns its stderr.
fn trainer_err(args: &[&str]) -> String {
    let out = Command::new(bin("trainer"))
        .args(args)
        .output()
        .expect("run trainer");
    assert!(!out.status.success(), "trainer {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Copies the files of `src` (two levels: class folders of files) into `dst`.
fn copy_tree(src: &Path, dst: &Path) {
    for class in std::fs::read_dir(src).unwrap() {
        let class = class.unwrap().path();
        let to = dst.join(class.file_name().unwrap());
        std::fs::create_dir_all(&to).unwrap();
        for file in std::fs::read_dir(&class).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
        }
    }
}

const TINY: &[&str] = &[
    "--set",
    "width=0.125",
    "--set",
    "image_size=32",
    "--set",
    "proj_hidden=32",
    "--set",
    "pred_hidden=32",
    "--set",
    "proj_dim=16",
    "--set",
    "batch_size=8",
];

fn pack(src: &Path, out: &Path) {
    loader_ok(&["pack", p(src), "--out", p(out), "--short-side", "40"]);
}

#[test]
fn synth_pack_pretrain_eval_export() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(&d.join("data"), 3, 8, 40);
    pack(&d.join("data/train"), &d.join("train"));
    pack(&d.join("data/val"), &d.join("val"));

    let run = d.join("run");
    let (train, val) = (d.join("train"), d.join("val"));
    let mut args = vec![
        "pretrain",
        "--preset",
        "maskdeep-r18-small",
        "--data",
        p(&train),
        "--out",
        p(&run),
        "--val",
        p(&val),
        "--set",
        "max_steps=3",
        "--json",
    ];
    args.extend_from_slice(TINY);
    let summary = json(&trainer(&args));
    assert_eq!(summary["steps"], 3);
    assert!(summary["final_loss"].as_f64().unwrap().is_finite());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 3);
    let knn: Vec<_> = lines
        .iter()
        .filter(|l| l.get("knn_top1").is_some())
        .collect();
    assert_eq!(knn.len(), 1, "kNN at the end of the run: {metrics}");
    assert_eq!(knn[0]["step"], 3);
    assert_eq!(
        (&knn[0]["knn_train_images"], &knn[0]["knn_val_images"]),
        (&24.into(), &9.into()),
        "the kNN at the end uses every image: {metrics}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["width"], 0.125);

    let eval = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "knn",
            "--train",
            p(&train),
            "--val",
            p(&val),
            "--json",
        ];
        a.extend_from_slice(extra);
        json(&trainer(&a))
    };
    let trained = eval(&["--checkpoint", p(&run), "--k", "5"]);
    // Features extracted once into files score exactly as features extracted on the fly.
    let (train_file, val_file) = (d.join("train.feat"), d.join("val.feat"));
    for (set, file) in [(&train, &train_file), (&val, &val_file)] {
        let out = trainer(&[
            "eval",
            "features",
            "--checkpoint",
            p(&run),
            "--data",
            p(set),
            "--out",
            p(file),
            "--precision",
            "f32",
        ]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("x 64 F32 features"));
    }
    // Asked again, the extraction sees the finished file and does nothing.
    let again = trainer(&[
        "eval",
        "features",
        "--checkpoint",
        p(&run),
        "--data",
        p(&val),
        "--out",
        p(&val_file),
    ]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    let cached = json(&trainer(&[
        "eval",
        "knn",
        "--train",
        p(&train_file),
        "--val",
        p(&val_file),
        "--k",
        "5",
        "--json",
    ]));
    assert_eq!(cached, trained);
    // The probe reports every rate on val and the one chosen there on --test (here val again,
    // so the two must agree).
    let probe = json(&trainer(&[
        "eval",
        "linear",
        "--fast",
        "--train",
        p(&train_file),
        "--val",
        p(&val_file),
        "--test",
        p(&val_file),
        "--lr",
        "0.5,2",
        "--epochs",
        "3",
        "--json",
    ]));
    assert_eq!(probe["linear"].as_array().unwrap().len(), 2, "{probe}");
    assert_eq!(probe["test"], probe["best_val"], "{probe}");
    // The standard protocol through the binary: augmented shards, checkpoints and results in
    // --out; resuming the finished run trains nothing more and reports the same figures.
    let probe_dir = d.join("probe");
    let protocol = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "linear",
            "--checkpoint",
            p(&run),
            "--train",
            p(&train),
            "--val",
            p(&val),
            "--out",
            p(&probe_dir),
            "--epochs",
            "2",
            "--batch",
            "8",
            "--lr",
            "0.1,1",
            "--json",
        ];
        a.extend_from_slice(extra);
        json(&trainer(&a))
    };
    let first = protocol(&[]);
    assert_eq!(first["evaluation"], "linear protocol", "{first}");
    assert_eq!(first["linear"].as_array().unwrap().len(), 2, "{first}");
    assert_eq!(first["linear"][1]["peak_lr"], 1.0 * 8.0 / 256.0, "{first}");
    let results = std::fs::read_to_string(probe_dir.join("results.json")).unwrap();
    assert!(results.contains("best_lr"), "{results}");
    assert_eq!(protocol(&["--resume"])["linear"], first["linear"]);
    let refused = trainer_err(&[
        "eval",
        "linear",
        "--checkpoint",
        p(&run),
        "--train",
        p(&train_file),
        "--val",
        p(&val),
        "--out",
        p(&d.join("probe2")),
    ]);
    assert!(refused.contains("is a feature file"), "{refused}");
    // A feature file of one backbone is never scored against features of another.
    let mut other = vec![
        "eval",
        "knn",
        "--train",
        p(&train_file),
        "--val",
        p(&val),
        "--random",
        "--preset",
        "maskdeep-r18-small",
    ];
    other.extend_from_slice(TINY);
    let refused = trainer_err(&other);
    assert!(refused.contains("feature file was made by"), "{refused}");
    let mut random_args = vec!["--random", "--preset", "maskdeep-r18-small", "--k", "5"];
    random_args.extend_from_slice(TINY);
    let random = eval(&random_args);
    for r in [&trained, &random] {
        let top1 = r["knn"][0]["top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&top1), "{r}");
    }
    // A kNN that knows its answer: scored against itself, every image's nearest neighbour is
    // itself, so k=1 is right on every image whatever the backbone.
    let itself = json(&trainer(&[
        "eval",
        "knn",
        "--checkpoint",
        p(&run),
        "--train",
        p(&val),
        "--val",
        p(&val),
        "--k",
        "1",
        "--json",
    ]));
    assert_eq!(itself["knn"][0]["top1"], 100.0, "{itself}");
    assert!(random["model"].as_str().unwrap().starts_with("random"));
    // The baseline built from the run's own config says it matches the run (size included).
    let config = run.join("config.json");
    let matched = eval(&["--random", "--config", p(&config), "--k", "5"]);
    let model = matched["model"].as_str().unwrap();
    assert!(model.contains("small stem, width 0.125, 32 px"), "{model}");
    assert_eq!(
        random["knn"], matched["knn"],
        "the same backbone either way"
    );
    assert!(
        trained["model"].as_str().unwrap().contains("32 px"),
        "{trained}"
    );

    // A val set packed with another class list is refused, naming the class, before any work;
    // pretraining with it writes nothing.
    let other = d.join("data/val-renamed");
    copy_tree(&d.join("data/val"), &other);
    let last = std::fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    std::fs::rename(&last, other.join("zz-renamed")).unwrap();
    let other_val = d.join("val-renamed");
    pack(&other, &other_val);
    let refused = trainer_err(&[
        "eval",
        "knn",
        "--checkpoint",
        p(&run),
        "--train",
        p(&train),
        "--val",
        p(&other_val),
    ]);
    assert!(
        refused.contains("different class lists") && refused.contains("class 2"),
        "{refused}"
    );
    let mut args = vec![
        "pretrain",
        "--preset",
        "maskdeep-r18-small",
        "--data",
        p(&train),
    ];
    let fresh = d.join("fresh-run");
    args.extend_from_slice(&["--out", p(&fresh), "--val", p(&other_val)]);
    args.extend_from_slice(TINY);
    let refused = trainer_err(&args);
    assert!(refused.contains("different class lists"), "{refused}");
    assert!(
        !fresh.exists(),
        "nothing is written to --out before the inputs are checked"
    );

    let plot = d.join("training.png");
    trainer(&[
        "plot",
        "--run",
        &format!("MaskDeep={}", p(&run)),
        "--reference",
        "random=10",
        "--out",
        p(&plot),
    ]);
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[1..4], b"PNG", "{} is not a PNG", plot.display());

    let exported = d.join("backbone.safetensors");
    trainer(&[
        "export",
        "--checkpoint",
        p(&run),
        "--format",
        "torchvision",
        "--out",
        p(&exported),
    ]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&exported).unwrap().permissions().mode();
        assert_eq!(mode & 0o044, 0o044, "others can read the export: {mode:o}");
    }
    let bytes = std::fs::read(&exported).unwrap();
    // safetensors: an 8-byte header length, then a JSON header naming every tensor.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer4.1.bn2.bias",
    ] {
        assert!(header.get(key).is_some(), "{key} missing from the export");
    }
    assert!(header.get("fc.weight").is_none());
    // The metadata says which backbone this is and that no torchvision model has its width.
    let meta = &header["__metadata__"];
    assert_eq!(meta["arch"], "resnet18");
    assert_eq!(meta["stem"], "small");
    assert_eq!(meta["width"], "0.125");
    assert_eq!(meta["image_size"], "32");
    assert!(
        meta["torchvision"]
            .as_str()
            .unwrap()
            .starts_with("none: width 0.125"),
        "{meta}"
    );
    assert!(!header
        .as_object()
        .unwrap()
        .keys()
        .any(|k| k.starts_with("backbone.") || k.starts_with("projector")));
}

/// Also runs on one thread: the main thread is then rayon's only worker, beside the input
/// pipeline's own pool, and the run must still finish.
#[test]
fn pretraining_into_a_log_file_prints_periodic_progress_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(&d.join("data"), 2, 8, 40);
    pack(&d.join("data/train"), &d.join("train"));
    let (log, train, run) = (d.join("job.log"), d.join("train"), d.join("run"));
    let mut args = vec![
        "pretrain",
        "--preset",
        "byol-r18-small",
        "--data",
        p(&train),
        "--out",
        p(&run),
        "--set",
        "max_steps=4",
        "--log-every",
        "0",
    ];
    args.extend_from_slice(TINY);
    let file = std::fs::File::create(&log).unwrap();
    let status = Command::new(bin("trainer"))
        .env("RAYON_NUM_THREADS", "1")
        .args(&args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(
        lines.len(),
        4,
        "one line per step with --log-every 0:\n{text}"
    );
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("step {}/4 ", i + 1)), "{line}");
        for field in ["epoch", "loss", "lr", "views/s", "ETA"] {
            assert!(line.contains(field), "{line} lacks {field}");
        }
    }
}

#[test]
fn a_sigterm_checkpoints_and_the_resumed_run_ends_like_an_uninterrupted_one() {
    sigterm_then_resume(&[]);
}

#[test]
fn two_ranks_stop_together_on_a_sigterm_and_resume_like_an_uninterrupted_run() {
    sigterm_then_resume(&["--ranks", "2"]);
}

/// Pretrains with `extra` arguments three ways: uninterrupted; stopped by SIGTERM after a few
/// steps; resumed. The stopped run must say how to continue, and the resumed run end with the
/// uninterrupted run's bytes.
fn sigterm_then_resume(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(&d.join("data"), 3, 16, 40);
    pack(&d.join("data/train"), &d.join("train"));
    let train = d.join("train");
    let args = |out: &Path| {
        let mut a: Vec<String> = [
            "pretrain",
            "--preset",
            "byol-r18-small",
            "--data",
            p(&train),
            "--out",
            p(out),
            "--set",
            "max_steps=60",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(TINY.iter().chain(extra).map(|s| s.to_string()));
        a
    };
    let whole = d.join("whole");
    trainer(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());

    let split = d.join("split");
    let child = Command::new(bin("trainer"))
        .args(args(&split))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = split.join("metrics.jsonl");
    let started = std::time::Instant::now();
    let steps = || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
    while steps() < 5 && started.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run ended by itself: {err}");
    assert!(
        err.contains("stopped by a signal") && err.contains("--resume"),
        "{err}"
    );
    let stopped_at = steps();
    assert!(
        (5..60).contains(&stopped_at),
        "stopped after {stopped_at} steps"
    );

    let mut resume = args(&split);
    resume.push("--resume".into());
    trainer(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    let last = |run: &Path| run.join("checkpoints/step-00000060");
    for file in [
        "online.safetensors",
        "target.safetensors",
        "optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(last(&whole).join(file)).unwrap()
                == std::fs::read(last(&split).join(file)).unwrap(),
            "{file} differs from the uninterrupted run's"
        );
    }
}

#[test]
fn helpful_errors_for_wrong_use() {
    let dir = tempfile::tempdir().unwrap();
    // `trainer pretrain` on an empty folder with `preset` and `extra`: it must fail; its stderr.
    let failure = |preset: &str, extra: &[&str]| -> String {
        let out = Command::new(bin("trainer"))
            .args(["pretrain", "--preset", preset, "--data", p(dir.path())])
            .args(["--out", p(&dir.path().join("r"))])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = failure("nope", &[]);
    assert!(
        err.contains("maskdeep-r18-small"),
        "lists the presets: {err}"
    );
    let err = failure("maskdeep-r18-small", &["--device", "cuda"]);
    assert!(err.contains("--features cuda"), "{err}");
    // Several GPUs without NCCL in the build: the error says how to get it, and what CPUs can do.
    let err = failure("maskdeep-r18-small", &["--gpus", "2"]);
    assert!(
        err.contains("--features nccl") && err.contains("--ranks"),
        "{err}"
    );
}

/// Runs `trainer ARGS` with `MASKDEEP_ISA` set to `isa`, expecting success.
fn trainer_on(isa: &str, args: &[&str]) -> Output {
    let out = Command::new(bin("trainer"))
        .env("MASKDEEP_ISA", isa)
        .args(args)
        .output()
        .expect("run trainer");
    assert!(
        out.status.success(),
        "MASKDEEP_ISA={isa} trainer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn maskdeep_isa_picks_the_kernels_and_every_set_computes_the_same_step() {
    let widest = shared::cpu::Isa::widest().name();
    let bench = |isa: &str| {
        let mut args = vec!["bench", "--preset", "maskdeep-r18-small", "--steps", "1"];
        args.extend(["--json", "--batch", "4"]);
        args.extend(TINY);
        let out = trainer_on(isa, &args);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (report["kernels"].as_str().unwrap().to_string(), stderr)
    };
    assert_eq!(bench("portable").0, "portable");
    let (kernels, stderr) = bench("avx9000");
    assert_eq!(kernels, widest);
    assert!(
        stderr.contains("MASKDEEP_ISA=avx9000 is not one of portable, avx2, avx512"),
        "{stderr}"
    );

    // One MaskDeep forward and loss through every kernel of the encoder, with the portable
    // kernels and with each wider set: on AVX2 and AVX-512 the direct convolutions sum in their
    // own order, so there the losses agree with portable's within 1e-5, and with each other to
    // the last digit.
    // (The files' headers list tensors in no fixed order, so the printed losses are compared,
    // not the bytes.)
    let dir = tempfile::tempdir().unwrap();
    let case = |isa: &str| {
        let path = dir.path().join("case.safetensors");
        let mut args = vec!["step-case", "--preset", "maskdeep-r18-small", "--seed", "3"];
        args.extend(["--out", p(&path)]);
        args.extend(TINY);
        let stdout = String::from_utf8(trainer_on(isa, &args).stdout).unwrap();
        let losses = stdout.split_once("):").map(|(_, l)| l.trim().to_string());
        losses.unwrap_or_else(|| panic!("no losses in {stdout:?}"))
    };
    let numbers = |losses: &str| -> Vec<f64> {
        losses
            .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    let portable = case("portable");
    let mut direct = None;
    for isa in shared::cpu::Isa::supported() {
        if isa == shared::cpu::Isa::PORTABLE {
            continue;
        }
        let got = case(isa.name());
        let (a, b) = (numbers(&got), numbers(&portable));
        assert_eq!(a.len(), b.len(), "{got} against {portable}");
        assert!(a.len() >= 3, "three losses in {got}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs(),
                "{isa}: {got} against {portable}"
            );
        }
        let first = direct.get_or_insert_with(|| got.clone());
        assert_eq!(&got, first, "{isa} against the narrowest wide set");
    }
}
