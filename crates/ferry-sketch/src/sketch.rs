//! Sketch values: what is stored ([`Sketch`]) and what queries work on ([`View`]).
//!
//! A stored sketch may be a prefix of the full dimension (graceful erasure keeps coordinates
//! `0..d'`). Queries zero-fill it to `d` and carry a mask of the coordinates that are real,
//! because unrolling a child slot moves the kept coordinates through a signed permutation, so
//! after the first level they are no longer a prefix.

use std::ops::{Add, AddAssign, Mul};

use crate::vector;

/// A sketch vector as stored: the first `data.len()` coordinates of a `full_dim`-dimensional
/// sketch.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    /// The kept coordinates, a prefix of the full sketch.
    pub data: Vec<f32>,
    /// The dimension `d` of the sketch before any erasure.
    pub full_dim: usize,
}

impl Sketch {
    /// The zero sketch of dimension `d` (the sketch of an empty input; the start of a sum).
    pub fn zeros(d: usize) -> Self {
        Sketch { data: vec![0.0; d], full_dim: d }
    }

    /// How many coordinates are kept.
    pub fn kept(&self) -> usize {
        self.data.len()
    }

    /// Euclidean norm of the kept coordinates.
    pub fn norm(&self) -> f32 {
        vector::norm(&self.data)
    }

    /// Keeps the first `keep` coordinates. Every query still works on the result, with errors
    /// larger by `sqrt(d / keep)`.
    pub fn erase_to(&self, keep: usize) -> Sketch {
        Sketch { data: self.data[..keep.min(self.data.len())].to_vec(), full_dim: self.full_dim }
    }

    /// Inner product over the coordinates both sketches kept, rescaled to the full dimension so
    /// that it estimates the inner product of the full sketches.
    pub fn dot(&self, other: &Sketch) -> f32 {
        let n = self.kept().min(other.kept());
        if n == 0 {
            return 0.0;
        }
        vector::dot(&self.data[..n], &other.data[..n]) * (self.full_dim as f32 / n as f32)
    }

    /// Cosine similarity over the coordinates both sketches kept; 0 when either is zero.
    pub fn cosine(&self, other: &Sketch) -> f32 {
        self.cosine_to(&other.data)
    }

    /// [`Sketch::cosine`] with the kept values of another sketch of the same parameters, for
    /// callers that hold them without a `Sketch` (a row read from a file).
    pub fn cosine_to(&self, other: &[f32]) -> f32 {
        let n = self.kept().min(other.len());
        let (a, b) = (&self.data[..n], &other[..n]);
        let den = vector::norm(a) * vector::norm(b);
        if den == 0.0 {
            0.0
        } else {
            vector::dot(a, b) / den
        }
    }
}

impl AddAssign<&Sketch> for Sketch {
    /// Sums two sketches over their common prefix: the sketch of the union of their inputs.
    fn add_assign(&mut self, rhs: &Sketch) {
        *self += rhs.data.as_slice();
    }
}

impl AddAssign<&[f32]> for Sketch {
    /// Adds the kept values of another sketch of the same parameters, over the common prefix.
    fn add_assign(&mut self, rhs: &[f32]) {
        let n = self.kept().min(rhs.len());
        self.data.truncate(n);
        vector::axpy(&mut self.data, 1.0, &rhs[..n]);
    }
}

impl Add<&Sketch> for Sketch {
    type Output = Sketch;
    fn add(mut self, rhs: &Sketch) -> Sketch {
        self += rhs;
        self
    }
}

impl Mul<f32> for Sketch {
    type Output = Sketch;
    fn mul(mut self, rhs: f32) -> Sketch {
        self.data.iter_mut().for_each(|v| *v *= rhs);
        self
    }
}

/// A sketch or sub-sketch prepared for queries: zero-filled to the full dimension, with the mask
/// of coordinates that carry information, and the noise level of the top-level sketch it came
/// from (thresholds are always in units of that one global σ).
#[derive(Debug, Clone)]
pub struct View {
    pub(crate) data: Vec<f32>,
    /// `None` when every coordinate is valid.
    pub(crate) mask: Option<Vec<bool>>,
    pub(crate) valid: usize,
    pub(crate) sigma: f32,
}

impl View {
    /// Prepares a stored sketch of dimension `d` for queries.
    pub fn new(s: &Sketch) -> Self {
        let d = s.full_dim;
        let kept = s.kept().min(d);
        let mut data = vec![0.0; d];
        data[..kept].copy_from_slice(&s.data[..kept]);
        let mask = (kept < d).then(|| (0..d).map(|i| i < kept).collect());
        // sigma = ||S_kept|| * sqrt(d/d') / sqrt(d'): the norm of the full sketch, estimated from
        // the kept part, spread over the kept coordinates.
        let sigma = if kept == 0 {
            0.0
        } else {
            vector::norm(&data[..kept]) * ((d as f32 / kept as f32).sqrt()) / (kept as f32).sqrt()
        };
        View { data, mask, valid: kept, sigma }
    }

    /// A placeholder with no coordinates.
    pub(crate) fn empty() -> Self {
        View { data: Vec::new(), mask: None, valid: 0, sigma: 0.0 }
    }

    /// The global noise level σ used for thresholds.
    pub fn sigma(&self) -> f32 {
        self.sigma
    }

    /// The number of valid coordinates.
    pub fn valid(&self) -> usize {
        self.valid
    }

    /// The zero-filled values.
    pub fn values(&self) -> &[f32] {
        &self.data
    }

    /// `d / valid`: the factor that turns an inner product over the valid coordinates into an
    /// estimate of the full one.
    pub(crate) fn scale(&self) -> f32 {
        self.data.len() as f32 / self.valid.max(1) as f32
    }

    /// Turns the view into a stored-form sketch of its values (zeros where erased).
    pub fn to_sketch(&self) -> Sketch {
        Sketch { data: self.data.clone(), full_dim: self.data.len() }
    }
}
