//! The random matrices of a sketch, regenerated from one seed.
//!
//! Nothing here is stored: a module's embedding `R_M` and a slot's rotation `Q_{M,j}` are built
//! from seeded streams the first time they are used and cached, so a job that sees 20 of 1,000
//! classes builds 20 embeddings. The presence vectors `r_M = R_M e₀` are the exception: every
//! decode step scores all modules, so they are built up front and kept as one `m × d` matrix.

use std::sync::OnceLock;

use nalgebra::DMatrix;

use crate::rng::{Sampler, Stream, Tag};
use crate::vector;
use crate::{Error, Result};

/// How `R_M` is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbeddingKind {
    /// Gaussian columns orthonormalised by QR (the recommended default; smaller errors).
    #[default]
    Orthonormal,
    /// i.i.d. `N(0, 1/d)` entries, not orthonormalised.
    Gaussian,
}

/// Sketch parameters shared by everything that writes or reads a set of sketches.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Sketch dimension `d`.
    pub d: usize,
    /// Presence constant `c`, the coordinate put in front of every attribute vector.
    pub c: f32,
    /// The global seed every matrix is derived from.
    pub seed: u64,
    /// Decoder threshold in units of σ. `None` picks 4.5 for up to 64 modules and
    /// `sqrt(2 ln(m·64/0.01))` above, so that scanning many modules does not raise false
    /// positives.
    pub tau_sigmas: Option<f32>,
    /// How module embeddings are drawn.
    pub embedding: EmbeddingKind,
    /// How the normals behind the embeddings are drawn.
    pub sampler: Sampler,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            d: 1024,
            c: 1.0,
            seed: 0,
            tau_sigmas: None,
            embedding: EmbeddingKind::Orthonormal,
            sampler: Sampler::Portable,
        }
    }
}

/// One module's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Attribute dimension `k_M`.
    pub attr_dim: usize,
    /// Number of child slots `K_M`.
    pub n_slots: usize,
}

/// A module embedding `R_M`, stored column by column in one buffer. Consecutive columns start
/// [`COLUMN_PAD`] floats apart beyond `d`: with `d` a power of two, unpadded columns would
/// all begin at the same offset within a page and compete for the same few L1 sets, so a block
/// of rows across all columns, which construction reuses for many objects, would not stay in L1.
#[derive(Debug)]
pub(crate) struct Embedding {
    data: Vec<f32>,
    d: usize,
}

/// See [`Embedding`]: 64 floats is four cache lines, so 17 columns of a 64-row block fall in
/// different sets.
pub(crate) const COLUMN_PAD: usize = 64;

impl Embedding {
    /// `n` columns of `d` floats, column `i` written by `fill(i, column)`.
    fn with_columns(d: usize, n: usize, mut fill: impl FnMut(usize, &mut [f32])) -> Self {
        let mut data = vec![0.0; n * (d + COLUMN_PAD)];
        for (i, c) in data.chunks_exact_mut(d + COLUMN_PAD).enumerate() {
            fill(i, &mut c[..d]);
        }
        Embedding { data, d }
    }

    /// Column `i`, `d` floats.
    pub(crate) fn col(&self, i: usize) -> &[f32] {
        &self.data[i * (self.d + COLUMN_PAD)..][..self.d]
    }

    /// All columns, presence first.
    pub(crate) fn cols(&self) -> impl ExactSizeIterator<Item = &[f32]> {
        self.data.chunks_exact(self.d + COLUMN_PAD).map(|c| &c[..self.d])
    }
}

/// A signed permutation `(Qv)[perm[i]] = sign[i] · v[i]`, kept in both directions so that
/// `Q` and `Qᵀ` are both applied by gathering (sequential writes), never by scattering. Each
/// index carries its sign in its top bit ([`vector::NEGATE`]), so a gather reads one array
/// besides the vector rather than two.
#[derive(Debug)]
pub(crate) struct Rotation {
    /// `perm[i] | negate(sign[i])`: `(Qᵀu)[i] = sign[i] · u[perm[i]]`.
    fwd: Vec<u32>,
    /// `inv[perm[i]] = i | negate(sign[i])`: `(Qv)[o] = sign · v[inv[o]]`.
    inv: Vec<u32>,
}

