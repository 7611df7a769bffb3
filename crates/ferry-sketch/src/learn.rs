//! Learning from sketches.
//!
//! With the matrices known, decoded sketches expose each module's inputs (its children's
//! attributes) and output (its own attributes), so a module is learned by plain regression
//! ([`linear_map`]). With the matrices unknown, the presence vectors are the atoms of a sparse
//! dictionary behind the sketches; [`learn_dictionary`] recovers them by over-parameterised MOD
//! (method of optimal directions with OMP coding). Plain MOD gets stuck with one atom standing for
//! two true ones; more atoms than modules, plus moving duplicate and unused atoms to the worst-coded
//! sample's residual after each iteration, is what splits them again (without the move, one run
//! in five left two or more true atoms merged). [`spherical_kmeans`] learns codewords ("visual
//! words") that turn feature vectors into modules. [`Pca`] fits the module subspaces once the
//! atoms are known, and the attribute projections that turn model features into attributes.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::rng::Stream;
use crate::vector;
use crate::{Error, Result};

/// Least-squares `W` (rows = outputs, columns = inputs) minimising `Σ_t ‖y_t − W x_t‖²`.
pub fn linear_map(inputs: &[Vec<f32>], outputs: &[Vec<f32>]) -> Result<DMatrix<f64>> {
    let (n, p) = shape(inputs)?;
    let (n2, q) = shape(outputs)?;
    if n != n2 {
        return Err(Error::Params(format!("{n} inputs but {n2} outputs")));
    }
    let x = DMatrix::from_fn(n, p, |r, c| inputs[r][c] as f64);
    let y = DMatrix::from_fn(n, q, |r, c| outputs[r][c] as f64);
    let w = x.svd(true, true).solve(&y, 1e-12).map_err(|e| Error::Params(e.to_string()))?;
    Ok(w.transpose())
}

fn shape(rows: &[Vec<f32>]) -> Result<(usize, usize)> {
    let n = rows.len();
    let p = rows.first().map_or(0, Vec::len);
    if n == 0 || p == 0 || rows.iter().any(|r| r.len() != p) {
        return Err(Error::Params("samples must be non-empty and of equal length".into()));
    }
    Ok((n, p))
}

/// Orthogonal matching pursuit: a code of `y` with at most `sparsity` atoms of `dict` (columns,
/// unit norm), as `(atom, coefficient)` pairs.
pub fn omp(dict: &DMatrix<f64>, y: &DVector<f64>, sparsity: usize) -> Vec<(usize, f64)> {
    let mut idx: Vec<usize> = Vec::new();
    let mut coef = DVector::<f64>::zeros(0);
    let mut r = y.clone();
    for _ in 0..sparsity {
        let corr = dict.tr_mul(&r);
        let best = corr.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).map(|(i, _)| i);
        let Some(i) = best else { break };
        if idx.contains(&i) {
            break;
        }
        idx.push(i);
        let sub = dict.select_columns(&idx);
        match sub.clone().svd(true, true).solve(y, 1e-12) {
            Ok(c) => coef = c,
            Err(_) => break,
        }
        r = y - sub * &coef;
    }
    idx.into_iter().zip(coef.iter().copied()).collect()
}

/// Settings of [`learn_dictionary`].
#[derive(Debug, Clone, PartialEq)]
pub struct DictionaryOptions {
    /// Atoms to learn; about 1.5 × the expected number of modules.
    pub atoms: usize,
    /// Atoms per sample in the OMP coding step.
    pub sparsity: usize,
    /// MOD iterations.
    pub iterations: usize,
    /// Seed for the initial atoms and re-seeding.
    pub seed: u64,
    /// Two atoms closer than this |cosine| are one; the less used one is dropped at the end.
    pub duplicate_cosine: f64,
    /// Atoms used by fewer samples than this at the end are dropped.
    pub min_usage: usize,
}

impl Default for DictionaryOptions {
    fn default() -> Self {
        DictionaryOptions { atoms: 48, sparsity: 3, iterations: 15, seed: 0, duplicate_cosine: 0.95, min_usage: 3 }
    }
}

