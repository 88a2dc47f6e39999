//! f64 sums in a fixed number of interleaved partial sums: element `i` of a slice goes into
//! partial `i % LANES`, and the partials are combined in one fixed order. The compiler can keep
//! the partials in vector registers (a plain running sum would be one long chain of dependent
//! adds), and the result depends neither on the instruction set nor on the thread schedule.

/// Partial sums per accumulator: four AVX-512 vectors of f64, so that four chains of
/// dependent adds run side by side.
pub const LANES: usize = 32;

/// [`LANES`] running f64 sums.
#[derive(Clone, Copy, Default)]
pub struct Lanes([f64; LANES]);

impl Lanes {
    /// Adds `f(x)` for each element of `xs`, element `i` into partial `i % LANES`.
    #[inline(always)]
    pub fn add(&mut self, xs: &[f32], f: impl Fn(f32) -> f64) {
        let mut chunks = xs.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (acc, &x) in self.0.iter_mut().zip(chunk) {
                *acc += f(x);
            }
        }
        for (acc, &x) in self.0.iter_mut().zip(chunks.remainder()) {
            *acc += f(x);
        }
    }

    /// Adds `f(a, b)` for the elements of two slices of one length, as [`Lanes::add`].
    #[inline(always)]
    pub fn add2(&mut self, (a, b): (&[f32], &[f32]), f: impl Fn(f32, f32) -> f64) {
        self.add3((a, b, b), |a, b, _| f(a, b));
    }

    /// Adds `f(a, b, c)` for the elements of three slices of one length, as [`Lanes::add`].
    #[inline(always)]
    pub fn add3(&mut self, (a, b, c): (&[f32], &[f32], &[f32]), f: impl Fn(f32, f32, f32) -> f64) {
        let n = a.len().min(b.len()).min(c.len());
        let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
        let whole = n / LANES * LANES;
        for at in (0..whole).step_by(LANES) {
            let (a, b, c) = (&a[at..at + LANES], &b[at..at + LANES], &c[at..at + LANES]);
            for (i, acc) in self.0.iter_mut().enumerate() {
                *acc += f(a[i], b[i], c[i]);
            }
        }
        for (i, acc) in self.0.iter_mut().enumerate().take(n - whole) {
            *acc += f(a[whole + i], b[whole + i], c[whole + i]);
        }
    }

    /// The total: the second half of the partials added onto the first, and again, down to
    /// one (a fixed order).
    #[inline(always)]
    pub fn total(&self) -> f64 {
        let mut p = self.0;
        let mut len = LANES;
        while len > 1 {
            len /= 2;
            for i in 0..len {
                p[i] += p[i + len];
            }
        }
        p[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_element_once_whatever_the_length() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 64, 101] {
            let xs: Vec<f32> = (1..=n).map(|i| i as f32).collect();
            let mut one = Lanes::default();
            one.add(&xs, |x| x as f64);
            assert_eq!(one.total(), (n * (n + 1) / 2) as f64, "n = {n}");
            let mut three = Lanes::default();
            three.add3((&xs, &xs, &xs), |a, b, c| (a * b - c) as f64);
            let want: f64 = xs.iter().map(|&x| (x * x - x) as f64).sum();
            assert_eq!(three.total(), want, "n = {n}");
        }
    }
}
