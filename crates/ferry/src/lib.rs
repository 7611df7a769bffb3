//! ferry carries a dataset through a trained model.
//!
//! The library holds the pipeline stages and the front ends; the `ferry` binary is a thin CLI
//! over them. Stages are modules rather than crates while they share one process and one set of
//! types; the model runtime, which has its own heavy dependencies and a stable trait boundary,
//! is the separate `ferry-backend` crate.
#![warn(missing_docs, missing_debug_implementations)]

pub mod artifact;
pub mod bench;
pub mod encode;
pub mod image;
mod jpeg;
pub mod manifest;
pub mod model;
pub mod progress;
pub mod provenance;
mod s3list;
pub mod sketch;
pub mod store;
pub mod transform;
