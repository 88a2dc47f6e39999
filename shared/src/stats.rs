//! Summaries of repeated measurements, for the benchmarks of both binaries.

/// The median of `values` (the upper one of an even count; NaN for none), the figure every
/// benchmark reports on a shared, noisy machine.
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
