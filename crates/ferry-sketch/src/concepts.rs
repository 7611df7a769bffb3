//! Emerging concepts (SKETCHES.md §3.5): structure in many sketches that no known module explains.
//!
//! Each sketch is decoded with the known modules and what they explain is removed jointly
//! ([`Sketcher::residual`]). Sketches that keep a large share of their energy are candidates;
//! their residual directions are clustered (spherical k-means), and a cluster whose members
//! point the same way is a concept the model has no module for. One concept's instances differ in
//! their attributes, so k-means splits it into clusters inside one `k+1`-dimensional span whose
//! centroids are still far from orthogonal (cosine about 0.7 for unit attributes), while
//! centroids of unrelated concepts are nearly orthogonal (about `1/√d`); clusters are therefore
//! merged when their centroids' cosine reaches `merge_cosine`. A concept's centroid is the
//! direction to use as the new module's presence vector. Residual noise (objects below the decoder's threshold,
//! estimation error) points in unrelated directions, so it clusters loosely and is dropped by
//! the cohesion threshold.

use crate::decode::DecodeOptions;
use crate::learn::{nearest_each, spherical_kmeans};
use crate::sketch::Sketch;
use crate::sketcher::Sketcher;
use crate::{vector, Result};

/// How [`Sketcher::emerging_concepts`] looks for concepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConceptOptions {
    /// How far each sketch is decoded before its residual is taken.
    pub decode: DecodeOptions,
    /// Share of a sketch's energy its residual must keep for the sketch to be a candidate.
    pub min_unexplained: f32,
    /// Clusters looked for among the candidates.
    pub max_concepts: usize,
    /// Members a cluster needs to be reported.
    pub min_members: usize,
    /// Mean cosine of a cluster's members with its centroid needed to be reported.
    pub min_cohesion: f32,
    /// Clusters whose centroids have at least this cosine are one concept.
    pub merge_cosine: f32,
    /// Seed of the clustering.
    pub seed: u64,
}

impl Default for ConceptOptions {
    fn default() -> Self {
        ConceptOptions {
            decode: DecodeOptions::default(),
            min_unexplained: 0.25,
            max_concepts: 8,
            min_members: 5,
            min_cohesion: 0.5,
            merge_cosine: 0.5,
            seed: 0,
        }
    }
}

/// A direction many sketches share that no known module explains.
#[derive(Debug, Clone, PartialEq)]
pub struct Concept {
    /// Unit centroid of the members' residuals: a presence vector for a new module.
    pub direction: Vec<f32>,
    /// Indices of the sketches that hold it, in input order.
    pub members: Vec<usize>,
    /// Mean cosine of the members' residuals with `direction`.
    pub cohesion: f32,
}

impl Sketcher {
    /// The share of each sketch's energy that the known modules do not explain,
    /// `‖residual‖² / ‖S‖²` after decoding (0 for an empty sketch).
    pub fn unexplained(&self, sketches: &[Sketch], opts: DecodeOptions) -> Result<Vec<f32>> {
        Ok(self.residuals(sketches, opts)?.into_iter().map(|(_, share)| share).collect())
    }

    /// Clusters of unexplained structure, largest first.
    pub fn emerging_concepts(&self, sketches: &[Sketch], opts: &ConceptOptions) -> Result<Vec<Concept>> {
        let residuals = self.residuals(sketches, opts.decode)?;
        let (index, samples): (Vec<usize>, Vec<Vec<f32>>) = residuals
            .into_iter()
            .enumerate()
            .filter(|(_, (_, share))| *share >= opts.min_unexplained)
            .map(|(i, (r, _))| (i, r))
            .unzip();
        if samples.len() < opts.min_members.max(1) {
            return Ok(Vec::new());
        }
        let units: Vec<Vec<f32>> = samples
            .iter()
            .map(|r| {
                let n = vector::norm(r).max(f32::MIN_POSITIVE);
                r.iter().map(|v| v / n).collect()
            })
            .collect();
        let centroids = spherical_kmeans(&units, opts.max_concepts, 25, opts.seed)?;
        // Union clusters whose centroids are close, then rebuild each concept from its members.
        let mut root: Vec<usize> = (0..centroids.len()).collect();
        fn find(root: &mut [usize], mut i: usize) -> usize {
            while root[i] != i {
                root[i] = root[root[i]];
                i = root[i];
            }
            i
        }
        for a in 0..centroids.len() {
            for b in a + 1..centroids.len() {
                if vector::dot(&centroids[a], &centroids[b]) >= opts.merge_cosine {
                    let (ra, rb) = (find(&mut root, a), find(&mut root, b));
                    root[ra.max(rb)] = ra.min(rb);
                }
            }
        }
        let group: Vec<usize> = nearest_each(&centroids, &units).into_iter().map(|c| find(&mut root, c)).collect();
        let mut groups: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), vec![0.0; self.dim()]); centroids.len()];
        for ((&g, u), &i) in group.iter().zip(&units).zip(&index) {
            groups[g].0.push(i);
            vector::axpy(&mut groups[g].1, 1.0, u);
        }
        for g in &mut groups {
            let n = vector::norm(&g.1).max(f32::MIN_POSITIVE);
            g.1.iter_mut().for_each(|v| *v /= n);
        }
        let mut cohesion = vec![0.0f32; groups.len()];
        for (&g, u) in group.iter().zip(&units) {
            cohesion[g] += vector::dot(u, &groups[g].1);
        }
        let mut out: Vec<Concept> = groups
            .into_iter()
            .zip(cohesion)
            .filter(|((members, _), _)| members.len() >= opts.min_members.max(1))
            .map(|((members, direction), sum)| Concept { cohesion: sum / members.len() as f32, direction, members })
            .filter(|c| c.cohesion >= opts.min_cohesion)
            .collect();
        out.sort_by(|a, b| b.members.len().cmp(&a.members.len()).then(b.cohesion.total_cmp(&a.cohesion)));
        Ok(out)
    }

    /// Each sketch's residual after decoding, with its share of the sketch's energy.
    fn residuals(&self, sketches: &[Sketch], opts: DecodeOptions) -> Result<Vec<(Vec<f32>, f32)>> {
        let views = sketches.iter().map(|s| self.view(s)).collect::<Result<Vec<_>>>()?;
        let found = self.decode_views(&views, opts);
        Ok(views
            .iter()
            .zip(&found)
            .map(|(v, found)| {
                let r = self.residual(v, found);
                let total = vector::dot(&v.data, &v.data);
                let share = if total > 0.0 { vector::dot(&r.data, &r.data) / total } else { 0.0 };
                (r.data, share)
            })
            .collect())
    }
}
