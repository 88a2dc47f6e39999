//! The kernels, as autograd ops. Each family is a folder: `mod.rs` holds the op, the one node that
//! the layers call on every device, which picks its kernel from the storage it is given; `cpu.rs`
//! the CPU kernels; `reference.rs` the same arithmetic as plain tensor ops, which the tests compare
//! against and which the CUDA side runs (through [`portable`]) until its own kernels land. A new
//! CUDA kernel goes into the family's folder as `cuda.rs`, called from the op's `cuda_fwd`.

pub mod batch_norm;
pub mod conv;
pub mod cpu_storage;
pub mod lanes;
pub mod max_pool;
pub mod portable;
pub mod update;
