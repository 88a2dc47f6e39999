//! Progress bars on standard error (hidden when it is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting items, with rate and ETA.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let style =
        ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} {per_sec:>12} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> ");
    ProgressBar::new(total)
        .with_style(style)
        .with_prefix(what.to_string())
}

/// A bar counting bytes, with throughput and ETA.
pub fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>7} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec:>12} ETA {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    ProgressBar::new(total)
        .with_style(style)
        .with_prefix(what.to_string())
}
