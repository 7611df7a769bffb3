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
