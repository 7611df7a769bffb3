//! Building and decoding many sketches at once gives, bit for bit, what one at a time gives: a
//! sketch must not depend on which other inputs shared its batch.

mod common;

use common::*;
use ferry_sketch::{DecodeOptions, Sketch};

fn bits(s: &Sketch) -> Vec<u32> {
    s.data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_batch_builds_the_sketches_one_at_a_time_would() {
    let sk = sketcher(1024, 8, 32, 3, 5);
    let mut r = rng(3);
    let forest: Vec<_> = (0..37).map(|i| random_tree(&mut r, 32, 8, 3, i % 4, 1.0 / 3.0).dag).collect();
    let batch = sk.sketch_batch(&forest).unwrap();
    assert_eq!(batch.len(), forest.len());
    for (dag, s) in forest.iter().zip(&batch) {
        assert_eq!(bits(s), bits(&sk.sketch(dag).unwrap()));
    }
    // A bad DAG anywhere in the batch fails the batch with the reason.
    let mut bad = forest.clone();
    bad[20].nodes[0].module = 99;
    assert!(sk.sketch_batch(&bad).unwrap_err().to_string().contains("99"));
}

/// `s(θ)` by the recursion as written, in f64 from the public matrices.
fn recursion(sk: &ferry_sketch::Sketcher, dag: &ferry_sketch::Dag, id: usize) -> Vec<f64> {
    let node = &dag.nodes[id];
    let mut s = vec![0.0f64; sk.dim()];
    for (j, a) in std::iter::once(sk.params().c).chain(node.attr.iter().copied()).enumerate() {
        for (s, &r) in s.iter_mut().zip(sk.embedding_column(node.module, j)) {
            *s += a as f64 * r as f64;
        }
    }
    for e in &node.children {
        let child: Vec<f32> = recursion(sk, dag, e.child).iter().map(|&v| v as f32).collect();
        for (s, q) in s.iter_mut().zip(sk.rotate(node.module, e.slot, &child)) {
            *s += e.weight as f64 * q as f64;
        }
    }
    s
}

fn close(got: &[f32], want: &[f64]) -> bool {
    let err: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum::<f64>().sqrt();
    err <= 1e-5 * want.iter().map(|w| w * w).sum::<f64>().sqrt()
}

#[test]
fn a_batch_larger_than_one_pass_matches_the_recursion() {
    // d = 4096: with 8 modules the embeddings stay cached and a pass holds about one tree of 31
    // nodes, so the batch takes many small passes; with 40 they do not, and it takes one big pass.
    for (m, seed) in [(8, 7), (40, 17)] {
        let sk = sketcher(4096, 16, m, 2, seed);
        let mut r = rng(seed + 1);
        let mut forest: Vec<_> = (0..60).map(|_| random_tree(&mut r, m, 16, 2, 4, 0.5).dag).collect();
        // A shared child under two parents, and a top object listed twice.
        let mut dag = ferry_sketch::Dag::default();
        let (a, b, shared) = (dag.add(1, unit(&mut r, 16)), dag.add(2, unit(&mut r, 16)), dag.add(3, unit(&mut r, 16)));
        dag.link(a, 0, 0.5, shared);
        dag.link(b, 1, 0.25, shared);
        dag.link(a, 1, 0.5, b);
        dag.top = vec![(a, 1.0), (b, 0.5), (a, 0.25)];
        forest.insert(30, dag.clone());
        let batch = sk.sketch_batch(&forest).unwrap();
        for (dag, s) in forest.iter().zip(&batch) {
            assert_eq!(bits(s), bits(&sk.sketch(dag).unwrap()), "{m} modules");
        }
        for i in [0, 29, 30, 31, 60] {
            let mut want = vec![0.0f64; 4096];
            for &(id, w) in &forest[i].top {
                for (x, v) in want.iter_mut().zip(recursion(&sk, &forest[i], id)) {
                    *x += w as f64 * v;
                }
            }
            assert!(close(&batch[i].data, &want), "tree {i}, {m} modules");
        }
        assert!(close(&sk.sketch_node(&dag, shared).unwrap().data, &recursion(&sk, &dag, shared)));
        assert!(close(&sk.sketch_node(&dag, a).unwrap().data, &recursion(&sk, &dag, a)));
    }
}

#[test]
fn a_batch_decodes_as_one_at_a_time_would() {
    let sk = sketcher(2048, 8, 32, 3, 9);
    let mut r = rng(4);
    let forest: Vec<_> = (0..40).map(|i| random_tree(&mut r, 32, 8, 3, 1 + i % 3, 1.0 / 3.0).dag).collect();
    let mut sketches = sk.sketch_batch(&forest).unwrap();
    // Some erased, so that probes with masks and without share levels.
    for s in sketches.iter_mut().skip(3).step_by(4) {
        *s = s.erase_to(1024);
    }
    sketches.push(sk.sketch(&ferry_sketch::Dag::default()).unwrap());
    for opts in [
        DecodeOptions { max_depth: 3, max_per_slot: 1, refine: false },
        DecodeOptions { max_depth: 2, max_per_slot: 2, refine: true },
    ] {
        let batch = sk.decode_batch(&sketches, opts).unwrap();
        let mut found = 0;
        for (s, b) in sketches.iter().zip(&batch) {
            assert_eq!(b, &sk.decode(s, opts).unwrap());
            found += b.len();
        }
        assert!(found >= 2 * forest.len(), "{found} objects found in {} trees", forest.len());
        assert!(batch.last().unwrap().is_empty(), "the empty sketch decodes to nothing");
    }
}

#[test]
fn a_dimension_that_is_not_a_multiple_of_the_row_block_matches_the_recursion() {
    // d = 1000 leaves a partial block of 40 rows after the 64-row blocks.
    let sk = sketcher(1000, 8, 8, 2, 3);
    let mut r = rng(1);
    let forest: Vec<_> = (0..5).map(|_| random_tree(&mut r, 8, 8, 2, 3, 0.5).dag).collect();
    let batch = sk.sketch_batch(&forest).unwrap();
    for (dag, s) in forest.iter().zip(&batch) {
        let mut want = vec![0.0f64; 1000];
        for &(id, w) in &dag.top {
            for (x, v) in want.iter_mut().zip(recursion(&sk, dag, id)) {
                *x += w as f64 * v;
            }
        }
        assert!(close(&s.data, &want));
    }
}
