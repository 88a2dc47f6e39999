//! The convolution's CUDA side on cuDNN (feature `cudnn`): cuDNN's forward, backward-data and
//! backward-filter calls on Candle's stream, instead of a backward made of forward convolutions
//! (whose weight gradient is a convolution with the whole output gradient as its filter, and whose
//! stride-2 input gradient spreads zeros). The descriptors and algorithms (cuDNN's heuristics, as
//! PyTorch without `cudnn.benchmark`) are made once per shape and thread; one workspace per thread
//! and device grows to the largest need. f32 (TF32 where cuDNN allows it; `NVIDIA_TF32_OVERRIDE=0`
//! turns it off), bf16 and f16 with f32 accumulation.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::Geometry;
use crate::ops::cuda_storage::{by_dtype, view, Elem};

/// An element type cuDNN convolves, and where its plans are kept.
trait ConvElem: Elem + CudnnDataType {
    /// Tensor cores for the half types; cuDNN's default (TF32 where allowed) for f32.
    const MATH: sys::cudnnMathType_t;
    fn plans(plans: &mut Plans) -> &mut HashMap<Key, Plan<Self>>;
}

impl ConvElem for f32 {
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_DEFAULT_MATH;
    fn plans(plans: &mut Plans) -> &mut HashMap<Key, Plan<Self>> {
        &mut plans.f32
    }
}

impl ConvElem for half::bf16 {
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
    fn plans(plans: &mut Plans) -> &mut HashMap<Key, Plan<Self>> {
        &mut plans.bf16
    }
}

impl ConvElem for half::f16 {
    const MATH: sys::cudnnMathType_t = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
    fn plans(plans: &mut Plans) -> &mut HashMap<Key, Plan<Self>> {
        &mut plans.f16
    }
}

/// One convolution's shape: input `[n, c_in, h, w]`, `c_out` square filters of the geometry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    input: [usize; 4],
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl Key {
    fn new(input: &Shape, weight: &Shape, g: Geometry) -> Result<Self> {
        let (n, c_in, h, w) = input.dims4()?;
        let (c_out, _, _, _) = weight.dims4()?;
        Ok(Key {
            input: [n, c_in, h, w],
            c_out,
            k: g.k,
            stride: g.stride,
            padding: g.padding,
        })
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            k: self.k,
            stride: self.stride,
            padding: self.padding,
        }
    }

    /// The output's shape.
    fn output(&self) -> [usize; 4] {
        let [n, _, h, w] = self.input;
        let g = self.geometry();
        [n, self.c_out, g.out(h), g.out(w)]
    }
}

/// The descriptors and chosen algorithms of one shape.
struct Plan<T> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    forward: sys::cudnnConvolutionFwdAlgo_t,
    backward_data: sys::cudnnConvolutionBwdDataAlgo_t,
    backward_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    /// Bytes of workspace the largest of the three needs.
    workspace: usize,
}

impl<T: ConvElem> Plan<T> {
    fn new(cudnn: &Arc<Cudnn>, key: &Key) -> Result<Self> {
        let dims = |d: [usize; 4]| d.map(|v| v as i32);
        let (p, s) = (key.padding as i32, key.stride as i32);
        let mode = sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
        let mut conv = cudnn.create_conv2d::<f32>([p, p], [s, s], [1, 1], mode)?;
        conv.set_math_type(T::MATH)?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let [_, c_in, _, _] = key.input;
        let x = cudnn.create_4d_tensor::<T>(nchw, dims(key.input))?;
        let w = cudnn.create_4d_filter::<T>(nchw, dims([key.c_out, c_in, key.k, key.k]))?;
        let y = cudnn.create_4d_tensor::<T>(nchw, dims(key.output()))?;
        let fwd = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        let bwd_data = ConvBackwardData {
            conv: &conv,
            dx: &x,
            w: &w,
            dy: &y,
        };
        let bwd_filter = ConvBackwardFilter {
            conv: &conv,
            x: &x,
            dw: &w,
            dy: &y,
        };
        let (forward, backward_data, backward_filter) = (
            fwd.pick_algorithm()?,
            bwd_data.pick_algorithm()?,
            bwd_filter.pick_algorithm()?,
        );
        let workspace = fwd
            .get_workspace_size(forward)?
            .max(bwd_data.get_workspace_size(backward_data)?)
            .max(bwd_filter.get_workspace_size(backward_filter)?);
        Ok(Plan {
            conv,
            x,
            w,
            y,
            forward,
            backward_data,
            backward_filter,
            workspace,
        })
    }
}

/// The plans of each element type.
#[derive(Default)]
struct Plans {
    f32: HashMap<Key, Plan<f32>>,
    bf16: HashMap<Key, Plan<half::bf16>>,
    f16: HashMap<Key, Plan<half::f16>>,
}

