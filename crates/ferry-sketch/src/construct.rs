//! The recursive construction `s(θ) = R_M [c; x_θ] + Σ_j α_j Q_{M,j} s(θ_j)`, memoised over a DAG.

use std::cell::Cell;

use crate::sketch::Sketch;
use crate::sketcher::{Sketcher, COLUMN_PAD};
use crate::{Error, Result};

/// Index of a node in [`Dag::nodes`].
pub type NodeId = usize;

/// An edge from a parent to a child placed in one of the parent module's slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    /// The slot `j < K_M` of the parent's module.
    pub slot: usize,
    /// The edge weight `α`.
    pub weight: f32,
    /// The child node.
    pub child: NodeId,
}

/// An object: the module that produced it, its attributes and its children.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Module id.
    pub module: u32,
    /// Attribute vector of length `k_M`, norm at most 1.
    pub attr: Vec<f32>,
    /// Child edges. A node may be the child of several parents; it is sketched once.
    pub children: Vec<Edge>,
}

/// The objects one input produced, with the weighted top set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dag {
    /// All nodes.
    pub nodes: Vec<Node>,
    /// Top-level objects and their weights `w_θ`.
    pub top: Vec<(NodeId, f32)>,
}

impl Dag {
    /// Adds a node and returns its id.
    pub fn add(&mut self, module: u32, attr: Vec<f32>) -> NodeId {
        self.nodes.push(Node { module, attr, children: Vec::new() });
        self.nodes.len() - 1
    }

    /// Adds an edge `parent --(slot, weight)--> child`.
    pub fn link(&mut self, parent: NodeId, slot: usize, weight: f32, child: NodeId) {
        self.nodes[parent].children.push(Edge { slot, weight, child });
    }
}

impl Sketcher {
    /// The top-level sketch `S = Σ_{θ∈Top} w_θ s(θ)` of a DAG.
    pub fn sketch(&self, dag: &Dag) -> Result<Sketch> {
        Ok(self.sketch_batch(std::slice::from_ref(dag))?.remove(0))
    }

    /// The sketches of many DAGs. Building many at once is faster than one by one: the objects
    /// of all of them are embedded module by module, so each embedding is read once per batch.
    pub fn sketch_batch(&self, dags: &[Dag]) -> Result<Vec<Sketch>> {
        let d = self.dim();
        let orders = dags.iter().map(|dag| self.post_order(dag)).collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(dags.len());
        self.build(dags, &orders, |i, node| {
            let dag = &dags[i];
            let mut top_weight = vec![0.0f32; dag.nodes.len()];
            for &(id, w) in &dag.top {
                top_weight[id] += w;
            }
            let mut s = vec![0.0f32; d];
            for &id in &orders[i] {
                if top_weight[id] != 0.0 {
                    crate::vector::axpy(&mut s, top_weight[id], node.get(id));
                }
            }
            out.push(Sketch { data: s, full_dim: d });
        });
        Ok(out)
    }

    /// The sketch `s(θ)` of one node of a DAG (its subtree), for storing objects individually.
    pub fn sketch_node(&self, dag: &Dag, id: NodeId) -> Result<Sketch> {
        if id >= dag.nodes.len() {
            return Err(Error::Dag(format!("node {id} does not exist")));
        }
        let d = self.dim();
        let order = self.post_order(dag)?;
        let mut found = Vec::new();
        self.build(std::slice::from_ref(dag), std::slice::from_ref(&order), |_, node| {
            found = node.get(id).to_vec();
        });
        Ok(Sketch { data: found, full_dim: d })
    }

