//! A repository of stored sketches and the edges of the knowledge graph they imply.
//!
//! Edges are not stored: a child is found by unrolling a parent's slot and looking up the
//! nearest stored sketch, a parent by rotating a sketch into each candidate slot and doing the
//! same. The index here is an exact scan of L2-normalised vectors, which is what a set of a few
//! hundred thousand sketches needs; an LSH index can replace it behind the same calls.

use crate::sketch::Sketch;
use crate::sketcher::Sketcher;
use crate::vector;
use crate::Result;

/// Stored, L2-normalised sketches with an item per entry.
#[derive(Debug, Clone)]
pub struct Repository<T> {
    dim: usize,
    items: Vec<T>,
    vectors: Vec<f32>,
}

/// A stored entry matched by a query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Index of the entry in insertion order.
    pub index: usize,
    /// Cosine similarity with the query.
    pub cosine: f32,
}

impl<T> Repository<T> {
    /// An empty repository of sketches of dimension `dim` (the kept prefix that is compared).
    pub fn new(dim: usize) -> Self {
        Repository { dim, items: Vec::new(), vectors: Vec::new() }
    }

    /// Stores a sketch (its first `dim` coordinates, zero-padded if it kept fewer).
    pub fn insert(&mut self, item: T, sketch: &[f32]) {
        let mut v = vec![0.0; self.dim];
        let n = sketch.len().min(self.dim);
        v[..n].copy_from_slice(&sketch[..n]);
        let norm = vector::norm(&v);
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        self.vectors.extend_from_slice(&v);
        self.items.push(item);
    }

    /// Number of stored sketches.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The item stored at `index`.
    pub fn item(&self, index: usize) -> &T {
        &self.items[index]
    }

    /// The `k` stored sketches most similar to `query` by cosine, best first.
    pub fn nearest(&self, query: &[f32], k: usize) -> Vec<Hit> {
        let n = query.len().min(self.dim);
        let qn = vector::norm(&query[..n]);
        if qn == 0.0 || k == 0 {
            return Vec::new();
        }
        let mut hits: Vec<Hit> = self
            .vectors
            .chunks_exact(self.dim)
            .enumerate()
            .map(|(index, v)| Hit { index, cosine: vector::dot(&v[..n], &query[..n]) / qn })
            .collect();
        let k = k.min(hits.len());
        hits.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.cosine.total_cmp(&a.cosine));
        hits.truncate(k);
        hits.sort_by(|a, b| b.cosine.total_cmp(&a.cosine));
        hits
    }

    /// Edges down: for each slot of `module` (the object's own module; its top-scoring module
    /// when `None`), the stored sketch nearest to what that slot holds.
    pub fn children(&self, sketcher: &Sketcher, s: &Sketch, module: Option<u32>) -> Result<Vec<Option<Hit>>> {
        let v = sketcher.view(s)?;
        let m = match module {
            Some(m) => m,
            None => {
                let scores = sketcher.scores(&v);
                scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(m, _)| m as u32).unwrap_or(0)
            }
        };
        let slots = sketcher.module(m)?.n_slots;
        let mut out = Vec::with_capacity(slots);
        for j in 0..slots {
            let u = sketcher.unroll(&v, m, j)?;
            out.push(self.nearest(u.values(), 1).into_iter().next());
        }
        Ok(out)
    }

    /// Edges up: the stored sketches that best contain `s` in some slot of one of the
    /// `candidates` modules, as `(hit, module, slot)`, best first.
    pub fn parents(
        &self,
        sketcher: &Sketcher,
        s: &Sketch,
        candidates: &[u32],
        k: usize,
    ) -> Result<Vec<(Hit, u32, usize)>> {
        let v = sketcher.view(s)?;
        let mut all = Vec::new();
        for &m in candidates {
            for j in 0..sketcher.module(m)?.n_slots {
                let q = sketcher.rotate(m, j, v.values());
                for hit in self.nearest(&q, k) {
                    all.push((hit, m, j));
                }
            }
        }
        all.sort_by(|a, b| b.0.cosine.total_cmp(&a.0.cosine));
        let mut seen = std::collections::HashSet::new();
        all.retain(|e| seen.insert(e.0.index));
        all.truncate(k);
        Ok(all)
    }
}
