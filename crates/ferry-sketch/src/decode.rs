//! Queries on one sketch or a sum of sketches: module scores, counts and attribute statistics,
//! unrolling into a slot, the greedy recursive decoder and the joint least-squares decoder.
//!
//! Every estimate of a module's block is a least-squares fit on the valid coordinates. With
//! nothing erased and orthonormal embeddings that fit is a plain projection `R_Mᵀ u`, which the
//! code takes as a shortcut; after erasure the fit is what keeps attribute errors growing only
//! as `sqrt(d/d')`.

use std::borrow::Cow;

use nalgebra::{DMatrix, DVector};

use crate::sketch::{Sketch, View};
use crate::sketcher::{EmbeddingKind, Sketcher};
use crate::vector;
use crate::{Error, Result};

/// One object found by the decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Index, in the decoder's output, of the object whose slot this one was found in; `None`
    /// at the top level.
    pub parent: Option<usize>,
    /// Slots taken from the top down to this object.
    pub path: Vec<u16>,
    /// The module identified.
    pub module: u32,
    /// Estimated effective weight (the product of edge weights along the path; the summed
    /// weight when several objects of one module share the slot).
    pub weight: f32,
    /// Estimated attributes (the weighted mean when several objects were merged).
    pub attr: Vec<f32>,
}

/// How far the greedy decoder goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Levels below the top to unroll (0 decodes the top level only).
    pub max_depth: usize,
    /// Objects to take out of one slot (or the top level) before moving on; 1 for ordered slots,
    /// more for bag slots and top sets with several objects.
    pub max_per_slot: usize,
    /// After the greedy pass, refit every found object jointly on the sketch itself. The greedy
    /// pass estimates each object against everything else in its slot, so the presence parts of
    /// its neighbours leak into its weight; for a fixed object graph that leak is the same every
    /// time, a bias rather than noise. The refit removes it between found objects, at a cost of
    /// `(objects·(k+1))²·d` flops, which is why it is optional.
    pub refine: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { max_depth: 8, max_per_slot: 1, refine: false }
    }
}

/// An object found in a slot: its module, its block `[c·w ; w·x]`, and the slot's residual with
/// every found object's block removed.
/// At most what [`SPARE`] keeps between decodes.
const SPARE_BYTES: usize = 32 << 20;

thread_local! {
    /// Probe vectors kept between decodes for the next one's probes.
    static SPARE: std::cell::Cell<Vec<Vec<f32>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// What one probe found: each object's module and block, and the residual its children are read
/// from (every found object's own block removed).
type Found = (Vec<(u32, Vec<f64>)>, View);

/// A slot waiting to be scored.
struct Probe {
    /// Which of the decoded views it belongs to.
    tree: usize,
    view: View,
    parent: Option<usize>,
    path: Vec<u16>,
}

/// The least-squares estimate of one module's block `[c·Σw ; Σ w·x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockEstimate {
    /// The module.
    pub module: u32,
    /// Summed weight `Σ w` (the count when weights are 1).
    pub weight: f32,
    /// Weighted attribute sum `Σ w·x`.
    pub attr_sum: Vec<f32>,
}

impl BlockEstimate {
    /// The weighted mean attribute; zeros when the weight is not positive.
    pub fn mean(&self) -> Vec<f32> {
        if self.weight > 0.0 {
            self.attr_sum.iter().map(|v| v / self.weight).collect()
        } else {
            vec![0.0; self.attr_sum.len()]
        }
    }
}

impl Sketcher {
    /// Prepares a stored sketch for queries, checking that it was made with this dimension.
    pub fn view(&self, s: &Sketch) -> Result<View> {
        if s.full_dim != self.dim() || s.kept() > s.full_dim {
            return Err(Error::Dimension { expected: self.dim(), got: s.full_dim });
        }
        Ok(View::new(s))
    }

    /// Presence scores `(d/d')·⟨r_M, u⟩/c` of every module: at the top level, the estimated count
    /// (summed weight) of each module.
    pub fn scores(&self, v: &View) -> Vec<f32> {
        let f = v.scale() / self.params().c;
        (0..self.modules().len() as u32).map(|m| vector::dot(self.presence(m), &v.data) * f).collect()
    }

