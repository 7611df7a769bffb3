//! The recursive construction `s(θ) = R_M [c; x_θ] + Σ_j α_j Q_{M,j} s(θ_j)`, memoised over a DAG.

use crate::sketch::Sketch;
use crate::sketcher::Sketcher;
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

    /// The sketches of many DAGs.
    pub fn sketch_batch(&self, dags: &[Dag]) -> Result<Vec<Sketch>> {
        let d = self.dim();
        let mut pool = Vec::new();
        dags.iter()
            .map(|dag| {
                let mut out = vec![0.0f32; d];
                let mut top_weight = vec![0.0f32; dag.nodes.len()];
                for &(id, w) in &dag.top {
                    if let Some(t) = top_weight.get_mut(id) {
                        *t += w;
                    }
                }
                self.walk(dag, None, &mut pool, |id, s| {
                    if top_weight[id] != 0.0 {
                        crate::vector::axpy(&mut out, top_weight[id], s);
                    }
                })?;
                Ok(Sketch { data: out, full_dim: d })
            })
            .collect()
    }

    /// The sketch `s(θ)` of one node of a DAG (its subtree), for storing objects individually.
    pub fn sketch_node(&self, dag: &Dag, id: NodeId) -> Result<Sketch> {
        if id >= dag.nodes.len() {
            return Err(Error::Dag(format!("node {id} does not exist")));
        }
        let mut found = Vec::new();
        self.walk(dag, Some(id), &mut Vec::new(), |node, s| {
            if node == id {
                found = s.to_vec();
            }
        })?;
        Ok(Sketch { data: found, full_dim: self.dim() })
    }

    /// Computes `s(θ)` for the nodes of a DAG, children first, handing each finished one to
    /// `visit`. Nodes are visited in post order so that a child's vector is still in cache when
    /// its parent adds it, and a vector goes back to `pool` as soon as its last parent has read
    /// it, so the working set is a few vectors rather than one per node: memory traffic, not
    /// arithmetic, is what construction time is made of (an embedding is `d·(k+1)` floats, each
    /// used for one multiply-add). `only`: stop after that node.
    fn walk(
        &self,
        dag: &Dag,
        only: Option<NodeId>,
        pool: &mut Vec<Vec<f32>>,
        mut visit: impl FnMut(NodeId, &[f32]),
    ) -> Result<()> {
        let d = self.dim();
        let order = self.post_order(dag)?;
        let mut uses = vec![0u32; dag.nodes.len()];
        for n in &dag.nodes {
            for e in &n.children {
                uses[e.child] += 1;
            }
        }
        let c = self.params().c;
        let mut own: Vec<Option<Vec<f32>>> = vec![None; dag.nodes.len()];
        let mut coef = Vec::new();
        for id in order {
            let node = &dag.nodes[id];
            let mut s = pool.pop().unwrap_or_else(|| vec![0.0; d]);
            coef.clear();
            coef.push(c);
            coef.extend_from_slice(&node.attr);
            s.fill(0.0);
            crate::vector::combine(&mut s, &self.embedding(node.module).cols, &coef);
            for e in &node.children {
                let child = own[e.child].as_deref().expect("children come first in post order");
                self.rotation(node.module, e.slot).apply_add(child, e.weight, &mut s);
                uses[e.child] -= 1;
                if uses[e.child] == 0 {
                    pool.extend(own[e.child].take());
                }
            }
            visit(id, &s);
            if only == Some(id) {
                return Ok(());
            }
            if uses[id] == 0 {
                pool.push(s);
            } else {
                own[id] = Some(s);
            }
        }
        Ok(())
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Visit {
    New,
    Open,
    Done,
}
