//! MaskDeep self-supervised pretraining of ResNets in Candle, on shards made by `loader`.
//!
//! Data flows one way: shards or view shards ([`data`]) -> normalised views -> the MaskDeep step
//! ([`maskdeep`], over the backbone [`resnet`]) -> optimiser ([`optim`]) and EMA target ([`ema`]) ->
//! checkpoints ([`checkpoint`]).

pub mod batchnorm;
pub mod batchnorm_cpu;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod conv;
pub mod cpu_storage;
pub mod data;
pub mod device;
pub mod ema;
pub mod eval;
pub mod export;
pub mod heads;
pub mod maskdeep;
pub mod masking;
pub mod maxpool;
pub mod optim;
pub mod params;
pub mod parity;
pub mod plot;
pub mod pretrain;
pub mod resnet;
pub mod schedule;
pub mod update_cpu;