    /// The correlation estimate of module `m`'s count at the level of `v`.
    pub fn count(&self, v: &View, m: u32) -> Result<f32> {
        self.module(m)?;
        Ok(vector::dot(self.presence(m), &v.data) * v.scale() / self.params().c)
    }

    /// The least-squares estimate of module `m`'s block at the level of `v`: its summed weight
    /// and weighted attribute sum.
    pub fn block(&self, v: &View, m: u32) -> Result<BlockEstimate> {
        self.module(m)?;
        let z = self.fit(v, &[m]);
        Ok(self.estimate(m, &z))
    }

    /// The sub-sketch in slot `slot` of a module-`m` object at the level of `v`: its own block is
    /// fitted and removed, and the rest rotated back by `Q_{m,slot}ᵀ`.
    pub fn unroll(&self, v: &View, m: u32, slot: usize) -> Result<View> {
        let spec = self.module(m)?;
        if slot >= spec.n_slots {
            return Err(Error::Dag(format!("module {m} has {} slots, slot {slot} was asked for", spec.n_slots)));
        }
        let mut r = v.clone();
        self.fit_remove(&mut r, m);
        Ok(self.slot_view(&r, m, slot, Vec::new()))
    }

    /// The greedy recursive decoder of a stored sketch.
    pub fn decode(&self, s: &Sketch, opts: DecodeOptions) -> Result<Vec<Decoded>> {
        Ok(self.decode_view(&self.view(s)?, opts))
    }

    /// The greedy recursive decoder of many stored sketches; each result is the one
    /// [`Sketcher::decode`] gives for that sketch alone, found faster together (see
    /// [`Sketcher::decode_views`]).
    pub fn decode_batch(&self, sketches: &[Sketch], opts: DecodeOptions) -> Result<Vec<Vec<Decoded>>> {
        let views = sketches.iter().map(|s| self.view(s)).collect::<Result<Vec<_>>>()?;
        Ok(self.decode_views(&views, opts))
    }

    /// The greedy recursive decoder, from any level (a top-level view or an unrolled slot).
    pub fn decode_view(&self, v: &View, opts: DecodeOptions) -> Vec<Decoded> {
        self.decode_views(std::slice::from_ref(v), opts).remove(0)
    }

