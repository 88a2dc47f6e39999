//! Hierarchical deep-masking: visible cells sampled on one level's grid (by default the coarsest
//! masked level's), upsampled (nearest) to finer levels and averaged onto coarser ones, and
//! masked mean pooling as one batched matrix product.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;

/// Visible cells on a coarse grid for `rows` feature maps and `groups` groups each:
/// `visible[(row * groups + g) * cells + cell]`.
#[derive(Clone, Debug)]
pub struct VisibleCells {
    pub rows: usize,
    pub groups: usize,
    pub grid: (usize, usize),
    pub visible: Vec<bool>,
}

/// `K = max(1, round(ratio * cells))`.
pub fn visible_count(ratio: f64, cells: usize) -> usize {
    ((ratio * cells as f64).round() as usize).clamp(1, cells)
}

impl VisibleCells {
    /// Samples, for every (row, group), an independent uniform subset of exactly
    /// `visible_count(ratio, h * w)` cells; row `r`'s from its own stream `rng_of_row(r)`, so
    /// that a row's cells do not depend on which other rows are drawn with it (data-parallel
    /// ranks and accumulated micro-batches draw what one whole batch would).
    pub fn sample<R: Rng>(
        mut rng_of_row: impl FnMut(usize) -> R,
        rows: usize,
        groups: usize,
        grid: (usize, usize),
        ratio: f64,
    ) -> Self {
        let mut cells = Self::all(rows, groups, grid);
        let mut order = Vec::new();
        for (r, row) in cells
            .visible
            .chunks_mut(groups * grid.0 * grid.1)
            .enumerate()
        {
            draw_row(&mut rng_of_row(r), row, groups, ratio, &mut order);
        }
        cells
    }

    /// All cells visible (masking off).
    pub fn all(rows: usize, groups: usize, grid: (usize, usize)) -> Self {
        VisibleCells {
            rows,
            groups,
            grid,
            visible: vec![true; rows * groups * grid.0 * grid.1],
        }
    }

    /// The row-normalised pooling matrix `[rows, groups, h * w]` on a level whose grid is `(h, w)`.
    /// On a level at least as fine as the mask grid, a cell is visible when the grid cell it lies
    /// in is (nearest upsampling); on a coarser level, a cell weighs the visible share of the grid
    /// cells it covers (area downsampling). Each row averages its cells by those weights.
    pub fn pooling_weights(&self, (h, w): (usize, usize)) -> Vec<f32> {
        let (hc, wc) = self.grid;
        let cells = hc * wc;
        let mut out = Vec::with_capacity(self.rows * self.groups * h * w);
        for coarse in self.visible.chunks(cells) {
            let start = out.len();
            for i in 0..h {
                let rows = covered(i, h, hc);
                for j in 0..w {
                    let cols = covered(j, w, wc);
                    let on = rows
                        .clone()
                        .flat_map(|r| cols.clone().map(move |c| r * wc + c))
                        .filter(|&cell| coarse[cell])
                        .count();
                    out.push(on as f32 / (rows.len() * cols.len()) as f32);
                }
            }
            let row = &mut out[start..];
            let n = row.iter().sum::<f32>().max(f32::MIN_POSITIVE);
            row.iter_mut().for_each(|v| *v /= n);
        }
        out
    }

    /// [`Self::pooling_weights`] as a tensor of `dtype` on `device`.
    pub fn pooling_tensor(
        &self,
        grid: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let w = self.pooling_weights(grid);
        Tensor::from_vec(w, (self.rows, self.groups, grid.0 * grid.1), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

/// The mask grid's cells along one axis that cell `i` of a level `n` cells long covers, on a grid
/// `grid` cells long: the one it lies in when the level is at least as fine, else the block it
/// spans (as adaptive average pooling bounds it).
fn covered(i: usize, n: usize, grid: usize) -> std::ops::Range<usize> {
    if n >= grid {
        let c = i * grid / n;
        c..c + 1
    } else {
        i * grid / n..((i + 1) * grid).div_ceil(n)
    }
}

/// Draws one row's visible cells for each of its `groups` (`row` holds `groups` grids, all
/// visible on entry), using `order` as scratch.
fn draw_row(
    rng: &mut impl Rng,
    row: &mut [bool],
    groups: usize,
    ratio: f64,
    order: &mut Vec<usize>,
) {
    let cells = row.len() / groups;
    let k = visible_count(ratio, cells);
    for chunk in row.chunks_mut(cells) {
        chunk.fill(false);
        order.clear();
        order.extend(0..cells);
        // Partial Fisher-Yates: the first k entries of `order` become a uniform k-subset.
        for i in 0..k {
            let j = rng.random_range(i..cells);
            order.swap(i, j);
            chunk[order[i]] = true;
        }
    }
}

/// Masked mean pooling: `features [n, c, h, w]` and `weights [n, g, h*w]` give `[n, g, c]`, as one
/// batched matrix product.
pub fn masked_pool(features: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = features.dims4()?;
    let f = features.reshape((n, c, h * w))?.transpose(1, 2)?;
    weights.matmul(&f.contiguous()?)
}
