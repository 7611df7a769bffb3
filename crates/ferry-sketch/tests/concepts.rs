//! Emerging concepts (SKETCHES.md §3.5): an object type the decoder has no module for shows up as
//! a tight cluster of residuals, whose centroid is that type's presence vector.

mod common;

use common::*;
use ferry_sketch::{ConceptOptions, Sketch, Sketcher};

const D: usize = 1024;
const K: usize = 8;
const M: usize = 16;

/// Scenes of known objects (a root with three children); every third also holds an object of
/// module `M`, which only `full` knows. Returns the sketches and which scenes hold it.
fn scenes(full: &Sketcher, n: usize, with_new: bool) -> (Vec<Sketch>, Vec<bool>) {
    let mut r = rng(31);
    let mut sketches = Vec::new();
    let mut holds = Vec::new();
    for i in 0..n {
        let mut tree = random_tree(&mut r, M, K, 3, 1, 1.0 / 3.0).dag;
        let new = with_new && i % 3 == 0;
        if new {
            let id = tree.add(M as u32, unit(&mut r, K));
            tree.top.push((id, 1.0));
        }
        sketches.push(full.sketch(&tree).unwrap());
        holds.push(new);
    }
    (sketches, holds)
}

#[test]
fn an_unknown_module_emerges_as_one_tight_cluster() {
    // Same seed: the known modules' matrices are the same in both.
    let (full, known) = (sketcher(D, K, M + 1, 3, 17), sketcher(D, K, M, 3, 17));
    assert_eq!(full.presence(3), known.presence(3));
    let (sketches, holds) = scenes(&full, 300, true);

    let shares = known.unexplained(&sketches, ConceptOptions::default().decode).unwrap();
    let mean = |want: bool| {
        let v: Vec<f32> = shares.iter().zip(&holds).filter(|(_, &h)| h == want).map(|(s, _)| *s).collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    assert!(mean(true) > 0.3 && mean(false) < 0.1, "unexplained share {} with, {} without", mean(true), mean(false));

    let concepts = known.emerging_concepts(&sketches, &ConceptOptions::default()).unwrap();
    assert_eq!(concepts.len(), 1, "{:?}", concepts.iter().map(|c| (c.members.len(), c.cohesion)).collect::<Vec<_>>());
    let c = &concepts[0];
    let truth: Vec<usize> = (0..sketches.len()).filter(|&i| holds[i]).collect();
    let hits = c.members.iter().filter(|i| holds[**i]).count();
    assert!(hits as f32 >= 0.95 * truth.len() as f32, "{hits} of {} scenes with the new object", truth.len());
    assert!(hits as f32 >= 0.95 * c.members.len() as f32, "{} members, {hits} right", c.members.len());
    // The centroid is the new module's presence vector.
    let cos = dot(&c.direction, full.presence(M as u32)) / dot(&c.direction, &c.direction).sqrt();
    assert!(cos >= 0.9, "cosine with the true presence vector {cos}");
    eprintln!(
        "{} members ({hits} right of {}), cohesion {:.3}, cosine {cos:.3}",
        c.members.len(),
        truth.len(),
        c.cohesion
    );
    // Now it can be counted: the scenes that hold it score about 1 on it, the others about 0.
    let score = |s: &Sketch| dot(&s.data, &c.direction);
    for (s, &h) in sketches.iter().zip(&holds) {
        assert!((score(s) - if h { 1.0 } else { 0.0 }).abs() < 0.35, "score {} (holds: {h})", score(s));
    }
}

#[test]
fn sketches_the_modules_explain_yield_no_concept() {
    let known = sketcher(D, K, M, 3, 17);
    let (sketches, _) = scenes(&known, 300, false);
    let concepts = known.emerging_concepts(&sketches, &ConceptOptions::default()).unwrap();
    assert!(concepts.is_empty(), "{:?}", concepts.iter().map(|c| (c.members.len(), c.cohesion)).collect::<Vec<_>>());
}
