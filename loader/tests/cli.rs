//! The command line explains itself. (Being an integration test of this package, it also makes
//! `cargo test --workspace` build the `loader` binary that the end-to-end tests in `tests/` run.)

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_loader"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_lists_every_command_and_option() {
    let top = help(&["--help"]);
    for cmd in [
        "synth", "pack", "merge", "verify", "inspect", "views", "bench", "import",
    ] {
        assert!(top.contains(cmd), "--help misses {cmd}");
    }
    let pack = help(&["pack", "--help"]);
    for opt in [
        "--labels",
        "--short-side",
        "--max-side",
        "--keep-size",
        "--encoding",
        "--quality",
        "--max-pixels",
        "--shard-size",
        "--threads",
        "--part",
        "--strict",
        "--json",
    ] {
        assert!(pack.contains(opt), "pack --help misses {opt}");
    }
}

#[test]
fn bad_option_values_are_refused_with_a_message() {
    for (args, needle) in [
        (
            &["pack", "x", "--out", "y", "--part", "2/2"][..],
            "0 <= I < N",
        ),
        (&["pack", "x", "--out", "y", "--shard-size", "lots"], "512M"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_loader"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}"
        );
    }
}
