//! `loader import` on tiny inputs made here: an IDX pair and a folder tree of cut-outs.

use std::path::Path;
use std::process::Command;

fn loader(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loader"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = loader(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An IDX file of unsigned bytes with the given dimensions.
fn idx(path: &Path, dims: &[u32], body: &[u8]) {
    let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(body);
    std::fs::write(path, bytes).unwrap();
}

/// Image files under `dir`, relative and sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn idx_files_become_split_class_folders_of_the_same_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 20 images of 2 x 3 pixels: image i is filled with i, labelled i % 2.
    let body: Vec<u8> = (0..20u8).flat_map(|i| [i; 6]).collect();
    idx(&d.join("images"), &[20, 2, 3], &body);
    idx(
        &d.join("labels"),
        &[20],
        &(0..20u8).map(|i| i % 2).collect::<Vec<_>>(),
    );
    let (images, labels, out) = (d.join("images"), d.join("labels"), d.join("out"));
    let args = |extra: &[&str]| {
        let mut a = vec![
            "import",
            "idx",
            "--images",
            images.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let said = run(&["--val", "0.2", "--test", "0.2"]);
    assert!(said.contains("12 train, 4 val, 4 test"), "{said}");
    let written = files(&out);
    assert_eq!(written.len(), 20);
    for split in ["train", "val", "test"] {
        for class in ["0", "1"] {
            let n = written
                .iter()
                .filter(|f| f.starts_with(&format!("{split}/{class}/")))
                .count();
            assert_eq!(n, if split == "train" { 6 } else { 2 }, "{split}/{class}");
        }
    }
    // Every file holds its image's pixels, in the class of its label.
    for f in &written {
        let img = image::open(out.join(f)).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (3, 2));
        let i: u8 = f.rsplit('/').next().unwrap()[..2].parse().unwrap();
        assert!(img.pixels().all(|p| p.0[0] == i), "{f}");
        assert!(f.contains(&format!("/{}/", i % 2)), "{f}");
    }
    // The same command writes the same split.
    std::fs::remove_dir_all(&out).unwrap();
    run(&["--val", "0.2", "--test", "0.2"]);
    assert_eq!(files(&out), written);
    // --limit and --all-to.
    std::fs::remove_dir_all(&out).unwrap();
    let said = run(&["--limit", "4", "--all-to", "test"]);
    assert!(said.contains("0 train, 0 val, 4 test"), "{said}");
    // A damaged file is named.
    std::fs::write(&labels, [0u8, 0, 0x08, 1, 0, 0, 0, 20, 1, 2]).unwrap();
    let out = loader(&args(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("labels") && err.contains("header"), "{err}");
}

#[test]
fn folder_trees_of_cut_outs_become_opaque_split_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("stamps");
    // animals: 5 cut-outs (one in a subfolder) and a drawing under cartoon/; food: 2 images.
    let cut_out = image::RgbaImage::from_fn(4, 4, |x, _| {
        image::Rgba(if x < 2 {
            [0, 0, 0, 0]
        } else {
            [10, 200, 30, 255]
        })
    });
    for rel in [
        "animals/a.png",
        "animals/b.png",
        "animals/c.png",
        "animals/d.png",
        "animals/birds/e.png",
        "animals/cartoon/x.png",
        "food/f.png",
        "food/g.png",
    ] {
        std::fs::create_dir_all(src.join(rel).parent().unwrap()).unwrap();
        cut_out.save(src.join(rel)).unwrap();
    }
    let out = dir.path().join("out");
    let said = ok(&[
        "import",
        "folders",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--exclude",
        "cartoon",
        "--min-per-class",
        "3",
        "--val",
        "0.2",
        "--test",
        "0.2",
        "--background",
        "0,0,255",
    ]);
    assert!(said.contains("wrote 1 classes"), "{said}");
    assert!(said.contains("3 train, 1 val, 1 test"), "{said}");
    let written = files(&out);
    assert!(
        written.iter().all(|f| f.contains("/animals/")),
        "{written:?}"
    );
    assert!(
        written.iter().any(|f| f.ends_with("animals/birds-e.png")),
        "{written:?}"
    );
    assert!(
        !written.iter().any(|f| f.contains("x.png")),
        "cartoon/ left out"
    );
    let img = image::open(out.join(&written[0])).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8, "opaque");
    let img = img.to_rgb8();
    assert_eq!(
        img.get_pixel(0, 0).0,
        [0, 0, 255],
        "background behind transparency"
    );
    assert_eq!(img.get_pixel(3, 0).0, [10, 200, 30]);
    // What `loader pack` needs next: the split folders pack with the same classes.
    for split in ["train", "val", "test"] {
        ok(&[
            "pack",
            out.join(split).to_str().unwrap(),
            "--out",
            dir.path().join(format!("shards-{split}")).to_str().unwrap(),
        ]);
    }
}
