//! `ferry model-bench`: the model alone, at the job's batch size and threading, on synthetic
//! input. Set beside a transform's records/s it shows what decoding and I/O cost.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_backend::{BackendKind, LoadOptions, Tensor};
use serde::Serialize;

use crate::image::ImagePlan;
use crate::model::ModelDir;
use crate::transform::JobError;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// An `.onnx` file or model directory.
    pub model: PathBuf,
    /// Records per model call.
    pub batch: usize,
    /// Threads, one model instance each.
    pub threads: usize,
    /// Threads inside one call.
    pub intra_op_threads: usize,
    /// Runtime.
    pub backend: BackendKind,
    /// How long to measure, after one warm-up call per thread.
    pub duration: Duration,
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Runtime that ran the model.
    pub runtime: String,
    /// Records per call.
    pub batch: usize,
    /// Model threads.
    pub threads: usize,
    /// Records run.
    pub records: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// Records per second.
    pub records_per_second: f64,
}

/// Runs the model flat out on every thread for `cfg.duration`.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, JobError> {
    let dir = ModelDir::open(&cfg.model)?;
    let options = LoadOptions {
        kind: cfg.backend,
        intra_op_threads: cfg.intra_op_threads,
        onnxruntime_path: None,
        extra_outputs: Vec::new(),
        instances: cfg.threads,
    };
    let model = ferry_backend::load(&dir.onnx, &options)?;
    let plan = ImagePlan::for_model(&dir.input, model.info(), u64::MAX)?;
    // A model with a fixed batch size runs at that size, as a job would run it.
    let batch = model.info().fixed_batch().unwrap_or(cfg.batch);
    let mut shape = vec![batch];
    shape.extend(plan.item_shape());
    ferry_backend::check_input(model.info(), &shape)?;
    let len: usize = shape.iter().product();
    // A fixed pseudo-random input: some kernels are faster on zeros.
    let data: Vec<f32> = (0..len).map(|i| ((i as u32).wrapping_mul(2654435761) >> 16) as f32 / 65536.0 - 0.5).collect();
    let input = Arc::new(Tensor::new(shape, data));

    let records = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(std::sync::Barrier::new(cfg.threads + 1));
    let mut handles = Vec::new();
    for _ in 0..cfg.threads {
        let mut backend = model.instance()?;
        let (input, records, stop, ready, batch) =
            (input.clone(), records.clone(), stop.clone(), ready.clone(), batch as u64);
        handles.push(std::thread::spawn(move || -> Result<(), ferry_backend::BackendError> {
            let warm = backend.run(&input);
            ready.wait();
            warm?;
            while !stop.load(Ordering::Relaxed) {
                backend.run(&input)?;
                records.fetch_add(batch, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    ready.wait();
    let start = Instant::now();
    std::thread::sleep(cfg.duration);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("a benchmark thread panicked")?;
    }
    // Calls still running at the stop count once they finish, so time runs until then.
    let seconds = start.elapsed().as_secs_f64();
    let records = records.load(Ordering::Relaxed);
    Ok(BenchReport {
        runtime: model.runtime(),
        batch,
        threads: cfg.threads,
        records,
        seconds,
        records_per_second: records as f64 / seconds,
    })
}
