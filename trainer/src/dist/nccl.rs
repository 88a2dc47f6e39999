//! The collective of a multi-GPU job: one process per GPU, NVIDIA's NCCL between them (over
//! NVLink, InfiniBand or TCP, whichever NCCL finds). Rank 0 makes NCCL's unique id and hands it
//! to the others through [`super::rendezvous`]; every collective then runs on Candle's CUDA stream,
//! so it is ordered with the kernels around it and nothing waits on the host.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Result, Storage, Tensor, WithDType};

use super::launch::RankEnv;
use super::{rendezvous, Collective, Group};
use crate::error::Error;

/// How long the rendezvous waits for every rank to arrive.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// NCCL's communicator, used by one call at a time.
struct Communicator(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap;
// the mutex in `NcclRank` serialises them.
unsafe impl Send for Communicator {}

/// One rank of an NCCL group.
pub struct NcclRank {
    comm: Mutex<Communicator>,
    device: CudaDevice,
    rank: usize,
    world: usize,
}

/// Joins the group `env` describes on `device` (this rank's GPU): rank 0 makes the id and serves
/// it at `env.master`, the others fetch it, then every rank joins NCCL's communicator.
pub fn join(env: &RankEnv, device: &Device) -> crate::error::Result<Group> {
    let cuda = device.as_cuda_device().map_err(|_| {
        Error::Device("a job of several ranks runs on GPUs: use --device cuda".into())
    })?;
    let nccl = |e| Error::Device(format!("NCCL: {e:?}"));
    let id = if env.rank == 0 {
        let id = Id::new().map_err(nccl)?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        rendezvous::serve(&env.master, env.world_size, &bytes, RENDEZVOUS_TIMEOUT)?;
        id
    } else {
        let bytes = rendezvous::join(&env.master, env.rank, RENDEZVOUS_TIMEOUT)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(Error::Run(format!(
                "rendezvous: rank 0 sent {} bytes, not NCCL's 128-byte id",
                bytes.len()
            )));
        }
        internal
            .iter_mut()
            .zip(&bytes)
            .for_each(|(c, &b)| *c = b as std::ffi::c_char);
        Id::uninit(internal)
    };
    let comm = Comm::from_rank(cuda.cuda_stream(), env.rank, env.world_size, id).map_err(nccl)?;
    Ok(Arc::new(NcclRank {
        comm: Mutex::new(Communicator(comm)),
        device: cuda.clone(),
        rank: env.rank,
        world: env.world_size,
    }))
}

/// What one call does with the values.
enum Call {
    Sum,
    Broadcast(usize),
}

impl NcclRank {
    /// Runs `call` on `t`'s values, in f64 when `t` is f64 (BatchNorm's sums of squares, whose
    /// variance would cancel in f32), else in f32, and returns the result shaped and typed like `t`.
    fn run(&self, t: &Tensor, call: Call) -> Result<Tensor> {
        match t.dtype() {
            DType::F64 => self.run_as::<f64>(t, call),
            dtype => self.run_as::<f32>(t, call)?.to_dtype(dtype),
        }
    }

    fn run_as<T: NcclType + CudaDType + WithDType + DeviceRepr>(
        &self,
        t: &Tensor,
        call: Call,
    ) -> Result<Tensor> {
        let flat = t.flatten_all()?.to_dtype(T::DTYPE)?.contiguous()?;
        let n = flat.elem_count();
        let (storage, layout) = flat.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("NCCL: the tensor is not on the GPU");
        };
        let start = layout.start_offset();
        let src = cuda.as_cuda_slice::<T>()?.slice(start..start + n);
        // SAFETY: NCCL writes every element of `out` before it is read.
        let mut out: CudaSlice<T> = unsafe { self.device.alloc::<T>(n)? };
        let comm = self
            .comm
            .lock()
            .map_err(|_| candle_core::Error::Msg("NCCL: a previous call panicked".into()))?;
        let status = match call {
            Call::Sum => comm.0.all_reduce(&src, &mut out, &ReduceOp::Sum),
            Call::Broadcast(root) => {
                let send = (self.rank == root).then_some(&src);
                comm.0.broadcast(send, &mut out, root as i32)
            }
        };
        status
            .map_err(|e| candle_core::Error::Msg(format!("NCCL on rank {}: {e:?}", self.rank)))?;
        drop(comm);
        drop(storage);
        let storage = CudaStorage::wrap_cuda_slice(out, self.device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            t.shape(),
            BackpropOp::none(),
            false,
        ))
    }
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// Sums through the GPU in f32 (on a GPU rank, BatchNorm's sums are device tensors and do
    /// not come here).
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        let device = Device::Cuda(self.device.clone());
        let t = Tensor::from_slice(values, values.len(), &device)?;
        let sum = self.run(&t, Call::Sum)?.to_vec1::<f64>()?;
        values.copy_from_slice(&sum);
        Ok(())
    }

    fn all_reduce(&self, t: &Tensor) -> Result<Tensor> {
        self.run(t, Call::Sum)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.run(t, Call::Broadcast(root))
    }

    fn abort(&self, reason: &str) {
        // The process exits after this; its launcher (`--gpus`, torchrun, srun) stops the others.
        eprintln!("rank {} stops: {reason}", self.rank);
    }
}