impl Rotation {
    fn new(perm: Vec<u32>, sign: Vec<f32>) -> Self {
        assert!(perm.len() <= vector::NEGATE as usize, "a dimension that leaves the top bit of an index free");
        let neg = |s: f32| if s < 0.0 { vector::NEGATE } else { 0 };
        let mut inv = vec![0u32; perm.len()];
        for (i, (&p, &s)) in perm.iter().zip(&sign).enumerate() {
            inv[p as usize] = i as u32 | neg(s);
        }
        let fwd = perm.iter().zip(&sign).map(|(&p, &s)| p | neg(s)).collect();
        Rotation { fwd, inv }
    }

    /// `out += a · Q v`
    pub(crate) fn apply_add(&self, v: &[f32], a: f32, out: &mut [f32]) {
        assert_eq!(v.len(), self.inv.len(), "rotation of a vector of another dimension");
        // SAFETY: `inv` is a signed permutation of `0..d` and `v` has length `d`.
        unsafe { vector::gather_add(out, a, v, &self.inv) };
    }

    /// `Q v`
    pub(crate) fn apply(&self, v: &[f32]) -> Vec<f32> {
        assert_eq!(v.len(), self.inv.len(), "rotation of a vector of another dimension");
        let mut out = Vec::with_capacity(v.len());
        // SAFETY: `inv` is a signed permutation of `0..d` and `v` has length `d`.
        unsafe { vector::gather_into(&mut out, v, &self.inv) };
        out
    }

    /// `Qᵀ u`
    pub(crate) fn apply_t(&self, u: &[f32]) -> Vec<f32> {
        self.apply_t_into(u, Vec::with_capacity(u.len()))
    }

    /// `Qᵀ u`, written into `out`'s allocation.
    pub(crate) fn apply_t_into(&self, u: &[f32], mut out: Vec<f32>) -> Vec<f32> {
        assert_eq!(u.len(), self.fwd.len(), "rotation of a vector of another dimension");
        // SAFETY: `fwd` is a signed permutation of `0..d` and `u` has length `d`.
        unsafe { vector::gather_into(&mut out, u, &self.fwd) };
        out
    }

    /// `Qᵀ` applied to a coordinate mask.
    pub(crate) fn apply_t_mask(&self, m: &[bool]) -> Vec<bool> {
        self.fwd.iter().map(|&p| m[(p & !vector::NEGATE) as usize]).collect()
    }
}

/// Builds and decodes sketches for one set of parameters and modules.
#[derive(Debug)]
pub struct Sketcher {
    params: Params,
    modules: Vec<ModuleSpec>,
    /// `m` rows [`COLUMN_PAD`] floats longer than `d`; row `M` starts with `r_M`.
    presence: Vec<f32>,
    embeddings: Vec<OnceLock<Embedding>>,
    rotations: Vec<OnceLock<Rotation>>,
    slot_base: Vec<usize>,
}

