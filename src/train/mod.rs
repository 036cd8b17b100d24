//! The offline training flow: read a folder in the seed layout, augment,
//! train the network of [`crate::model`], evaluate, write weights.
//!
//! Nothing here speaks NATS or serves requests.

pub mod augment;
pub mod dataset;
pub mod ema;
pub mod eval;
pub mod memory;
pub mod pictures;
pub mod trainer;

pub use trainer::{TrainConfig, TrainReport, Validation};
