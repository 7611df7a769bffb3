//! Decode + pre-process throughput on one core: `cargo bench --bench decode -- DIR`.
//!
//! Reads every JPEG/PNG in DIR (default: the bench dataset from `bench/make_dataset.py` in
//! /tmp/ferry-bench/images, else the example photos) into memory and turns each into MobileNetV2's
//! input tensor, with and without DCT-scaled JPEG decoding and partial (crop-region) decoding. Prints images/s for each.

use std::time::Instant;

use ferry::image::{ImageDecoder, ImagePlan};
use ferry::model::ModelDir;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let dir = arg.map(std::path::PathBuf::from).unwrap_or_else(|| {
        let generated = std::path::PathBuf::from("/tmp/ferry-bench/images");
        if generated.is_dir() {
            generated
        } else {
            root.join("examples/images")
        }
    });
    let files: Vec<Vec<u8>> =
        std::fs::read_dir(&dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    let model = ModelDir::open(&root.join("examples/models/mobilenet_v2")).unwrap();
    let plan = ImagePlan::new(&model.input, Some((224, 224)), u64::MAX).unwrap();
    println!("{} images from {}", files.len(), dir.display());
    for (dct, partial) in [(false, false), (true, false), (true, true)] {
        let mut decoder = ImageDecoder::new(plan.clone().with_dct_scaling(dct).with_partial_decoding(partial));
        let mut out = Vec::new();
        let rounds = (2000 / files.len()).max(1);
        let start = Instant::now();
        for _ in 0..rounds {
            for f in &files {
                decoder.decode(f, &mut out).unwrap();
            }
        }
        let n = rounds * files.len();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "dct scaling {:<5}  partial {:<5}  {:>7.1} images/s on one core  ({:.3} ms/image)",
            dct,
            partial,
            n as f64 / secs,
            secs * 1e3 / n as f64
        );
    }
}