/// Learns unit-norm dictionary atoms (the columns of the result) from samples that are sparse
/// combinations of unknown atoms.
pub fn learn_dictionary(samples: &[Vec<f32>], opts: &DictionaryOptions) -> Result<DMatrix<f64>> {
    let (t, d) = shape(samples)?;
    if opts.atoms == 0 || opts.atoms > t {
        return Err(Error::Params(format!("cannot learn {} atoms from {t} samples", opts.atoms)));
    }
    let y = DMatrix::from_fn(d, t, |r, c| samples[c][r] as f64);
    let mut rng = Stream::from_seed(opts.seed);
    let mut dict = DMatrix::<f64>::zeros(d, opts.atoms);
    for (a, s) in distinct(&mut rng, t, opts.atoms).into_iter().enumerate() {
        dict.set_column(a, &y.column(s));
    }
    normalise(&mut dict, &y, &mut rng);
    let mut codes = Vec::new();
    for it in 0..opts.iterations {
        codes = code_all(&dict, &y, opts.sparsity);
        // MOD update D = Y Zᵀ (Z Zᵀ)⁺, with Z sparse.
        let mut zzt = DMatrix::<f64>::zeros(opts.atoms, opts.atoms);
        let mut yzt = DMatrix::<f64>::zeros(d, opts.atoms);
        for (s, code) in codes.iter().enumerate() {
            for &(i, a) in code {
                for &(j, b) in code {
                    zzt[(i, j)] += a * b;
                }
                yzt.column_mut(i).axpy(a, &y.column(s), 1.0);
            }
        }
        let pinv = zzt.pseudo_inverse(1e-10).map_err(|e| Error::Params(e.to_string()))?;
        dict = yzt * pinv;
        normalise(&mut dict, &y, &mut rng);
        if it + 1 < opts.iterations {
            replace_wasted(&mut dict, &y, &codes, opts);
        }
    }
    // Prune: duplicates (keep the more used) and atoms hardly anyone uses.
    let mut usage = vec![0usize; opts.atoms];
    for code in &codes {
        for &(i, _) in code {
            usage[i] += 1;
        }
    }
    let mut order: Vec<usize> = (0..opts.atoms).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(usage[i]));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if usage[i] < opts.min_usage {
            continue;
        }
        if kept.iter().all(|&j| dict.column(i).dot(&dict.column(j)).abs() <= opts.duplicate_cosine) {
            kept.push(i);
        }
    }
    Ok(dict.select_columns(&kept))
}

/// Spare atoms are what lets MOD split an atom that has merged two true ones: an atom that
/// duplicates another (|cos| above `duplicate_cosine`) or that almost no sample uses is moved to
/// the direction the dictionary explains worst, the residual of the worst-coded sample.
fn replace_wasted(dict: &mut DMatrix<f64>, y: &DMatrix<f64>, codes: &[Vec<(usize, f64)>], opts: &DictionaryOptions) {
    let atoms = dict.ncols();
    let mut usage = vec![0usize; atoms];
    for code in codes {
        for &(i, _) in code {
            usage[i] += 1;
        }
    }
    let mut wasted: Vec<usize> = (0..atoms).filter(|&i| usage[i] < opts.min_usage).collect();
    for i in 0..atoms {
        for j in i + 1..atoms {
            if dict.column(i).dot(&dict.column(j)).abs() > opts.duplicate_cosine {
                let drop = if usage[i] < usage[j] { i } else { j };
                if !wasted.contains(&drop) {
                    wasted.push(drop);
                }
            }
        }
    }
    if wasted.is_empty() {
        return;
    }
    let mut residuals: Vec<(f64, DVector<f64>)> = codes
        .iter()
        .enumerate()
        .map(|(s, code)| {
            let mut r = y.column(s).into_owned();
            for &(i, a) in code {
                r.axpy(-a, &dict.column(i), 1.0);
            }
            (r.norm(), r)
        })
        .collect();
    residuals.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (atom, (norm, r)) in wasted.into_iter().zip(residuals) {
        if norm > 1e-9 {
            dict.set_column(atom, &(r / norm));
        }
    }
}

fn code_all(dict: &DMatrix<f64>, y: &DMatrix<f64>, sparsity: usize) -> Vec<Vec<(usize, f64)>> {
    (0..y.ncols()).map(|s| omp(dict, &y.column(s).into_owned(), sparsity)).collect()
}