    /// The greedy recursive decoder of many views at once.
    ///
    /// Slots are probed level by level, across all the views together. Scoring every module
    /// against every probe of a level is one matrix product (`m × d` presence vectors times
    /// `d × probes`), done in register blocks of probes and presence vectors that read the
    /// presence vectors once per level instead of once per probe; that scan is most of
    /// decoding's arithmetic. The probes are then
    /// fitted in the order of the module they found, so that consecutive fits share an
    /// embedding while it is in cache. Every probe's numbers depend only on that probe, so a
    /// view decodes the same alone or in a batch.
    pub fn decode_views(&self, views: &[View], opts: DecodeOptions) -> Vec<Vec<Decoded>> {
        let mut out: Vec<Vec<Decoded>> = vec![Vec::new(); views.len()];
        let taus: Vec<f32> = views.iter().map(|v| self.tau_sigmas() * v.sigma).collect();
        // Vectors of spent probes, for the views of the next ones: reused, their pages are
        // already mapped (fresh ones fault a page at a time) and likely in cache.
        let mut spare = SPARE.take();
        let mut level: Vec<Probe> = views
            .iter()
            .enumerate()
            .filter(|(t, _)| taus[*t] > 0.0)
            .map(|(tree, v)| {
                let mut data = spare.pop().unwrap_or_default();
                data.clear();
                data.extend_from_slice(&v.data);
                let view = View { data, mask: v.mask.clone(), valid: v.valid, sigma: v.sigma };
                Probe { tree, view, parent: None, path: Vec::new() }
            })
            .collect();
        let c = self.params().c as f64;
        for depth in 0..=opts.max_depth {
            if level.is_empty() {
                break;
            }
            let first = self.scores_many(&level);
            let best: Vec<usize> = first
                .iter()
                .map(|s| s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(m, _)| m))
                .collect();
            let mut order: Vec<usize> = (0..level.len()).collect();
            order.sort_by_key(|&i| best[i]);
            let mut found: Vec<Option<Found>> = (0..level.len()).map(|_| None).collect();
            let mut scores: Vec<Option<Vec<f32>>> = first.into_iter().map(Some).collect();
            for i in order {
                let view = std::mem::replace(&mut level[i].view, View::empty());
                let tau = taus[level[i].tree];
                found[i] = Some(self.probe(view, scores[i].take().expect("scored once"), opts.max_per_slot, tau));
            }
            let mut next = Vec::new();
            for (probe, found) in level.into_iter().zip(found) {
                let tree = &mut out[probe.tree];
                let (objects, rest) = found.expect("every probe probed");
                for (m, z) in objects {
                    let w = z[0] / c;
                    let idx = tree.len();
                    tree.push(Decoded {
                        parent: probe.parent,
                        path: probe.path.clone(),
                        module: m,
                        weight: w as f32,
                        attr: z[1..].iter().map(|v| (v / w) as f32).collect(),
                    });
                    if depth < opts.max_depth {
                        for j in 0..self.modules()[m as usize].n_slots {
                            let mut path = probe.path.clone();
                            path.push(j as u16);
                            let buf = spare.pop().unwrap_or_default();
                            next.push(Probe {
                                tree: probe.tree,
                                view: self.slot_view(&rest, m, j, buf),
                                parent: Some(idx),
                                path,
                            });
                        }
                    }
                }
                spare.push(rest.data);
            }
            level = next;
        }
        spare.extend(level.into_iter().map(|p| p.view.data));
        spare.truncate(SPARE_BYTES / (self.dim() * 4).max(1));
        SPARE.set(spare);
        if opts.refine {
            for (v, found) in views.iter().zip(&mut out) {
                if found.len() > 1 {
                    self.refine(v, found);
                }
            }
        }
        out
    }

    /// Matching pursuit over modules in one slot, starting from precomputed scores.
    fn probe(&self, mut u: View, mut scores: Vec<f32>, max: usize, tau: f32) -> Found {
        let c = self.params().c as f64;
        let mut found = Vec::new();
        for round in 0..max {
            if round > 0 {
                scores = self.scores(&u);
            }
            let (m, &best) = scores
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("a sketcher has at least one module when it has a sketch to decode");
            if best < tau {
                break;
            }
            let m = m as u32;
            let cols = self.columns(&u, &[m]);
            let z = self.fit_columns(&u, &cols, 1);
            if z[0] / c < tau as f64 {
                break;
            }
            subtract(&mut u, &cols, &z);
            found.push((m, z));
        }
        (found, u)
    }

    /// First-round scores of many probes, `(d/d')·⟨r_M, u⟩/c` for each: every probe's inner
    /// product with every presence vector, a block of probes and presence vectors at a time.
    fn scores_many(&self, probes: &[Probe]) -> Vec<Vec<f32>> {
        let m = self.modules().len();
        let views: Vec<&[f32]> = probes.iter().map(|p| p.view.data.as_slice()).collect();
        let presence: Vec<&[f32]> = (0..m as u32).map(|j| self.presence(j)).collect();
        let mut scores = vec![0.0f32; probes.len() * m];
        vector::dots(&views, &presence, &mut scores);
        scores
            .chunks_exact(m.max(1))
            .zip(probes)
            .map(|(row, p)| {
                let f = p.view.scale() / self.params().c;
                row.iter().map(|v| v * f).collect()
            })
            .collect()
    }

    /// Joint least squares of all found objects' blocks, each carried to the level of `v`
    /// through the rotations along its path.
    fn refine(&self, v: &View, out: &mut [Decoded]) {
        let cols = self.carried_columns(v, out);
        let rhs = cols.iter().map(|c| vector::dot(c, &v.data) as f64).collect();
        let z = solve_normal(&cols, rhs);
        let c = self.params().c as f64;
        let mut at = 0;
        for obj in out.iter_mut() {
            let k = obj.attr.len();
            let w = z[at] / c;
            if w > 0.0 {
                obj.weight = w as f32;
                obj.attr = z[at + 1..at + 1 + k].iter().map(|x| (x / w) as f32).collect();
            }
            at += k + 1;
        }
    }

    /// What the decoded objects do not explain: `v` minus the joint least-squares fit of every
    /// object in `found` (a decoder's output for `v`), each carried to the level of `v` through
    /// the rotations along its path. The fit is joint, so objects found at several depths are
    /// removed together, without the cross-talk a level-by-level subtraction leaves behind.
    pub fn residual(&self, v: &View, found: &[Decoded]) -> View {
        let mut r = v.clone();
        if found.is_empty() {
            return r;
        }
        let cols = self.carried_columns(v, found);
        let rhs = cols.iter().map(|c| vector::dot(c, &v.data) as f64).collect();
        let z = solve_normal(&cols, rhs);
        subtract(&mut r, &cols, &z);
        r
    }

    /// The embedding columns of every found object, carried to the level of `v` through the
    /// rotations along its path and restricted to the valid coordinates of `v`.
    fn carried_columns(&self, v: &View, found: &[Decoded]) -> Vec<Cow<'_, [f32]>> {
        let mut cols: Vec<Cow<'_, [f32]>> = Vec::new();
        for (i, obj) in found.iter().enumerate() {
            let mut chain = Vec::new();
            let mut at = i;
            while let Some(p) = found[at].parent {
                chain.push((found[p].module, found[at].path[found[at].path.len() - 1] as usize));
                at = p;
            }
            for col in self.embedding(obj.module).cols() {
                let mut c = col.to_vec();
                for &(m, slot) in &chain {
                    c = self.rotation(m, slot).apply(&c);
                }
                cols.push(Cow::Owned(masked(&c, v.mask.as_deref()).into_owned()));
            }
        }
        cols
    }

    /// The view of slot `slot` of a module-`m` object whose own block is gone from `r`, written
    /// into `buf`'s allocation.
    fn slot_view(&self, r: &View, m: u32, slot: usize, buf: Vec<f32>) -> View {
        let q = self.rotation(m, slot);
        View {
            data: q.apply_t_into(&r.data, buf),
            mask: r.mask.as_ref().map(|mask| q.apply_t_mask(mask)),
            valid: r.valid,
            sigma: r.sigma,
        }
    }

    /// The embedding columns of `modules`, restricted to the valid coordinates of `v`.
    fn columns<'a>(&'a self, v: &View, modules: &[u32]) -> Vec<Cow<'a, [f32]>> {
        modules.iter().flat_map(|&m| self.embedding(m).cols().map(|col| masked(col, v.mask.as_deref()))).collect()
    }

    /// Least squares `argmin_z ‖u − [R_m…] z‖` over the valid coordinates. The blocks are
    /// nearly orthogonal by construction, so the normal equations are well conditioned.
    pub(crate) fn fit(&self, v: &View, modules: &[u32]) -> Vec<f64> {
        let cols = self.columns(v, modules);
        self.fit_columns(v, &cols, modules.len())
    }

    /// [`Sketcher::fit`] on columns already gathered for `blocks` modules.
    fn fit_columns(&self, v: &View, cols: &[Cow<'_, [f32]>], blocks: usize) -> Vec<f64> {
        let rhs: Vec<f64> = cols.iter().map(|c| vector::dot(c, &v.data) as f64).collect();
        if v.mask.is_none() && blocks == 1 && self.params().embedding == EmbeddingKind::Orthonormal {
            return rhs;
        }
        solve_normal(cols, rhs)
    }

    /// Fits module `m`'s block and removes it from `v`.
    fn fit_remove(&self, v: &mut View, m: u32) {
        let cols = self.columns(v, &[m]);
        let z = self.fit_columns(v, &cols, 1);
        subtract(v, &cols, &z);
    }

    fn subtract_blocks(&self, v: &mut View, modules: &[u32], z: &[f64]) {
        let cols = self.columns(v, modules);
        subtract(v, &cols, z);
    }

    fn estimate(&self, m: u32, z: &[f64]) -> BlockEstimate {
        BlockEstimate {
            module: m,
            weight: (z[0] / self.params().c as f64) as f32,
            attr_sum: z[1..].iter().map(|&v| v as f32).collect(),
        }
    }

    /// The joint least-squares decoder over the given modules (all of them, for a small
    /// vocabulary): the right estimate for sums of many sketches, whose module components are
    /// coherent and would leak into each other's correlation scores. Needs
    /// `Σ (k_M + 1) ≤ d'/2`.
    pub fn joint(&self, v: &View, modules: &[u32]) -> Result<Vec<BlockEstimate>> {
        let mut width = 0;
        for &m in modules {
            width += self.module(m)?.attr_dim + 1;
        }
        if 2 * width > v.valid {
            return Err(Error::Params(format!(
                "the joint decoder over {} modules needs {width} unknowns, more than half of the {} kept coordinates",
                modules.len(),
                v.valid
            )));
        }
        let z = self.fit(v, modules);
        let mut out = Vec::with_capacity(modules.len());
        let mut at = 0;
        for &m in modules {
            let k = self.modules()[m as usize].attr_dim;
            out.push(self.estimate(m, &z[at..at + k + 1]));
            at += k + 1;
        }
        Ok(out)
    }

    /// Decodes a sum of many sketches at one level when the vocabulary is too large for
    /// [`Sketcher::joint`] over every module: modules are added greedily by their score on the
    /// residual, and all chosen blocks are refitted jointly after each addition. Stops when the
    /// best remaining score is under τ in units of the residual's own noise level, or after
    /// `max_modules`.
    pub fn decode_aggregate(&self, v: &View, max_modules: usize) -> Vec<BlockEstimate> {
        let tau = self.tau_sigmas();
        let mut chosen: Vec<u32> = Vec::new();
        let mut z: Vec<f64> = Vec::new();
        let mut width = 0;
        while chosen.len() < max_modules {
            let mut r = v.clone();
            if !chosen.is_empty() {
                self.subtract_blocks(&mut r, &chosen, &z);
            }
            let sigma = vector::norm(&r.data) * (r.data.len() as f32 / r.valid as f32).sqrt() / (r.valid as f32).sqrt();
            let scores = self.scores(&r);
            let best = scores
                .iter()
                .enumerate()
                .filter(|(m, _)| !chosen.contains(&(*m as u32)))
                .max_by(|a, b| a.1.total_cmp(b.1));
            let Some((m, &s)) = best else { break };
            let k = self.modules()[m].attr_dim;
            if s < tau * sigma || 2 * (width + k + 1) > v.valid {
                break;
            }
            chosen.push(m as u32);
            width += k + 1;
            z = self.fit(v, &chosen);
        }
        let mut out = Vec::with_capacity(chosen.len());
        let mut at = 0;
        for &m in &chosen {
            let k = self.modules()[m as usize].attr_dim;
            out.push(self.estimate(m, &z[at..at + k + 1]));
            at += k + 1;
        }
        out
    }
}

