//! isonn: non-negative isomorphic neural networks.
pub mod activation;
pub mod bench;
pub mod bound;
pub mod checkpoint;
pub mod curve;
pub mod data;
pub mod error;
pub mod experiment;
pub mod fsio;
pub mod hardware;
pub mod inspect;
pub mod interop;
pub mod model;
pub mod nonneg;
pub mod optim;
pub mod ops;
pub mod progress;
pub mod provenance;
pub mod scenario;
pub mod report;
pub mod store;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