fn distinct(rng: &mut Stream, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

/// Normalises every column; a dead one (norm ~0) is replaced by a random sample.
fn normalise(dict: &mut DMatrix<f64>, y: &DMatrix<f64>, rng: &mut Stream) {
    for a in 0..dict.ncols() {
        let mut n = dict.column(a).norm();
        if n < 1e-8 {
            let s = rng.below(y.ncols() as u64) as usize;
            dict.set_column(a, &y.column(s));
            n = dict.column(a).norm().max(1e-12);
        }
        dict.column_mut(a).scale_mut(1.0 / n);
    }
}

/// Spherical k-means: `k` unit centroids of L2-normalised samples, assigned by cosine, seeded with
/// k-means++ from `seed`. Fewer centroids come back when there are fewer distinct samples.
pub fn spherical_kmeans(samples: &[Vec<f32>], k: usize, iterations: usize, seed: u64) -> Result<Vec<Vec<f32>>> {
    let (n, p) = shape(samples)?;
    let unit: Vec<Vec<f32>> = samples
        .iter()
        .map(|s| {
            let norm = s.iter().map(|v| v * v).sum::<f32>().sqrt();
            s.iter().map(|v| if norm > 0.0 { v / norm } else { 0.0 }).collect()
        })
        .collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut rng = Stream::from_seed(seed);
    let mut centroids = vec![unit[rng.below(n as u64) as usize].clone()];
    // k-means++ on the cosine distance 1 - cos.
    let mut dist: Vec<f64> = unit.iter().map(|u| (1.0 - dot(u, &centroids[0]) as f64).max(0.0)).collect();
    while centroids.len() < k.min(n) {
        let total: f64 = dist.iter().sum();
        if total <= 1e-12 {
            break;
        }
        let mut target = rng.uniform() * total;
        let mut pick = n - 1;
        for (i, &d) in dist.iter().enumerate() {
            if target <= d {
                pick = i;
                break;
            }
            target -= d;
        }
        centroids.push(unit[pick].clone());
        for (d, u) in dist.iter_mut().zip(&unit) {
            *d = d.min((1.0 - dot(u, &unit[pick]) as f64).max(0.0));
        }
    }
    for _ in 0..iterations {
        let mut sums = vec![vec![0.0f64; p]; centroids.len()];
        for (u, best) in unit.iter().zip(nearest_each(&centroids, &unit)) {
            sums[best].iter_mut().zip(u).for_each(|(s, v)| *s += *v as f64);
        }
        for (c, s) in centroids.iter_mut().zip(&sums) {
            let norm = s.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                *c = s.iter().map(|v| (v / norm) as f32).collect();
            }
        }
    }
    Ok(centroids)
}

/// Index of the centroid with the largest inner product with `x`.
pub fn nearest(centroids: &[Vec<f32>], x: &[f32]) -> usize {
    nearest_each(centroids, &[x])[0]
}

/// [`nearest`] for each of many points. Each centroid is read once for all of them rather than
/// once per point, which matters once the centroids outgrow the L1 cache (64 codewords of 1,280
/// channels are 320 KiB); the inner products are the same, so are the answers.
pub fn nearest_each<X: AsRef<[f32]>>(centroids: &[Vec<f32>], xs: &[X]) -> Vec<usize> {
    let mut best = vec![(0, f32::NEG_INFINITY); xs.len()];
    for (i, c) in centroids.iter().enumerate() {
        for (b, x) in best.iter_mut().zip(xs) {
            let v = vector::dot(c, x.as_ref());
            if v > b.1 {
                *b = (i, v);
            }
        }
    }
    best.into_iter().map(|(i, _)| i).collect()
}

/// A principal-component projection fitted on samples, optionally whitening.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    /// The sample mean.
    pub mean: Vec<f32>,
    /// Principal directions, one unit vector per row, largest variance first.
    pub components: Vec<Vec<f32>>,
    /// The variance along each component.
    pub variances: Vec<f32>,
}

