//! Random object trees and their ground truth, shared by the specification tests.
#![allow(dead_code)]

use std::collections::HashMap;

use ferry_sketch::{Dag, Decoded, ModuleSpec, NodeId, Params, Sketch, Sketcher};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn unit(rng: &mut StdRng, k: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..k).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

pub fn sketcher(d: usize, k: usize, m: usize, slots: usize, seed: u64) -> Sketcher {
    let params = Params { d, seed, ..Params::default() };
    Sketcher::new(params, &vec![ModuleSpec { attr_dim: k, n_slots: slots }; m]).unwrap()
}

/// One object of a tree, with everything the tests compare against.
#[derive(Debug, Clone)]
pub struct Truth {
    pub path: Vec<u16>,
    pub module: u32,
    pub weight: f32,
    pub attr: Vec<f32>,
    /// ((module, slot) along the path, then the object's module).
    pub signature: (Vec<(u32, u16)>, u32),
}

#[derive(Debug, Clone)]
pub struct Tree {
    pub dag: Dag,
    pub root: NodeId,
}

/// A complete tree of fan-out `fan` and depth `depth`, modules uniform in `0..m`, unit attributes.
pub fn random_tree(rng: &mut StdRng, m: usize, k: usize, fan: usize, depth: usize, alpha: f32) -> Tree {
    let mut dag = Dag::default();
    let root = grow(&mut dag, rng, m, k, fan, depth, alpha);
    dag.top.push((root, 1.0));
    Tree { dag, root }
}

fn grow(dag: &mut Dag, rng: &mut StdRng, m: usize, k: usize, fan: usize, depth: usize, alpha: f32) -> NodeId {
    let module = rng.random_range(0..m as u32);
    let id = dag.add(module, unit(rng, k));
    if depth > 0 {
        for j in 0..fan {
            let c = grow(dag, rng, m, k, fan, depth - 1, alpha);
            dag.link(id, j, alpha, c);
        }
    }
    id
}

/// The same tree with each module changed with probability `p_module` and attributes moved by
/// Gaussian noise of scale `noise` (then renormalised).
pub fn perturb(rng: &mut StdRng, t: &Tree, m: usize, p_module: f64, noise: f32) -> Tree {
    let mut dag = t.dag.clone();
    for n in &mut dag.nodes {
        if rng.random_bool(p_module) {
            n.module = rng.random_range(0..m as u32);
        }
        for x in &mut n.attr {
            *x += noise * rng.sample::<f32, _>(StandardNormal);
        }
        let norm = n.attr.iter().map(|x| x * x).sum::<f32>().sqrt();
        n.attr.iter_mut().for_each(|x| *x /= norm);
    }
    Tree { dag, root: t.root }
}

/// Every object reachable from the top, by path.
pub fn flatten(t: &Tree) -> HashMap<Vec<u16>, Truth> {
    let mut out = HashMap::new();
    for &(id, w) in &t.dag.top {
        walk(&t.dag, id, w, Vec::new(), Vec::new(), &mut out);
    }
    out
}

fn walk(dag: &Dag, id: NodeId, w: f32, path: Vec<u16>, sig: Vec<(u32, u16)>, out: &mut HashMap<Vec<u16>, Truth>) {
    let n = &dag.nodes[id];
    out.insert(
        path.clone(),
        Truth {
            path: path.clone(),
            module: n.module,
            weight: w,
            attr: n.attr.clone(),
            signature: (sig.clone(), n.module),
        },
    );
    for e in &n.children {
        let mut p = path.clone();
        p.push(e.slot as u16);
        let mut s = sig.clone();
        s.push((n.module, e.slot as u16));
        walk(dag, e.child, w * e.weight, p, s, out);
    }
}

pub fn dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Recovery statistics over objects with SNR ≥ 6.
#[derive(Debug, Default)]
pub struct Recovery {
    pub eligible: usize,
    pub identified: usize,
    pub errors: Vec<f32>,
    pub false_positives: usize,
    pub decoded: usize,
}

impl Recovery {
    pub fn rate(&self) -> f64 {
        self.identified as f64 / self.eligible.max(1) as f64
    }

    pub fn quantile(&self, q: f64) -> f32 {
        let mut e = self.errors.clone();
        e.sort_by(f32::total_cmp);
        e[((e.len() - 1) as f64 * q).round() as usize]
    }

    pub fn max(&self) -> f32 {
        self.errors.iter().copied().fold(0.0, f32::max)
    }

    /// Scores one decode against the truth; `sigma` is the noise level the SNR is measured in.
    pub fn add(&mut self, truth: &HashMap<Vec<u16>, Truth>, decoded: &[Decoded], sigma: f32, k: usize) {
        let got: HashMap<&Vec<u16>, &Decoded> = decoded.iter().map(|d| (&d.path, d)).collect();
        self.decoded += decoded.len();
        for t in truth.values() {
            if t.weight / sigma >= 6.0 {
                self.eligible += 1;
                if let Some(d) = got.get(&t.path).filter(|d| d.module == t.module) {
                    self.identified += 1;
                    self.errors.push(dist(&d.attr, &t.attr) * t.weight / ((k as f32).sqrt() * sigma));
                }
            }
        }
        self.false_positives +=
            decoded.iter().filter(|d| truth.get(&d.path).is_none_or(|t| t.module != d.module)).count();
    }
}

pub fn sigma_of(s: &Sketch, full_norm: f32, kept: usize) -> f32 {
    let _ = s;
    full_norm / (kept as f32).sqrt()
}
