//! The stem's max-pool as plain tensor ops, on any device and dtype: the tests' reference and the
//! CUDA side until its kernels land. The forward takes the maximum over shifted strided views
//! (Candle's pools have no backward for kernel != stride), some twenty graph nodes; the backward
//! is autograd's gradient of it.

use candle_core::{Result, Tensor, Var};

/// The pool of `x` (values >= 0), from shifted strided views and `maximum`.
pub fn forward(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = (out(h), out(w));
    // Padded so that every shift 0..3 can take 2*out rows: 1 before, the rest after.
    let x = x
        .pad_with_zeros(2, 1, 2 * ho + 1 - h)?
        .pad_with_zeros(3, 1, 2 * wo + 1 - w)?;
    let rows = max_of_shifts(&x, 2, ho)?;
    max_of_shifts(&rows, 3, wo)
}

/// Max over shifts 0, 1, 2 along `dim` of every second element, `out` elements each.
fn max_of_shifts(x: &Tensor, dim: usize, out: usize) -> Result<Tensor> {
    let mut best: Option<Tensor> = None;
    for shift in 0..3 {
        let s = x.narrow(dim, shift, 2 * out)?;
        let mut dims = s.dims().to_vec();
        dims[dim] = out;
        dims.insert(dim + 1, 2);
        let s = s.reshape(dims)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?;
        best = Some(match best {
            None => s,
            Some(b) => b.maximum(&s)?,
        });
    }
    Ok(best.expect("three shifts"))
}

/// Output size along a dimension of `n`.
pub fn out(n: usize) -> usize {
    (n - 1) / 2 + 1
}

/// The gradient of `x` for output gradient `dy`.
pub fn backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let xv = Var::from_tensor(x)?;
    let grads = (forward(xv.as_tensor())? * dy)?.sum_all()?.backward()?;
    match grads.get(xv.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => x.zeros_like(),
    }
}
