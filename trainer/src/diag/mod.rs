//! Diagnostics: step timing (`trainer bench`), per-convolution timing (`trainer bench convs`), kNN
//! timing (`trainer bench knn`), CPU-versus-device
//! parity (`trainer parity`), a loss written out for other implementations (`trainer step-case`)
//! and training curves (`trainer plot`).

pub mod bench;
pub mod conv_bench;
pub mod knn_bench;
pub mod parity;
pub mod plot;
pub mod step_case;
