//! Listing a dataset's image files and their labels, in a fixed order.
//!
//! Two layouts are read: ImageNet's training layout `SRC/<class>/<image>` (class index = position
//! of the folder name in sorted order) and a flat folder with a label file (ImageNet's
//! `LOC_val_solution.csv`, or a plain `relative/path,class_name` CSV).

use crate::error::{Error, IoContext, Result};
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// File extensions taken as images (compared case-insensitively). The format itself is then
/// detected from the content.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// One input file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// Path relative to the dataset root, with `/` separators.
    pub rel: String,
    /// Class index into [`SourceList::classes`], if labelled.
    pub label: Option<u32>,
}

/// Every input file of a dataset, in the order records are written.
#[derive(Clone, Debug)]
pub struct SourceList {
    /// The dataset root.
    pub root: PathBuf,
    /// Class names; a label is an index into this list.
    pub classes: Vec<String>,
    /// Files sorted by class, then by path.
    pub files: Vec<SourceFile>,
    /// Files found beside them that were left out for not having an image extension.
    pub not_images: u64,
}

impl SourceList {
    /// The absolute path of file `i`.
    pub fn path(&self, i: usize) -> PathBuf {
        self.root.join(&self.files[i].rel)
    }

    /// A fingerprint of the list (paths and labels), to check a resumed job sees the same input.
    pub fn fingerprint(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for c in &self.classes {
            h.update(c.as_bytes());
            h.update(b"\n");
        }
        for f in &self.files {
            h.update(f.rel.as_bytes());
            h.update(&f.label.unwrap_or(u32::MAX).to_le_bytes());
        }
        h.finalize()
    }
}

fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        // Follow symlinks, as datasets are often linked in.
        let is_dir = fs::metadata(&path).at(&path)?.is_dir();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        out.push((name, path, is_dir));
    }
    out.sort();
    Ok(out)
}

/// Appends the images under `dir` (recursively) to `out` as `prefix`-relative paths; returns how
/// many other files it passed over.
fn collect_images(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<u64> {
    let mut others = 0;
    for (name, path, is_dir) in read_dir_sorted(dir)? {
        let rel = format!("{prefix}{name}");
        if is_dir {
            others += collect_images(&path, &format!("{rel}/"), out)?;
        } else if is_image_name(&path) {
            out.push(rel);
        } else {
            others += 1;
        }
    }
    Ok(others)
}

fn check_root(root: &Path) -> Result<()> {
    if !root.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a folder (give the dataset root, e.g. .../train)",
            root.display()
        )));
    }
    Ok(())
}

/// Lists `root/<class>/**/<image>`; class folders sorted by name give the class indices.
pub fn list_class_folders(root: &Path) -> Result<SourceList> {
    check_root(root)?;
    let mut classes = Vec::new();
    let mut files = Vec::new();
    let (mut not_images, mut loose_images) = (0, 0);
    for (name, path, is_dir) in read_dir_sorted(root)? {
        if !is_dir {
            if is_image_name(&path) {
                loose_images += 1;
            } else {
                not_images += 1;
            }
            continue;
        }
        let label = classes.len() as u32;
        let mut rels = Vec::new();
        not_images += collect_images(&path, &format!("{name}/"), &mut rels)?;
        files.extend(rels.into_iter().map(|rel| SourceFile {
            rel,
            label: Some(label),
        }));
        classes.push(name);
    }
    if files.is_empty() {
        let hint = if loose_images > 0 {
            format!(
                "; it holds {loose_images} images directly: a flat folder needs --labels FILE \
                 (e.g. LOC_val_solution.csv) for its classes, or --unlabelled"
            )
        } else {
            String::new()
        };
        return Err(Error::Invalid(format!(
            "{}: no images found in class folders (expected {}/<class>/<image>.jpg){hint}",
            root.display(),
            root.display()
        )));
    }
    Ok(SourceList {
        root: root.to_path_buf(),
        classes,
        files,
        not_images,
    })
}

/// Lists every image under `root` (recursively) without labels, for unlabelled pretraining data.
pub fn list_unlabelled(root: &Path) -> Result<SourceList> {
    check_root(root)?;
    let mut rels = Vec::new();
    let not_images = collect_images(root, "", &mut rels)?;
    if rels.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no images found",
            root.display()
        )));
    }
    Ok(SourceList {
        root: root.to_path_buf(),
        classes: Vec::new(),
        files: rels
            .into_iter()
            .map(|rel| SourceFile { rel, label: None })
            .collect(),
        not_images,
    })
}