/// `col` with the coordinates outside `mask` zeroed (borrowed when nothing is masked).
fn masked<'a>(col: &'a [f32], mask: Option<&[bool]>) -> Cow<'a, [f32]> {
    match mask {
        None => Cow::Borrowed(col),
        Some(mask) => Cow::Owned(col.iter().zip(mask).map(|(&x, &k)| if k { x } else { 0.0 }).collect()),
    }
}

/// `v -= Σ z_i · cols_i`
fn subtract(v: &mut View, cols: &[Cow<'_, [f32]>], z: &[f64]) {
    let coef: Vec<f32> = z.iter().map(|&zi| -(zi as f32)).collect();
    vector::combine(&mut v.data, cols, &coef);
}

/// Solves `(AᵀA) z = rhs` for the columns of `A`.
fn solve_normal(cols: &[Cow<'_, [f32]>], rhs: Vec<f64>) -> Vec<f64> {
    let n = cols.len();
    let mut g = DMatrix::<f64>::zeros(n, n);
    for i in 0..n {
        for j in 0..=i {
            let v = vector::dot(&cols[i], &cols[j]) as f64;
            g[(i, j)] = v;
            g[(j, i)] = v;
        }
    }
    let b = DVector::from_vec(rhs);
    match g.clone().cholesky() {
        Some(ch) => ch.solve(&b).iter().copied().collect(),
        // Only when the kept coordinates are too few for the blocks (d' < k+1): fall back to the
        // minimum-norm solution rather than failing a query.
        None => g.svd(true, true).solve(&b, 1e-9).map(|z| z.iter().copied().collect()).unwrap_or_else(|_| vec![0.0; n]),
    }
}