/// One thread's cuDNN state on one device: the handle (bound to Candle's stream), the plans and
/// the workspace.
struct State {
    cudnn: Arc<Cudnn>,
    plans: Plans,
    workspace: Option<CudaSlice<u8>>,
}

// cuDNN handles are neither Send nor Sync: one per thread, as Candle keeps its own.
thread_local! {
    static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
}

/// Calls `f` with the plan of `key` and a workspace large enough for it, on `dev`.
fn with_plan<T: ConvElem, R>(
    dev: &CudaDevice,
    key: Key,
    f: impl FnOnce(&Plan<T>, Option<&mut CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        let state = match states.entry(dev.id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(State {
                cudnn: Cudnn::new(dev.cuda_stream())?,
                plans: Plans::default(),
                workspace: None,
            }),
        };
        let State {
            cudnn,
            plans,
            workspace,
        } = state;
        let plan = match T::plans(plans).entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Plan::new(cudnn, &key)?),
        };
        if plan.workspace > workspace.as_ref().map_or(0, |w| w.len()) {
            // SAFETY: a workspace is scratch that cuDNN writes before it reads.
            *workspace = Some(unsafe { dev.alloc::<u8>(plan.workspace)? });
        }
        f(plan, workspace.as_mut())
    })
}

/// Whether cuDNN takes these arguments: one dtype, contiguous.
fn applicable(args: &[(&CudaStorage, &Layout)]) -> bool {
    let dtype = args[0].0.dtype();
    args.iter()
        .all(|(s, l)| s.dtype() == dtype && l.is_contiguous())
}

/// Convolves `x [n, c_in, h, w]` with `weight [c_out, c_in, k, k]`; `None` where cuDNN does not
/// apply (another dtype, mixed dtypes, strided arguments).
pub fn forward(
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    g: Geometry,
) -> Result<Option<(CudaStorage, Shape)>> {
    if !applicable(&[(xs, xl), (ws, wl)]) {
        return Ok(None);
    }
    by_dtype!(xs.dtype(), forward_as((xs, xl), (ws, wl), g))
}

fn forward_as<T: ConvElem>(
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    g: Geometry,
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let key = Key::new(xl.shape(), wl.shape(), g)?;
    let (x, w) = (view::<T>(xs, xl)?, view::<T>(ws, wl)?);
    let out = key.output();
    // SAFETY: cuDNN writes every element (beta = 0).
    let mut y = unsafe { dev.alloc::<T>(out.iter().product())? };
    with_plan::<T, _>(dev, key, |plan, workspace| {
        let op = ConvForward {
            conv: &plan.conv,
            x: &plan.x,
            w: &plan.w,
            y: &plan.y,
        };
        let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
        // SAFETY: the buffers match the plan's descriptors (dtype, NCHW shapes).
        unsafe { op.launch(plan.forward, workspace, (one, zero), &x, &w, &mut y) }?;
        Ok(())
    })?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from(out.to_vec()),
    ))
}

/// `(x, weight, dy)` -> `[dx (empty unless need_dx) | dweight]`, flat, in their dtype; `None`
/// where cuDNN does not apply.
pub fn backward(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    g: Geometry,
    need_dx: bool,
) -> Result<Option<(CudaStorage, Shape)>> {
    if !applicable(&[x, w, dy]) {
        return Ok(None);
    }
    by_dtype!(x.0.dtype(), backward_as(x, w, dy, g, need_dx))
}

fn backward_as<T: ConvElem>(
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    g: Geometry,
    need_dx: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = &xs.device;
    let key = Key::new(xl.shape(), wl.shape(), g)?;
    let (x, w, dy) = (view::<T>(xs, xl)?, view::<T>(ws, wl)?, view::<T>(gs, gl)?);
    let dx_len = if need_dx { xl.shape().elem_count() } else { 0 };
    let len = dx_len + wl.shape().elem_count();
    // SAFETY: cuDNN writes every element of both parts (beta = 0).
    let mut out = unsafe { dev.alloc::<T>(len)? };
    with_plan::<T, _>(dev, key, |plan, mut workspace| {
        let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
        if need_dx {
            let op = ConvBackwardData {
                conv: &plan.conv,
                dx: &plan.x,
                w: &plan.w,
                dy: &plan.y,
            };
            let mut dx = out.slice_mut(..dx_len);
            let ws = workspace.as_deref_mut();
            // SAFETY: the buffers match the plan's descriptors.
            unsafe { op.launch(plan.backward_data, ws, (one, zero), &mut dx, &w, &dy) }?;
        }
        let op = ConvBackwardFilter {
            conv: &plan.conv,
            x: &plan.x,
            dw: &plan.w,
            dy: &plan.y,
        };
        let mut dw = out.slice_mut(dx_len..);
        // SAFETY: the buffers match the plan's descriptors.
        unsafe {
            op.launch(
                plan.backward_filter,
                workspace,
                (one, zero),
                &x,
                &mut dw,
                &dy,
            )
        }?;
        Ok(())
    })?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(len),
    ))
}
