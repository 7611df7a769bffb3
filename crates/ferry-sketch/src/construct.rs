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
        let d = self.dim();
        let mut memo: Vec<Option<Vec<f32>>> = vec![None; dag.nodes.len()];
        let mut state = vec![Visit::New; dag.nodes.len()];
        let mut out = vec![0.0f32; d];
        for &(id, w) in &dag.top {
            self.node_sketch(dag, id, &mut memo, &mut state)?;
            crate::vector::axpy(&mut out, w, memo[id].as_deref().expect("just built"));
        }
        Ok(Sketch { data: out, full_dim: d })
    }

    /// The sketch `s(θ)` of one node of a DAG (its subtree), for storing objects individually.
    pub fn sketch_node(&self, dag: &Dag, id: NodeId) -> Result<Sketch> {
        let mut memo: Vec<Option<Vec<f32>>> = vec![None; dag.nodes.len()];
        let mut state = vec![Visit::New; dag.nodes.len()];
        self.node_sketch(dag, id, &mut memo, &mut state)?;
        Ok(Sketch { data: memo[id].take().expect("just built"), full_dim: self.dim() })
    }

    /// Fills `memo[id]`.
    fn node_sketch(&self, dag: &Dag, id: NodeId, memo: &mut [Option<Vec<f32>>], state: &mut [Visit]) -> Result<()> {
        let node = dag.nodes.get(id).ok_or(Error::Dag(format!("node {id} does not exist")))?;
        match state[id] {
            Visit::Done => return Ok(()),
            Visit::Open => return Err(Error::Dag(format!("node {id} is its own descendant (the graph has a cycle)"))),
            Visit::New => {}
        }
        state[id] = Visit::Open;
        let spec = self.module(node.module)?;
        if node.attr.len() != spec.attr_dim {
            return Err(Error::Dag(format!(
                "node {id} of module {} has {} attributes, the module has {}",
                node.module,
                node.attr.len(),
                spec.attr_dim
            )));
        }
        let mut s = vec![0.0f32; self.dim()];
        self.embed_add(node.module, &node.attr, 1.0, &mut s);
        for e in &node.children {
            if e.slot >= spec.n_slots {
                return Err(Error::Dag(format!(
                    "node {id} puts a child in slot {} of module {}, which has {} slots",
                    e.slot, node.module, spec.n_slots
                )));
            }
            self.node_sketch(dag, e.child, memo, state)?;
            let child = memo[e.child].as_deref().expect("just built");
            self.rotation(node.module, e.slot).apply_add(child, e.weight, &mut s);
        }
        state[id] = Visit::Done;
        memo[id] = Some(s);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Visit {
    New,
    Open,
    Done,
}
