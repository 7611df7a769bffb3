//! Recursive sketches of the objects a modular model saw (Ghazi, Panigrahy and Wang, "Recursive
//! Sketches for Modular Deep Learning", ICML 2019).
//!
//! A sketch is one `d`-dimensional vector per input. Each object the model produced (a module,
//! an attribute vector, children in slots) is embedded by its module's random isometry `R_M`,
//! and each child is added through a random rotation `Q_{M,j}` of the slot it sits in:
//!
//! ```text
//! s(θ) = R_M [c; x_θ] + Σ_j α_j Q_{M,j} s(θ_j)        S = Σ_top w_θ s(θ)
//! ```
//!
//! The construction is linear and approximately isometric on the weighted set of
//! (path signature, attribute) pairs, so one vector answers questions nobody asked when it was
//! written: which module is at a path and with what attributes ([`Sketcher::decode`]), how
//! many of a module there were ([`Sketcher::count`], [`Sketcher::joint`] over sums of sketches),
//! how similar two inputs are ([`Sketch::cosine`]), and it still answers after its suffix is
//! erased ([`Sketch::erase_to`]). Over many sketches, what no known module explains clusters into
//! emerging concepts ([`Sketcher::emerging_concepts`]).
//!
//! The crate is pure computation: no I/O and no threads, so the transform job, the query
//! commands and the tests share one implementation. Matrices are never stored; they are
//! regenerated from the seed ([`Params::seed`]), so two processes with the same parameters
//! write compatible sketches.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod concepts;
mod construct;
mod decode;
pub mod learn;
mod repository;
mod rng;
mod sketch;
mod sketcher;
mod vector;

pub use concepts::{Concept, ConceptOptions};
pub use construct::{Dag, Edge, Node, NodeId};
pub use decode::{BlockEstimate, DecodeOptions, Decoded};
pub use repository::{Hit, Repository};
pub use rng::Sampler;
pub use sketch::{Sketch, View};
pub use sketcher::{EmbeddingKind, ModuleSpec, Params, Sketcher};

/// Errors of the sketch layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Parameters that cannot make a sketch.
    #[error("invalid sketch parameters: {0}")]
    Params(String),
    /// A module id outside the sketcher's module list.
    #[error("module {module} is unknown (there are {modules} modules)")]
    UnknownModule {
        /// The id asked for.
        module: u32,
        /// How many modules exist.
        modules: usize,
    },
    /// A DAG that does not fit the modules (attribute length, slot, dangling child, cycle).
    #[error("invalid object graph: {0}")]
    Dag(String),
    /// A sketch made with another dimension.
    #[error("sketch has dimension {got}, the parameters say {expected}")]
    Dimension {
        /// The sketcher's `d`.
        expected: usize,
        /// The sketch's `d`.
        got: usize,
    },
}

/// Result with the sketch layer's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
