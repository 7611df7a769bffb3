//! Sketches in jobs: what a classifier's forward pass becomes as an object graph, how sketch sets
//! are stored, and the queries over them.
//!
//! The sketch itself (construction, decoding, statistics) is the pure `ferry-sketch` crate. This
//! module adds what needs a model, a store or a file format:
//!
//! - [`profile`]: the fitted recipe that turns one record's model outputs (class scores and pooled
//!   features) into an object graph. `ferry sketch fit` fits it on a calibration set and writes
//!   it next to the model; every sketch set carries a copy, so a set can be queried without the
//!   model.
//! - [`store`]: sketch sets as Parquet, one file per input object (written atomically beside its
//!   `.out`, so resume needs nothing new), readable by DuckDB, Polars or pandas as they are.
//! - [`query`]: `ferry sketch similar | count | stats | decode | erase`.

pub mod fit;
pub mod profile;
pub mod query;
pub mod store;

pub use profile::SketchProfile;
