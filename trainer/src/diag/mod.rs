//! Diagnostics: step timing (`trainer bench`), CPU-versus-device parity (`trainer parity`) and
//! training curves (`trainer plot`).

pub mod bench;
pub mod parity;
pub mod plot;
