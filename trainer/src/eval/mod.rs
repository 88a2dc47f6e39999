//! Evaluation of frozen backbones: features (in memory or in a feature file), streamed weighted
//! kNN, linear probes (quick, on features; and the standard protocol on augmented images), and
//! the export of a backbone that PyTorch loads.

pub mod cache;
pub mod export;
pub mod features;
pub mod knn;
pub mod linear;
pub mod protocol;