impl Sketcher {
    /// Derives the presence vectors of every module; the rest is built on first use.
    pub fn new(params: Params, modules: &[ModuleSpec]) -> Result<Self> {
        if params.d == 0 {
            return Err(Error::Params("sketch dimension d must be positive".into()));
        }
        if params.c.is_nan() || params.c <= 0.0 {
            return Err(Error::Params("presence constant c must be positive".into()));
        }
        if let Some(spec) = modules.iter().find(|s| s.attr_dim + 1 > params.d) {
            return Err(Error::Params(format!(
                "attribute dimension {} does not fit in d = {}",
                spec.attr_dim, params.d
            )));
        }
        let d = params.d;
        let mut presence = vec![0.0f32; modules.len() * (d + COLUMN_PAD)];
        for (m, row) in presence.chunks_exact_mut(d + COLUMN_PAD).enumerate() {
            row[..d].copy_from_slice(&presence_column(&params, m as u64));
        }
        let mut slot_base = Vec::with_capacity(modules.len() + 1);
        let mut total = 0;
        for s in modules {
            slot_base.push(total);
            total += s.n_slots;
        }
        slot_base.push(total);
        Ok(Sketcher {
            embeddings: (0..modules.len()).map(|_| OnceLock::new()).collect(),
            rotations: (0..total).map(|_| OnceLock::new()).collect(),
            params,
            modules: modules.to_vec(),
            presence,
            slot_base,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The sketch dimension `d`.
    pub fn dim(&self) -> usize {
        self.params.d
    }

    /// The modules, indexed by id.
    pub fn modules(&self) -> &[ModuleSpec] {
        &self.modules
    }

    /// Module `m`'s shape, or an error naming the id.
    pub fn module(&self, m: u32) -> Result<ModuleSpec> {
        self.modules.get(m as usize).copied().ok_or(Error::UnknownModule { module: m, modules: self.modules.len() })
    }

    /// The presence vector `r_M`.
    pub fn presence(&self, m: u32) -> &[f32] {
        let d = self.params.d;
        &self.presence[m as usize * (d + COLUMN_PAD)..][..d]
    }

    /// The decoder threshold in units of σ.
    pub fn tau_sigmas(&self) -> f32 {
        self.params.tau_sigmas.unwrap_or_else(|| {
            let m = self.modules.len() as f32;
            if m <= 64.0 {
                4.5
            } else {
                (2.0 * (m * 64.0 / 0.01).ln()).sqrt()
            }
        })
    }

    /// Column `i` of `R_M` (column 0 is the presence vector).
    pub fn embedding_column(&self, m: u32, i: usize) -> &[f32] {
        self.embedding(m).col(i)
    }

    pub(crate) fn embedding(&self, m: u32) -> &Embedding {
        self.embeddings[m as usize].get_or_init(|| {
            let k = self.modules[m as usize].attr_dim;
            build_embedding(&self.params, m as u64, k, self.presence(m))
        })
    }

    pub(crate) fn rotation(&self, m: u32, slot: usize) -> &Rotation {
        let idx = self.slot_base[m as usize] + slot;
        debug_assert!(idx < self.slot_base[m as usize + 1], "slot {slot} out of range for module {m}");
        self.rotations[idx].get_or_init(|| {
            let d = self.params.d;
            let mut s = Stream::new(self.params.seed, Tag::Rotation, m as u64, slot as u64);
            let mut perm: Vec<u32> = (0..d as u32).collect();
            for i in (1..d).rev() {
                perm.swap(i, s.below(i as u64 + 1) as usize);
            }
            let sign = (0..d).map(|_| s.sign()).collect();
            Rotation::new(perm, sign)
        })
    }

    /// `Q_{M,j} v`: places a sketch in slot `j` of a module-`M` parent (before the edge weight).
    pub fn rotate(&self, m: u32, slot: usize, v: &[f32]) -> Vec<f32> {
        self.rotation(m, slot).apply(v)
    }

    /// `Q_{M,j}ᵀ u`: reads slot `j` of a module-`M` parent's residual.
    pub fn rotate_t(&self, m: u32, slot: usize, u: &[f32]) -> Vec<f32> {
        self.rotation(m, slot).apply_t(u)
    }
}

fn presence_column(p: &Params, m: u64) -> Vec<f32> {
    let g = gaussian_column(p, m, 0);
    let scale = match p.embedding {
        EmbeddingKind::Orthonormal => 1.0 / g.iter().map(|v| v * v).sum::<f64>().sqrt(),
        EmbeddingKind::Gaussian => 1.0 / (p.d as f64).sqrt(),
    };
    g.iter().map(|v| (v * scale) as f32).collect()
}

fn gaussian_column(p: &Params, m: u64, col: usize) -> Vec<f64> {
    let mut out = vec![0.0; p.d];
    draw_column(p, m, col, &mut out);
    out
}

/// The standard normals of column `col` of module `m`'s embedding, before any scaling or QR.
fn draw_column(p: &Params, m: u64, col: usize, out: &mut [f64]) {
    Stream::new(p.seed, Tag::Embedding, m, col as u64).normals(p.sampler, out);
}

fn build_embedding(p: &Params, m: u64, k: usize, presence: &[f32]) -> Embedding {
    let d = p.d;
    match p.embedding {
        EmbeddingKind::Gaussian => {
            let s = 1.0 / (d as f64).sqrt();
            Embedding::with_columns(d, k + 1, |i, out| match i {
                0 => out.copy_from_slice(presence),
                _ => out.iter_mut().zip(gaussian_column(p, m, i)).for_each(|(o, v)| *o = (v * s) as f32),
            })
        }
        EmbeddingKind::Orthonormal => {
            let n = k + 1;
            let mut g = vec![0.0f64; d * n];
            for (i, col) in g.chunks_exact_mut(d).enumerate() {
                draw_column(p, m, i, col);
            }
            if !(d >= CHOLESKY_ROWS_PER_COLUMN * n && orthonormalise(&mut g, d, n)) {
                householder(&mut g, d, n);
            }
            Embedding::with_columns(d, n, |i, out| match i {
                0 => out.copy_from_slice(presence),
                _ => out.iter_mut().zip(&g[i * d..(i + 1) * d]).for_each(|(o, &v)| *o = v as f32),
            })
        }
    }
}

/// Cholesky QR needs `d` well above the column count: its error grows with the square of the
/// condition number, which for a `d × n` Gaussian matrix is about `(√d + √n)/(√d − √n)`, 2.6
/// at `d = 8n` (so an error near `1e-15` in f64) and unbounded as `d` nears `n`.
const CHOLESKY_ROWS_PER_COLUMN: usize = 8;

/// Replaces the `n` columns of `a` (column-major, `d` rows) by the `Q` of their QR with `R`'s
/// diagonal positive, by Cholesky QR in f64: `R` is the Cholesky factor of `AᵀA` and `Q =
/// A R⁻¹`. It gives the same `Q` as Householder QR, the definition, to well below `f32`'s
/// precision, in a third of the time (the Gram matrix and the triangular solve are two streams
/// over `A`, where Householder reflects the trailing columns once per column). Every sum is
/// taken in an order fixed here, without fused multiply-adds, so the bits do not depend on the
/// CPU. Returns false, leaving `a` as it was, where `AᵀA` is not positive definite in f64.
fn orthonormalise(a: &mut [f64], d: usize, n: usize) -> bool {
    let Some(chol) = DMatrix::from_vec(n, n, vector::gram(a, d, n)).cholesky() else {
        return false;
    };
    // `AᵀA = L Lᵀ`, so `R = Lᵀ`, whose rows are `L`'s columns: the column-major storage of `L`.
    vector::solve_upper(a, d, n, chol.l().as_slice());
    true
}

/// Householder QR with the signs that make `R`'s diagonal positive, in place: for dimensions
/// too small for [`orthonormalise`].
fn householder(a: &mut [f64], d: usize, n: usize) {
    let qr = DMatrix::from_column_slice(d, n, a).qr();
    let (q, r) = (qr.q(), qr.r());
    for (i, col) in a.chunks_exact_mut(d).enumerate() {
        let sign = if r[(i, i)] < 0.0 { -1.0 } else { 1.0 };
        col.iter_mut().zip(q.column(i).iter()).for_each(|(o, v)| *o = v * sign);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cholesky QR stands in for the Householder QR that defines the embeddings: both give the
    /// same `f32` matrices, but for the rare entry whose f64 value falls next to a rounding
    /// boundary, one unit in the last place away.
    #[test]
    fn cholesky_qr_gives_the_householder_matrices() {
        let (mut differ, mut total) = (0, 0);
        for (d, k) in [(1024, 8), (4096, 16), (136, 16), (1000, 31)] {
            let p = Params { d, seed: 11, ..Params::default() };
            let n = k + 1;
            for m in 0..4 {
                let mut a = vec![0.0f64; d * n];
                for (i, col) in a.chunks_exact_mut(d).enumerate() {
                    draw_column(&p, m, i, col);
                }
                let mut h = a.clone();
                assert!(orthonormalise(&mut a, d, n), "d = {d}, n = {n}");
                householder(&mut h, d, n);
                for (&x, &y) in a.iter().zip(&h) {
                    let (x, y) = (x as f32, y as f32);
                    assert!(x.to_bits().abs_diff(y.to_bits()) <= 1, "{x} against {y}");
                    differ += usize::from(x != y);
                }
                total += a.len();
            }
        }
        eprintln!("{differ} of {total} entries one unit apart");
        assert!(differ * 10_000 < total, "{differ} of {total} entries differ");
    }
}