/// Lists the files named in a label file under the flat folder `root`.
///
/// `labels` is either ImageNet's `LOC_val_solution.csv` (header `ImageId,PredictionString`; the
/// class is the first word of the prediction string; the file is found by its stem) or a plain CSV
/// of `relative/path,class_name` lines (an optional `path,class` or `path,label` header is
/// skipped). `classes`, when given, fixes the class list (for example the training set's, so
/// that indices agree); otherwise the sorted distinct names in the file are used.
pub fn list_labelled_folder(
    root: &Path,
    labels: &Path,
    classes: Option<Vec<String>>,
) -> Result<SourceList> {
    check_root(root)?;
    let text = fs::read_to_string(labels).at(labels)?;
    let bad =
        |line: usize, msg: &str| Error::Invalid(format!("{}:{line}: {msg}", labels.display()));
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let first = lines
        .next()
        .ok_or_else(|| bad(1, "the label file is empty"))?;
    let header = first.1.trim().to_ascii_lowercase();
    let imagenet = header.starts_with("imageid,");
    let skip_first = imagenet || header == "path,class" || header == "path,label";
    let mut pairs = Vec::new();
    for (no, line) in std::iter::once(first).filter(|_| !skip_first).chain(lines) {
        let (name, rest) = line
            .split_once(',')
            .ok_or_else(|| bad(no + 1, "expected `path,class` on every line"))?;
        let class = if imagenet {
            rest.split_whitespace().next().unwrap_or("")
        } else {
            rest.trim()
        };
        if name.trim().is_empty() || class.is_empty() {
            return Err(bad(no + 1, "empty path or class"));
        }
        pairs.push((name.trim().to_string(), class.to_string()));
    }
    let classes = match classes {
        Some(c) => c,
        None => pairs
            .iter()
            .map(|(_, c)| c.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let index: HashMap<&str, u32> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u32))
        .collect();
    // ImageNet's ids have no extension: map each image's stem to its file name.
    let stems: HashMap<String, String> = if imagenet {
        let mut names = Vec::new();
        collect_images(root, "", &mut names)?; // Other files are not listed by the label file.
        names
            .into_iter()
            .map(|n| {
                let stem = Path::new(&n)
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                (stem, n)
            })
            .collect()
    } else {
        HashMap::new()
    };
    let mut files = Vec::with_capacity(pairs.len());
    for (name, class) in pairs {
        let label = *index.get(class.as_str()).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: class `{class}` of `{name}` is not in the class list",
                labels.display()
            ))
        })?;
        // A listed file that is missing stays in the list and is reported as a failure when read.
        let rel = stems.get(&name).cloned().unwrap_or(name);
        files.push(SourceFile {
            rel,
            label: Some(label),
        });
    }
    files.sort_by(|a, b| (a.label, &a.rel).cmp(&(b.label, &b.rel)));
    if files.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: lists no image",
            labels.display()
        )));
    }
    Ok(SourceList {
        root: root.to_path_buf(),
        classes,
        files,
        // The label file names the files: nothing else in the folder is considered.
        not_images: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"x").unwrap();
    }

    #[test]
    fn class_folders_sorted_and_extensions_case_insensitive() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "b/2.JPEG",
            "b/1.jpg",
            "a/x.PNG",
            "a/notes.txt",
            "c/.hidden.jpg",
            "a/sub/y.webp",
        ] {
            touch(&d.path().join(f));
        }
        let list = list_class_folders(d.path()).unwrap();
        assert_eq!(list.classes, vec!["a", "b", "c"]);
        let got: Vec<_> = list
            .files
            .iter()
            .map(|f| (f.rel.as_str(), f.label))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a/sub/y.webp", Some(0)),
                ("a/x.PNG", Some(0)),
                ("b/1.jpg", Some(1)),
                ("b/2.JPEG", Some(1))
            ]
        );
    }

    #[test]
    fn imagenet_val_solution_and_plain_csv() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("ILSVRC2012_val_00000001.JPEG"));
        touch(&d.path().join("ILSVRC2012_val_00000002.JPEG"));
        let csv = d.path().join("LOC_val_solution.csv");
        fs::write(
            &csv,
            "ImageId,PredictionString\nILSVRC2012_val_00000002,n02 1 2 3 4 n02 5 6 7 8\nILSVRC2012_val_00000001,n01 1 2 3 4\n",
        )
        .unwrap();
        let list = list_labelled_folder(d.path(), &csv, None).unwrap();
        assert_eq!(list.classes, vec!["n01", "n02"]);
        assert_eq!(
            list.files[0],
            SourceFile {
                rel: "ILSVRC2012_val_00000001.JPEG".into(),
                label: Some(0)
            }
        );
        assert_eq!(list.files[1].label, Some(1));

        let plain = d.path().join("labels.csv");
        fs::write(&plain, "path,class\nILSVRC2012_val_00000001.JPEG,dog\n").unwrap();
        let classes = Some(vec!["cat".to_string(), "dog".to_string()]);
        let list = list_labelled_folder(d.path(), &plain, classes).unwrap();
        assert_eq!(
            list.files,
            vec![SourceFile {
                rel: "ILSVRC2012_val_00000001.JPEG".into(),
                label: Some(1)
            }]
        );

        fs::write(&plain, "a.jpg,bird\n").unwrap();
        let err = list_labelled_folder(d.path(), &plain, Some(vec!["cat".into()])).unwrap_err();
        assert!(err.to_string().contains("bird"), "{err}");
    }

    #[test]
    fn unlabelled_lists_everything_recursively() {
        let d = tempfile::tempdir().unwrap();
        for f in ["b.jpg", "a/c.png", "z.txt"] {
            touch(&d.path().join(f));
        }
        let list = list_unlabelled(d.path()).unwrap();
        assert!(list.classes.is_empty());
        let got: Vec<_> = list
            .files
            .iter()
            .map(|f| (f.rel.as_str(), f.label))
            .collect();
        assert_eq!(got, vec![("a/c.png", None), ("b.jpg", None)]);
    }

    #[test]
    fn missing_or_empty_root_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let err = list_class_folders(d.path()).unwrap_err().to_string();
        assert!(err.contains("no images found"), "{err}");
        let err = list_class_folders(&d.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("not a folder"),
            "{err}"
        );
    }
}