    /// Computes `s(θ)` for every node of the DAGs and hands each DAG's [`Vectors`] to `finish`.
    /// Two passes over a chunk of DAGs whose vectors fit [`Sketcher::arena_bytes`]:
    /// first every node's own term `R_M [c; x_θ]`, module by module and a block of rows at a
    /// time for all of a module's nodes, so a block of the embedding is loaded into L1 once
    /// per chunk rather than the whole embedding streamed once per node (an embedding is
    /// `d·(k+1)` floats, each used for one multiply-add, so reading it was the cost); then the
    /// children, in post order, each added into its parents by one signed-permutation gather.
    /// Each node's arithmetic is the same whichever DAGs share its batch, so results do not
    /// depend on how DAGs are batched.
    fn build(&self, dags: &[Dag], orders: &[Vec<NodeId>], mut finish: impl FnMut(usize, Vectors<'_>)) {
        let d = self.dim();
        // Padded like embedding columns, for the same reason.
        let ds = d + COLUMN_PAD;
        let c = self.params().c;
        let cap = self.arena_bytes(dags);
        let mut buf = ARENA.take();
        let mut start = 0;
        while start < dags.len() {
            let (mut end, mut nodes) = (start, 0);
            while end < dags.len() && (end == start || (nodes + dags[end].nodes.len()) * ds * 4 <= cap) {
                nodes += dags[end].nodes.len();
                end += 1;
            }
            let chunk = &dags[start..end];
            // Vectors start on cache lines, so that whole lines can be streamed.
            if buf.len() < nodes * ds + LINE_FLOATS {
                buf.resize(nodes * ds + LINE_FLOATS, 0.0);
            }
            let offset = buf.as_ptr().align_offset(LINE_FLOATS * 4).min(LINE_FLOATS);
            let arena = &mut buf[offset..];
            let mut items = Vec::with_capacity(nodes);
            let mut base = 0;
            for (i, dag) in chunk.iter().enumerate() {
                items.extend(dag.nodes.iter().enumerate().map(|(id, n)| (n.module, base + id, i, id)));
                base += dag.nodes.len();
            }
            items.sort_unstable_by_key(|&(module, slot, ..)| (module, slot));
            // Vectors that leave the caches before the second pass reads them go to memory
            // without being read first.
            let stream = cap > L2_ARENA && nodes * ds * 4 > L2_ARENA;
            let mut coef = Vec::new();
            let mut slots = Vec::new();
            for group in items.chunk_by(|a, b| a.0 == b.0) {
                coef.clear();
                slots.clear();
                for &(_, slot, i, id) in group {
                    coef.push(c);
                    coef.extend_from_slice(&chunk[i].nodes[id].attr);
                    slots.push(slot);
                }
                let cols: Vec<&[f32]> = self.embedding(group[0].0).cols().collect();
                crate::vector::combine_into(arena, ds, &slots, &cols, &coef, stream);
            }
            if stream {
                crate::vector::stream_fence();
            }
            let mut base = 0;
            for (i, dag) in chunk.iter().enumerate() {
                let vectors = &mut arena[base * ds..(base + dag.nodes.len()) * ds];
                for &id in &orders[start + i] {
                    let node = &dag.nodes[id];
                    for e in &node.children {
                        let (parent, child) = pair(vectors, ds, d, id, e.child);
                        self.rotation(node.module, e.slot).apply_add(child, e.weight, parent);
                    }
                }
                finish(start + i, Vectors { data: vectors, stride: ds, d });
                base += dag.nodes.len();
            }
            start = end;
        }
        ARENA.set(buf);
    }

    /// How many bytes of node vectors one pass of [`Sketcher::build`] should hold. Each pass
    /// reads the embeddings its nodes use, and writes and reads its node vectors. When those
    /// embeddings are few enough to stay in the shared L3 from one pass to the next, passes are
    /// kept small enough that the node vectors never leave the core's L2. Otherwise every pass
    /// fetches the embeddings from memory again, so there are as few passes as the memory
    /// budget allows.
    fn arena_bytes(&self, dags: &[Dag]) -> usize {
        let mut seen = vec![false; self.modules().len()];
        let mut bytes = 0;
        for node in dags.iter().flat_map(|dag| &dag.nodes) {
            let m = node.module as usize;
            if !seen[m] {
                seen[m] = true;
                bytes += (self.modules()[m].attr_dim + 1) * self.dim() * 4;
            }
        }
        if bytes <= CACHED_EMBEDDINGS {
            L2_ARENA
        } else {
            MAX_ARENA
        }
    }

    /// Checks a DAG against the modules and orders its nodes children first.
    fn post_order(&self, dag: &Dag) -> Result<Vec<NodeId>> {
        let n = dag.nodes.len();
        for (id, node) in dag.nodes.iter().enumerate() {
            let spec = self.module(node.module)?;
            if node.attr.len() != spec.attr_dim {
                return Err(Error::Dag(format!(
                    "node {id} of module {} has {} attributes, the module has {}",
                    node.module,
                    node.attr.len(),
                    spec.attr_dim
                )));
            }
            for e in &node.children {
                if e.slot >= spec.n_slots {
                    return Err(Error::Dag(format!(
                        "node {id} puts a child in slot {} of module {}, which has {} slots",
                        e.slot, node.module, spec.n_slots
                    )));
                }
                if e.child >= n {
                    return Err(Error::Dag(format!("node {id} has child {}, which does not exist", e.child)));
                }
            }
        }
        if let Some(&(id, _)) = dag.top.iter().find(|(id, _)| *id >= n) {
            return Err(Error::Dag(format!("top object {id} does not exist")));
        }
        let mut state = vec![Visit::New; n];
        let mut order = Vec::with_capacity(n);
        for root in 0..n {
            if state[root] != Visit::New {
                continue;
            }
            // Iterative depth-first search: (node, next child to visit).
            let mut stack = vec![(root, 0usize)];
            state[root] = Visit::Open;
            while let Some(&mut (id, ref mut next)) = stack.last_mut() {
                if let Some(e) = dag.nodes[id].children.get(*next) {
                    *next += 1;
                    match state[e.child] {
                        Visit::New => {
                            state[e.child] = Visit::Open;
                            stack.push((e.child, 0));
                        }
                        Visit::Open => {
                            return Err(Error::Dag(format!(
                                "node {} is its own descendant (the graph has a cycle)",
                                e.child
                            )))
                        }
                        Visit::Done => {}
                    }
                } else {
                    state[id] = Visit::Done;
                    order.push(id);
                    stack.pop();
                }
            }
        }
        Ok(order)
    }
}

/// Node vectors of a pass that stay in one core's L2 cache (512 KiB to 1 MiB on current x86
/// and Arm server cores) beside the embedding blocks being read.
const L2_ARENA: usize = 512 << 10;

/// Embeddings up to this size stay in a shared L3 between passes. At d = 4096 with 17 columns
/// per module, small passes were faster up to 24 modules (6.7 MiB), even at 32 (8.9 MiB) and
/// slower at 64 (17.8 MiB).
const CACHED_EMBEDDINGS: usize = 8 << 20;

/// Floats in a cache line.
const LINE_FLOATS: usize = 16;

/// At most what a batch's node vectors may hold in memory.
const MAX_ARENA: usize = 64 << 20;

thread_local! {
    /// The node vectors of the chunk being built, kept between calls: a fresh allocation of
    /// this size costs its page faults on every batch.
    static ARENA: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The node vectors of one DAG, node `n` at `n · stride`.
struct Vectors<'a> {
    data: &'a [f32],
    stride: usize,
    d: usize,
}

impl Vectors<'_> {
    fn get(&self, id: NodeId) -> &[f32] {
        &self.data[id * self.stride..][..self.d]
    }
}

/// Node `a`'s vector for writing and node `b`'s for reading, `a != b`; vectors `ds` apart.
fn pair(vectors: &mut [f32], ds: usize, d: usize, a: usize, b: usize) -> (&mut [f32], &[f32]) {
    if a < b {
        let (lo, hi) = vectors.split_at_mut(b * ds);
        (&mut lo[a * ds..][..d], &hi[..d])
    } else {
        let (lo, hi) = vectors.split_at_mut(a * ds);
        (&mut hi[..d], &lo[b * ds..][..d])
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Visit {
    New,
    Open,
    Done,
}
