//! Every op against its reference, on every (device, dtype) case of [`common::cases`]: the CPU
//! kernels, the reference path inside the op (the route CUDA takes until its kernels land), and
//! CUDA when the build has the feature and a GPU is present. One test binary, so that the GPU
//! check carries one per CUDA build.

mod batch_norm;
mod common;
mod conv;
mod fused;
mod isa;
mod max_pool;
mod update;