impl Pca {
    /// Fits the top `k` components of the samples (rows).
    pub fn fit(samples: &[Vec<f32>], k: usize) -> Result<Pca> {
        let (n, p) = shape(samples)?;
        if k == 0 || k > p.min(n) {
            return Err(Error::Params(format!("cannot fit {k} components to {n} samples of dimension {p}")));
        }
        let mut mean = vec![0.0f64; p];
        for s in samples {
            for (m, &v) in mean.iter_mut().zip(s) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let x = DMatrix::from_fn(n, p, |r, c| samples[r][c] as f64 - mean[c]);
        let denom = (n.max(2) - 1) as f64;
        // Eigen-decompose whichever of XᵀX (p×p) and XXᵀ (n×n) is smaller.
        let (vecs, vals): (Vec<DVector<f64>>, Vec<f64>) = if p <= n {
            let eig = SymmetricEigen::new(x.tr_mul(&x) / denom);
            top(&eig, k).into_iter().map(|i| (eig.eigenvectors.column(i).into_owned(), eig.eigenvalues[i])).unzip()
        } else {
            let eig = SymmetricEigen::new(&x * x.transpose() / denom);
            top(&eig, k)
                .into_iter()
                .map(|i| {
                    let mut v = x.tr_mul(&eig.eigenvectors.column(i));
                    let nrm = v.norm();
                    if nrm > 0.0 {
                        v /= nrm;
                    }
                    (v, eig.eigenvalues[i])
                })
                .unzip()
        };
        Ok(Pca {
            mean: mean.iter().map(|&m| m as f32).collect(),
            components: vecs.iter().map(|v| v.iter().map(|&x| x as f32).collect()).collect(),
            variances: vals.iter().map(|&v| v.max(0.0) as f32).collect(),
        })
    }

    /// Coordinates of `x` along the components; divided by each component's standard deviation
    /// when `whiten`.
    pub fn project(&self, x: &[f32], whiten: bool) -> Vec<f32> {
        project(&self.mean, &self.components, &self.variances, x, whiten)
    }
}

/// [`Pca::project`] on borrowed parts, for callers that keep them in their own structures.
pub fn project(mean: &[f32], components: &[Vec<f32>], variances: &[f32], x: &[f32], whiten: bool) -> Vec<f32> {
    project_each(mean, components, variances, &[x], whiten).remove(0)
}

/// [`project`] for each of many points, reading each component once for all of them.
pub fn project_each<X: AsRef<[f32]>>(
    mean: &[f32],
    components: &[Vec<f32>],
    variances: &[f32],
    xs: &[X],
    whiten: bool,
) -> Vec<Vec<f32>> {
    let centred: Vec<Vec<f32>> = xs.iter().map(|x| x.as_ref().iter().zip(mean).map(|(x, m)| x - m).collect()).collect();
    let mut out: Vec<Vec<f32>> = xs.iter().map(|_| Vec::with_capacity(components.len())).collect();
    for (c, &var) in components.iter().zip(variances) {
        for (z, x) in out.iter_mut().zip(&centred) {
            let v = vector::dot(c, x);
            z.push(if whiten { v / var.sqrt().max(1e-12) } else { v });
        }
    }
    out
}

fn top(eig: &SymmetricEigen<f64, nalgebra::Dyn>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..eig.eigenvalues.len()).collect();
    idx.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_finds_separated_directions() {
        let mut rng = Stream::from_seed(1);
        let dirs: Vec<Vec<f32>> =
            (0..4).map(|i| (0..8).map(|j| if j == i * 2 { 1.0 } else { 0.0 }).collect()).collect();
        let samples: Vec<Vec<f32>> = (0..400)
            .map(|t| {
                dirs[t % 4].iter().map(|v| v * (1.0 + rng.uniform() as f32) + 0.05 * rng.normal() as f32).collect()
            })
            .collect();
        let c = spherical_kmeans(&samples, 4, 10, 3).unwrap();
        assert_eq!(c.len(), 4);
        for d in &dirs {
            assert!(c.iter().any(|c| c.iter().zip(d).map(|(a, b)| a * b).sum::<f32>() > 0.99), "{c:?}");
        }
        assert_eq!(nearest(&c, &dirs[2]), nearest(&c, &samples[2]));
    }
}
