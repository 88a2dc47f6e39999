//! The common library of the `loader` and `trainer` binaries.
//!
//! Data flows one way: image files are listed ([`source`]), decoded ([`decode`]), resized
//! ([`resize`]) and written once into memory-mapped shards ([`shard`], described by a
//! [`manifest`]) by the packer ([`pack`]); readers open a packed [`dataset`] and read record `i`
//! in O(1). [`synth`] draws the embedded labelled dataset used by the demo and the tests.

pub mod augment;
pub mod cpu;
pub mod dataset;
pub mod decode;
pub mod error;
pub mod fsutil;
pub mod import;
pub mod manifest;
pub mod pack;
pub mod pipeline;
pub mod process;
pub mod resize;
pub mod sampler;
pub mod shard;
pub mod source;
pub mod stats;
pub mod synth;
pub mod views;
pub mod viewshards;

pub use error::{Error, Result};
