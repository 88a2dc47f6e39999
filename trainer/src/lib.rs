//! MaskDeep self-supervised pretraining of ResNets in Candle, on shards made by `loader`.
//!
//! Data flows one way: shards or view shards ([`train::data`]) -> normalised views -> the training
//! step ([`train::step`]: MaskDeep from [`method`] over the backbone in [`nn`], whose layers call
//! the kernels in [`ops`]) -> optimiser and EMA target -> checkpoints. [`eval`] scores and exports
//! frozen backbones; [`diag`] times and checks the step; [`dist`] runs the step data-parallel over
//! several ranks.

pub mod config;
pub mod device;
pub mod diag;
pub mod dist;
pub mod error;
pub mod eval;
pub mod method;
pub mod nn;
pub mod ops;
pub mod train;
