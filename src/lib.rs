//! profile-classifier: labels social-media profile pictures streaming through
//! NATS with a small Candle CNN.
//!
//! The library holds everything; the binaries in `src/bin/` only parse flags.
//! Data flows [`protocol`] (wire types) -> [`preprocess`] (bytes to model
//! input) -> batching -> [`model`] (one forward pass per batch) -> [`protocol`]
//! (result JSON), driven by the worker; [`train`] is the offline flow that
//! writes the weights file that [`model::weights`] reads.

pub mod batcher;
pub mod config;
pub mod connect;
pub mod face;
pub mod loadgen;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod protocol;
pub mod train;
pub mod worker;
