//! Training: the one training step ([`step`]), the pretraining loop around it ([`pretrain`]), its
//! data, optimiser, schedules and checkpoints.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod pretrain;
pub mod progress;
pub mod schedule;
pub mod step;
