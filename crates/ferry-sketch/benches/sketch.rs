//! Sketch construction and full decode against the numpy implementation of the same
//! construction (`bench/sketch_peer.py`), on the same workloads, printed side by side; then the
//! time to generate a module's matrices, with each sampler.
//!
//! `cargo bench -p ferry-sketch --bench sketch`

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ferry_sketch::{Dag, DecodeOptions, ModuleSpec, Params, Sampler, Sketcher};

#[path = "../tests/common/mod.rs"]
mod common;

struct Workload {
    name: &'static str,
    d: usize,
    k: usize,
    m: usize,
    fan: usize,
    depth: usize,
    trees: usize,
}

const WORKLOADS: [Workload; 2] = [
    Workload { name: "d1024", d: 1024, k: 8, m: 32, fan: 3, depth: 3, trees: 100 },
    Workload { name: "d4096", d: 4096, k: 16, m: 64, fan: 2, depth: 4, trees: 50 },
];

/// Microseconds per tree (best of rounds) for construction on one thread and on two (each
/// building half of the trees), and for a full decode.
fn run(w: &Workload) -> (f64, f64, f64, f64) {
    let sk = Sketcher::new(
        Params { d: w.d, seed: 1, ..Params::default() },
        &vec![ModuleSpec { attr_dim: w.k, n_slots: w.fan }; w.m],
    )
    .unwrap();
    let mut r = common::rng(2);
    let forest: Vec<Dag> =
        (0..w.trees).map(|_| common::random_tree(&mut r, w.m, w.k, w.fan, w.depth, 1.0 / w.fan as f32).dag).collect();
    // Build every matrix once, as the peer does before it is timed.
    for t in &forest {
        sk.decode(&sk.sketch(t).unwrap(), DecodeOptions { max_depth: w.depth, ..Default::default() }).unwrap();
    }
    let (mut best_s, mut best_s2, mut best_d, mut objects) = (f64::MAX, f64::MAX, f64::MAX, 0.0);
    for _ in 0..10 {
        let t0 = Instant::now();
        let sketches = sk.sketch_batch(black_box(&forest)).unwrap();
        best_s = best_s.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let (a, b) = forest.split_at(forest.len() / 2);
        std::thread::scope(|scope| {
            let other = scope.spawn(|| black_box(sk.sketch_batch(black_box(b)).unwrap()));
            black_box(sk.sketch_batch(black_box(a)).unwrap());
            other.join().unwrap();
        });
        best_s2 = best_s2.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let decoded = sk.decode_batch(black_box(&sketches), DecodeOptions { max_depth: w.depth, ..Default::default() });
        let n: usize = black_box(decoded.unwrap()).iter().map(Vec::len).sum();
        best_d = best_d.min(t0.elapsed().as_secs_f64());
        objects = n as f64 / w.trees as f64;
    }
    let per_tree = |t: f64| t / w.trees as f64 * 1e6;
    (per_tree(best_s), per_tree(best_s2), per_tree(best_d), objects)
}

/// Microseconds per module (best of rounds) to generate the embedding and slot rotations, from a
/// fresh sketcher each round.
fn matrices(w: &Workload, sampler: Sampler) -> f64 {
    let specs = vec![ModuleSpec { attr_dim: w.k, n_slots: w.fan }; w.m];
    let zero = vec![0.0; w.d];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        let sk = Sketcher::new(Params { d: w.d, seed: 1, sampler, ..Params::default() }, &specs).unwrap();
        for m in 0..w.m as u32 {
            black_box(sk.embedding_column(m, 1));
            for slot in 0..w.fan {
                black_box(sk.rotate(m, slot, black_box(&zero)));
            }
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    best / w.m as f64 * 1e6
}

/// The numpy peer's microseconds on one workload: (sketch, decode, matrices per module).
fn peer(name: &str) -> Option<(f64, f64, f64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/sketch_peer.py");
    let out = Command::new("python3").arg(script).arg(name).output().ok()?;
    if !out.status.success() {
        eprintln!("numpy peer failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let get = |k: &str| v[name][k].as_f64();
    Some((get("sketch_us")?, get("decode_us")?, get("matrix_us")?))
}

/// Rounds of each side, alternating, so that a slow minute on a shared machine slows both.
const ROUNDS: usize = 3;

fn main() {
    // `cargo test --benches` runs this with --bench absent; only time when asked to bench.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let with_peer = std::env::var_os("FERRY_BENCH_NO_PEER").is_none();
    println!(
        "{:<7} {:>9} {:>11} {:>11} {:>10} {:>7} {:>7} {:>11} {:>11} {:>7}",
        "", "objects", "sketch µs", "2 threads", "numpy µs", "ratio", "ratio 2", "decode µs", "numpy µs", "ratio"
    );
    let mut peer_matrices = Vec::new();
    for w in &WORKLOADS {
        let (mut s, mut s2, mut d, mut objects) = (f64::MAX, f64::MAX, f64::MAX, 0.0);
        let mut p: Option<(f64, f64, f64)> = None;
        for _ in 0..ROUNDS {
            let r = run(w);
            (s, s2, d, objects) = (s.min(r.0), s2.min(r.1), d.min(r.2), r.3);
            if let Some(q) = with_peer.then(|| peer(w.name)).flatten() {
                p = Some(p.map_or(q, |p| (p.0.min(q.0), p.1.min(q.1), p.2.min(q.2))));
            }
        }
        peer_matrices.push(p.map(|p| p.2));
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let ratio = |a: Option<f64>, b: f64| a.map_or("-".to_string(), |a| format!("{:.1}×", a / b));
        let (ps, pd) = (p.map(|p| p.0), p.map(|p| p.1));
        println!(
            "{:<7} {:>9.1} {:>11.1} {:>11.1} {:>10} {:>7} {:>7} {:>11.1} {:>11} {:>7}",
            w.name,
            objects,
            s,
            s2,
            fmt(ps),
            ratio(ps, s),
            ratio(ps, s2),
            d,
            fmt(pd),
            ratio(pd, d)
        );
    }
    println!("per tree: d1024 = k 8, m 32, fan-out 3, depth 3 (40 objects); d4096 = k 16, m 64, fan-out 2, depth 4 (31 objects)");
    println!("best of {ROUNDS} alternating rounds of each side");
    println!();
    println!("{:<7} {:>14} {:>10} {:>10} {:>7} {:>9}", "", "matrices µs", "libm µs", "numpy µs", "ratio", "vs libm");
    for (w, p) in WORKLOADS.iter().zip(peer_matrices) {
        let (portable, libm) = (matrices(w, Sampler::Portable), matrices(w, Sampler::Libm));
        println!(
            "{:<7} {:>14.1} {:>10.1} {:>10} {:>7} {:>8.1}×",
            w.name,
            portable,
            libm,
            p.map_or("-".to_string(), |v| format!("{v:.1}")),
            p.map_or("-".to_string(), |v| format!("{:.1}×", v / portable)),
            libm / portable
        );
    }
    println!("per module: the embedding (k + 1 columns, QR) and its slot rotations; libm = profile format 1");
}
