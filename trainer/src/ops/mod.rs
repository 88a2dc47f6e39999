//! The kernels, as autograd ops. Each family is a folder: `mod.rs` holds the op, the one node that
//! the layers call on every device, which picks its kernel from the storage it is given; `cpu.rs`
//! the CPU kernels; `reference.rs` the same arithmetic as plain tensor ops, which the tests compare
//! against and which a device runs (through [`portable`]) where no kernel of its own applies. The
//! CUDA side is `cuda.rs` (feature `cuda`; own kernels in `cuda.cu`, which build.rs compiles to
//! PTX; cuDNN calls under feature `cudnn`), called from the op's `cuda_fwd`.

pub mod batch_norm;
pub mod conv;
pub mod cpu_storage;
#[cfg(feature = "cuda")]
pub mod cuda_storage;
pub mod lanes;
pub mod linear;
pub mod max_pool;
pub mod portable;
pub mod update;
