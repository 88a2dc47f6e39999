//! Evaluation of frozen backbones: features (in memory or in a feature file), streamed weighted
//! kNN, a linear probe, and the export of a backbone that PyTorch loads.

pub mod cache;
pub mod export;
pub mod features;
pub mod knn;
pub mod linear;
