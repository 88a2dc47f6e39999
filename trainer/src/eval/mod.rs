//! Evaluation of frozen backbones: features, weighted kNN, a linear probe, and the export of a
//! backbone that PyTorch loads.

pub mod export;
pub mod features;
pub mod knn;
pub mod linear;
