//! `ferry transform`: every object under a prefix through the model, one `.out` per object.
//!
//! The job is a fixed chain of stages joined by bounded channels, so a slow model slows the
//! fetching instead of filling memory:
//!
//! ```text
//! list → GET (async, ≤ max_concurrent objects in flight) → decode threads → model threads → assemble → PUT
//! ```
//!
//! Fetching and writing are async (tokio, object_store); decoding and inference are CPU work on
//! their own OS threads, never on the runtime. Each model thread owns one backend instance and
//! forms its own batches from whatever is decoded, so batches span objects. Records carry
//! `(object, index)` and the assembler puts them back in order; an object is written once all its
//! records are back, with one atomic put (multipart past `part_size`; to a folder, a hidden file
//! renamed into place: `Location::write`), so no partial `.out` is ever visible. A permit per
//! object, taken before its GET and given back after its PUT, bounds memory.
//!
//! With `--sketch`, each object's sketches (one per record, from the same forward pass) are
//! built on sketch threads, many objects at a time, and collected into Parquet part files of
//! about a thousand records; an object's `.out` is written only after the part holding its
//! sketches, so a finished object always has both. One file per object would double the files a
//! job creates, and sets of many tiny Parquet files are slow to query.
//!
//! Resume needs no journal: outputs are deterministic (the runtime's results do not depend on how
//! records are batched), so an object whose `.out` exists is finished, and a rerun skips it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_backend::{Backend, BackendError, BackendKind, LoadOptions, Tensor};
use ferry_sketch::{Dag, Sketch};
use futures::StreamExt;
use object_store::path::Path;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::encode::{Encoder, RecordOutputs};
use crate::image::{ImageDecoder, ImagePlan, PlanError};
use crate::model::{ModelDir, ModelError};
use crate::progress::{Progress, ProgressMode};
use crate::provenance::Provenance;
use crate::sketch::profile::PROFILE_FILE;
use crate::sketch::store::{claim, write_parquet, SketchRow};
use crate::sketch::SketchProfile;
use crate::store::{get_bytes_within, is_partial, FetchError, Location, StoreError, JOB_DIR};

/// What to do with a record that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Fail the whole object: no `.out` for it (SageMaker's rule).
    #[default]
    FailObject,
    /// Write `{"error": "..."}` in place of that record's prediction.
    ErrorRecord,
}

/// How input objects are stored (SageMaker's `CompressionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compression {
    /// As they are.
    #[default]
    None,
    /// gzip-compressed: each object is decompressed before it is decoded.
    Gzip,
}

/// Records per model call unless told otherwise. Each model thread runs its own single-threaded
/// session, so a batch adds no parallelism, only activations: at 2 a convolutional network's
/// largest activations stay in a core's share of the L3 cache, at 8 they go to memory.
/// MobileNetV2 on 2 cores: the model alone ran 136–144 img/s at 2 against 125–132 at 8, a
/// transform 125.5 against 117.1 (medians of 7 alternating rounds); ResNet-50 the same at both.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 2;

/// The largest object read by default, in MiB: SageMaker Batch Transform's largest
/// `MaxPayloadInMB`. Far above any photo, and a bound on what a stray video or archive in the
/// input costs: `--max-concurrent` of them would otherwise be held in memory whole.
pub const DEFAULT_MAX_PAYLOAD_MB: u64 = 100;

/// Everything a transform job needs; build one with `..Default::default()`.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// An `.onnx` file or a model directory.
    pub model: PathBuf,
    /// Input location: a folder, `file://...` or `s3://bucket/prefix`.
    pub input: String,
    /// Output location, same forms.
    pub output: String,
    /// Keep only the best `k` classes of the score output.
    pub top_k: Option<usize>,
    /// Most records per model call.
    pub max_batch_size: usize,
    /// How long a model thread waits to fill a batch once it has one record.
    pub batch_wait: Duration,
    /// Objects in flight (fetched but not yet written).
    pub max_concurrent: usize,
    /// Model threads, each with its own backend instance.
    pub threads: usize,
    /// Decode threads.
    pub decode_threads: usize,
    /// Threads inside one model call.
    pub intra_op_threads: usize,
    /// Which runtime.
    pub backend: BackendKind,
    /// What a failed record does to its object.
    pub on_error: OnError,
    /// Largest image, in declared pixels, that will be decoded.
    pub max_image_pixels: u64,
    /// Largest object, in bytes, that will be read; larger ones fail unread.
    pub max_payload: u64,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves twice the resized size.
    pub dct_scaling: bool,
    /// Outputs larger than this are uploaded in parts of this size.
    pub part_size: usize,
    /// Flush each file written to a local folder to disk before renaming it into place.
    pub fsync: bool,
    /// Where to write the job report; `<output>/_ferry/report.json` when absent.
    pub report: Option<PathBuf>,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Retries of a failed request to a remote store.
    pub max_retries: usize,
    /// Where to write a sketch per record (Parquet part files); none when absent.
    pub sketch: Option<String>,
    /// The sketch profile; `<model>/sketch_profile.json` when absent.
    pub sketch_profile: Option<PathBuf>,
    /// Records per sketch part file.
    pub sketch_part_records: usize,
    /// Run only this shard's objects, for one pod of a Kubernetes Indexed Job.
    pub shard: Option<Shard>,
    /// `input` names a manifest file listing the inputs (SageMaker's `S3DataType=ManifestFile`),
    /// not a prefix to list.
    pub manifest: bool,
    /// How the input objects are stored.
    pub compression: Compression,
    /// Write every object, also those whose `.out` exists, as if the output were empty.
    pub overwrite: bool,
    /// Becomes `true` to stop the job early (the CLI's SIGTERM and Ctrl-C): no more objects are
    /// started, those in flight are finished and written, and the report says what was left.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
}

/// One of `count` disjoint parts of a job's objects: those whose key, relative to the input
/// prefix, hashes to `index` (xxHash64, seed 0, modulo `count`). A key's shard depends on the key
/// alone, not on what else is listed, so pods that list at different moments never both skip
/// an object, and a rerun of a shard resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, from 0.
    pub index: u64,
    /// How many shards the job has.
    pub count: u64,
}

impl Shard {
    /// Whether the object at `relative` (its key relative to the input prefix) is this shard's.
    pub fn owns(&self, relative: &str) -> bool {
        twox_hash::XxHash64::oneshot(0, relative.as_bytes()) % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a shard: give INDEX/COUNT, e.g. 0/4 (INDEX from 0 to COUNT - 1)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Default for JobConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            model: PathBuf::new(),
            input: String::new(),
            output: String::new(),
            top_k: None,
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            batch_wait: Duration::from_millis(5),
            max_concurrent: 64,
            threads: cores,
            decode_threads: cores,
            intra_op_threads: 1,
            backend: BackendKind::Auto,
            on_error: OnError::FailObject,
            max_image_pixels: 178_956_970,
            max_payload: DEFAULT_MAX_PAYLOAD_MB << 20,
            dct_scaling: true,
            part_size: 8 << 20,
            fsync: false,
            report: None,
            progress: ProgressMode::Auto,
            max_retries: 10,
            sketch: None,
            sketch_profile: None,
            sketch_part_records: 1024,
            shard: None,
            manifest: false,
            compression: Compression::None,
            overwrite: false,
            stop: None,
        }
    }
}

/// Errors that stop a job before or outside any one object.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The model path or its `ferry.toml`.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The runtime could not load or accept the model.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Pre-processing does not fit the model.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A location could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Listing failed (unreachable store, bad credentials, missing bucket), or `--input` named
    /// something that cannot be listed.
    #[error(transparent)]
    List(#[from] crate::store::ListError),
    /// A configuration value out of range.
    #[error("{0}")]
    Config(String),
    /// The job ran, but its report could not be written; the report is here to be shown.
    #[error("writing the job report to {path}: {reason}")]
    Report {
        /// Where.
        path: String,
        /// Why.
        reason: String,
        /// What the job did.
        report: Box<JobReport>,
    },
}

/// One failed object or record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failure {
    /// Input key.
    pub object: String,
    /// Record index inside the object, when the failure is one record's.
    pub record: Option<usize>,
    /// What went wrong.
    pub reason: String,
}

/// Cumulative busy time per stage, summed over threads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageSeconds {
    /// Listing inputs and finished outputs.
    pub list: f64,
    /// GETs.
    pub fetch: f64,
    /// Image decoding and pre-processing.
    pub decode: f64,
    /// Model calls.
    pub infer: f64,
    /// Building `.out` bodies.
    pub encode: f64,
    /// Building sketches and their Parquet files.
    pub sketch: f64,
    /// PUTs.
    pub write: f64,
}

/// The machine-readable account of a job.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    /// Input location.
    pub input: String,
    /// Output location.
    pub output: String,
    /// `INDEX/COUNT` when the job ran one shard of its objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Model file.
    pub model: String,
    /// Runtime that ran it.
    pub runtime: String,
    /// Objects under the input prefix (this shard's, when sharded).
    pub objects_total: usize,
    /// Objects written by this run.
    pub objects_succeeded: usize,
    /// Objects that got no `.out`.
    pub objects_failed: usize,
    /// Objects whose `.out` already existed (finished by an earlier run).
    pub objects_skipped: usize,
    /// Objects not started because the job was told to stop; a rerun does them.
    #[serde(skip_serializing_if = "is_zero")]
    pub objects_not_started: usize,
    /// Records that went through the model.
    pub records: u64,
    /// Records that failed.
    pub records_failed: u64,
    /// Model calls and their mean size.
    pub batches: u64,
    /// Mean records per model call.
    pub mean_batch_size: f64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Wall time of the whole job.
    pub wall_seconds: f64,
    /// Part of the wall time spent before the first object was read: loading the model, creating
    /// an instance per thread, listing.
    pub setup_seconds: f64,
    /// Records per second over the wall time.
    pub records_per_second: f64,
    /// Busy time per stage.
    pub stage_seconds: StageSeconds,
    /// What failed and why.
    pub failures: Vec<Failure>,
}

#[derive(Default)]
struct Stats {
    fetch_ns: AtomicU64,
    decode_ns: AtomicU64,
    infer_ns: AtomicU64,
    encode_ns: AtomicU64,
    sketch_ns: AtomicU64,
    write_ns: AtomicU64,
    batches: AtomicU64,
    batch_items: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn secs(counter: &AtomicU64) -> f64 {
        counter.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// An input object the job will process.
struct Item {
    key: Path,
    out_key: Path,
    /// The key relative to the input prefix, as sketch rows name it.
    relative: String,
}

struct DecodeJob {
    id: usize,
    index: usize,
    bytes: Bytes,
}

struct Decoded {
    id: usize,
    index: usize,
    /// 8-bit pixels, normalised by the model thread into its batch.
    pixels: Vec<u8>,
}

enum Event {
    Fetched {
        id: usize,
        records: usize,
        permit: OwnedSemaphorePermit,
    },
    FetchFailed {
        id: usize,
        reason: String,
    },
    Record {
        id: usize,
        index: usize,
        outcome: Result<RecordOutputs, String>,
    },
    Written {
        id: usize,
        outcome: Result<(), String>,
    },
    /// The object's `.out` waits for the part file holding its sketches.
    Parked {
        id: usize,
    },
    /// The job was told to stop: objects from `count` on will not be started.
    Stopped {
        count: usize,
    },
}

/// Where a job reads and writes.
struct Places<'a> {
    input: &'a Location,
    output: &'a Location,
    sketches: Option<&'a Location>,
}

/// Everything about the model that the stages need, checked before any object is read.
struct Prepared {
    runtime: String,
    /// What decides the bytes of this job's outputs.
    provenance: Provenance,
    instances: Vec<Box<dyn Backend>>,
    plan: ImagePlan,
    /// The model's fixed batch size, to which every call is padded.
    fixed_batch: Option<usize>,
    encoder: Encoder,
    sketch: Option<SketchWriter>,
}

/// Turns an object's records into sketch rows.
#[derive(Debug)]
struct SketchWriter {
    profile: SketchProfile,
    sketcher: ferry_sketch::Sketcher,
    /// The model output index of each output the recipe reads.
    inputs: HashMap<String, usize>,
}

/// The object DAGs of one object's records, with their record indices.
type RecordDags = Vec<(i64, Dag)>;

impl SketchWriter {
    /// The object DAG of each record of one object. Runs after encoding, which has applied the
    /// softmax.
    fn dags(&self, records: &[Result<RecordOutputs, String>]) -> Result<RecordDags, String> {
        let mut dags = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if let Ok(outputs) = r {
                let get = |name: &str| self.inputs.get(name).map(|&j| (outputs.shape(j), outputs.values(j)));
                dags.push((i as i64, self.profile.record_dag(get).map_err(|e| format!("record {i}: sketch: {e}"))?));
            }
        }
        Ok(dags)
    }

    /// The sketch rows of many objects, `(key, dags)` each, built as one batch. Should the batch
    /// fail, each object is built alone, so that only the object at fault fails.
    fn rows(&self, objects: Vec<(String, RecordDags)>) -> Vec<Result<Vec<SketchRow>, String>> {
        let mut all = Vec::new();
        let mut spans = Vec::with_capacity(objects.len());
        for (key, dags) in objects {
            let (records, dags): (Vec<i64>, Vec<Dag>) = dags.into_iter().unzip();
            spans.push((key, records, all.len()..all.len() + dags.len()));
            all.extend(dags);
        }
        let mut batch = self.sketcher.sketch_batch(&all).map(Vec::into_iter);
        spans
            .into_iter()
            .map(|(key, records, span)| {
                let sketches: Vec<Sketch> = match &mut batch {
                    Ok(sketches) => sketches.by_ref().take(span.len()).collect(),
                    Err(_) => self.sketcher.sketch_batch(&all[span]).map_err(|e| format!("sketch: {e}"))?,
                };
                let (seed, d) = (self.profile.seed, self.profile.d);
                Ok(records
                    .into_iter()
                    .zip(sketches)
                    .map(|(record, s)| SketchRow { key: key.clone(), record, sketch: s.data, seed, d })
                    .collect())
            })
            .collect()
    }
}

/// One object's DAGs on their way to the sketch threads, and where its rows go back.
struct SketchJob {
    key: String,
    dags: RecordDags,
    reply: tokio::sync::oneshot::Sender<Result<Vec<SketchRow>, String>>,
}

/// Records a sketch thread builds at most in one batch.
const SKETCH_BATCH_RECORDS: usize = 64;
/// How long a sketch thread waits for a batch to fill after its first object.
const SKETCH_BATCH_WAIT: Duration = Duration::from_millis(250);

/// A sketch thread: builds the sketches of the queued objects in batches of up to
/// [`SKETCH_BATCH_RECORDS`] records, waiting at most [`SKETCH_BATCH_WAIT`] for one to fill. A
/// batch reads the embedding of each module its objects use once. One object at a time, the
/// `stages` recipe read tens of MiB of embeddings per image, which was most of its sketching
/// time; taking only what happened to be queued gave batches of one to eight images, and little
/// of the gain. An object gives its permit back only once it is in the bounded queue, so when the
/// sketch threads fall behind, fetching slows down rather than memory filling. The wait only
/// delays `.out`s, which wait for their part file anyway, and ends once every object is in.
fn sketch_loop(writer: Arc<SketchWriter>, rx: crossbeam_channel::Receiver<SketchJob>, stats: Arc<Stats>) {
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + SKETCH_BATCH_WAIT;
        let mut records = first.dags.len();
        let mut jobs = vec![first];
        while records < SKETCH_BATCH_RECORDS {
            match rx.recv_deadline(deadline) {
                Ok(job) => {
                    records += job.dags.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let t = Instant::now();
        let (objects, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| ((j.key, j.dags), j.reply)).unzip();
        let rows = writer.rows(objects);
        Stats::add(&stats.sketch_ns, t);
        for (reply, rows) in replies.into_iter().zip(rows) {
            let _ = reply.send(rows);
        }
    }
}

/// Encoded `.out` bytes held back at most while their part fills.
const PARKED_BYTES: usize = 64 << 20;
/// The longest an object's `.out` waits for its part, so that a slow job still shows progress.
const PART_DELAY: Duration = Duration::from_secs(5);
/// Objects a part must hold before it is written early because the job is nearly done.
const EARLY_PART_OBJECTS: usize = 64;

/// An object whose `.out` waits for the part file holding its sketches.
struct Parked {
    id: usize,
    out_key: Path,
    body: Vec<u8>,
    rows: Vec<SketchRow>,
}

enum PartMsg {
    Park(Parked),
    /// Every object is finished or parked: write what is held.
    Flush,
}

/// Writes sketch part files, then the `.out`s of the objects in them, reporting each object as
/// written. A part that cannot be written fails its objects without writing their `.out`s, so a
/// rerun redoes them.
struct PartWriter {
    sketch: Arc<SketchWriter>,
    sketches: Location,
    sketch_limit: Arc<Semaphore>,
    output: Location,
    out_limit: Arc<Semaphore>,
    part_size: usize,
    part_records: usize,
    events: async_channel::Sender<Event>,
    stats: Arc<Stats>,
    /// Objects of the job neither finished nor parked, kept by the main loop.
    open: Arc<AtomicUsize>,
    /// Part names start with the job's start time, so a rerun adds parts and never replaces one.
    run: String,
    seq: usize,
}

impl PartWriter {
    async fn run(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<PartMsg>) {
        let mut held: Vec<Parked> = Vec::new();
        let (mut records, mut bytes) = (0usize, 0usize);
        let mut deadline = None;
        loop {
            let msg = match deadline {
                Some(at) => tokio::time::timeout_at(at, rx.recv()).await.unwrap_or(Some(PartMsg::Flush)),
                None => rx.recv().await,
            };
            match msg {
                Some(PartMsg::Park(p)) => {
                    records += p.rows.len();
                    bytes += p.body.len();
                    held.push(p);
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + PART_DELAY);
                    // Held `.out`s are written only after their part, so a part still filling at the
                    // end of a job leaves its `.out`s to be written once the model has nothing left
                    // to do. Writing it once it holds as many objects as are still open halves that
                    // tail at each step, for a few more parts per job.
                    let ending = held.len() >= EARLY_PART_OBJECTS && held.len() >= self.open.load(Ordering::Relaxed);
                    if records < self.part_records && bytes < PARKED_BYTES && !ending {
                        continue;
                    }
                }
                Some(PartMsg::Flush) => {}
                None => break,
            }
            self.flush(std::mem::take(&mut held)).await;
            (records, bytes, deadline) = (0, 0, None);
        }
        self.flush(held).await;
    }

    async fn flush(&mut self, mut held: Vec<Parked>) {
        if held.is_empty() {
            return;
        }
        let key = self.sketches.prefix.clone().join(format!("part-{}-{:05}.parquet", self.run, self.seq).as_str());
        self.seq += 1;
        let rows: Vec<SketchRow> = held.iter_mut().flat_map(|p| std::mem::take(&mut p.rows)).collect();
        let t = Instant::now();
        let part = write_parquet(&rows, &self.sketch.profile);
        Stats::add(&self.stats.sketch_ns, t);
        let written = match part {
            Ok(body) => {
                let (to, limit) = (self.sketches.clone(), &self.sketch_limit);
                write_object(to, key.clone(), body, self.part_size, limit, &self.stats).await
            }
            Err(e) => Err(e),
        };
        let written = written.map_err(|e| format!("sketch part {key}: {e}"));
        let (written, output, part_size, out_limit) = (&written, &self.output, self.part_size, &*self.out_limit);
        let (events, stats) = (&self.events, &self.stats);
        futures::stream::iter(held)
            .for_each_concurrent(32, |p| async move {
                let outcome = match written {
                    Ok(()) => write_object(output.clone(), p.out_key, p.body, part_size, out_limit, stats).await,
                    Err(e) => Err(e.clone()),
                };
                let _ = events.send(Event::Written { id: p.id, outcome }).await;
            })
            .await;
    }
}

fn prepare(cfg: &JobConfig) -> Result<Prepared, JobError> {
    let dir = ModelDir::open(&cfg.model)?;
    let provenance = Provenance {
        model: crate::provenance::model_hash(&cfg.model)
            .map_err(|e| JobError::Config(format!("reading {}: {e}", cfg.model.display())))?,
        top_k: cfg.top_k,
        on_error: flag_value(cfg.on_error),
        compression: flag_value(cfg.compression),
        dct_scaling: cfg.dct_scaling,
    };
    // The profile comes first: sketches read intermediate tensors (a stage, or pooled features
    // the graph does not declare), which the model must expose as outputs when it is loaded.
    let profile = match &cfg.sketch {
        None => None,
        Some(_) => Some(load_profile(cfg, &dir)?),
    };
    let options = LoadOptions {
        kind: cfg.backend,
        intra_op_threads: cfg.intra_op_threads,
        onnxruntime_path: None,
        extra_outputs: profile.as_ref().map(SketchProfile::outputs).unwrap_or_default(),
        instances: cfg.threads,
    };
    let model = ferry_backend::load(&dir.onnx, &options)?;
    let info = model.info();
    let plan = ImagePlan::for_model(&dir.input, info, cfg.max_image_pixels)
        .map_err(|e| match &dir.dir {
            Some(_) => JobError::Plan(e),
            // A bare file has nowhere to say it.
            None => JobError::Config(format!(
                "{e} ({} is a bare .onnx file: make a folder holding it as model.onnx and a ferry.toml, and give \
                 --model the folder)",
                dir.onnx.display()
            )),
        })?
        .with_dct_scaling(cfg.dct_scaling);
    let fixed_batch = info.fixed_batch();
    let mut shape = vec![fixed_batch.unwrap_or(1)];
    shape.extend(plan.item_shape());
    ferry_backend::check_input(info, &shape)?;
    let output_names: Vec<String> = info.outputs.iter().map(|o| o.name.clone()).collect();
    let position = |name: &str| {
        output_names.iter().position(|n| n == name).ok_or_else(|| {
            JobError::Config(format!("output {name:?} is named but the model has only {output_names:?}"))
        })
    };
    let score_output = match &dir.output.name {
        Some(name) => position(name)?,
        None => 0,
    };
    if let (Some(labels), Some(scores)) = (&dir.labels, info.outputs.get(score_output)) {
        check_labels(labels, scores);
    }
    // Features feed sketches, never the predictions. Without sketches an undeclared features
    // tensor is simply not computed.
    let mut hidden: Vec<usize> =
        dir.output.features.iter().filter_map(|f| output_names.iter().position(|n| n == f)).collect();
    let sketch = match profile {
        None => None,
        Some(profile) => {
            let sketcher = profile.sketcher().map_err(|e| JobError::Config(format!("sketch profile: {e}")))?;
            let mut inputs = HashMap::new();
            for name in profile.outputs() {
                inputs.insert(name.clone(), position(&name)?);
            }
            hidden.extend(inputs.values().filter(|&&i| i != score_output));
            hidden.sort_unstable();
            hidden.dedup();
            Some(SketchWriter { profile, sketcher, inputs })
        }
    };
    let encoder = Encoder {
        output_names,
        score_output,
        softmax: dir.output.softmax,
        top_k: cfg.top_k,
        labels: dir.labels.clone(),
        hidden,
    };
    // One instance per model thread, created side by side now, so a model that loads but cannot
    // be instantiated stops the job with one message before any object is read.
    let instances = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.threads).map(|_| scope.spawn(|| model.instance())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("creating a model instance panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(Prepared { runtime: model.runtime(), provenance, instances, plan, fixed_batch, encoder, sketch })
}

/// At most `asked` records per model call, or exactly the model's fixed batch size, saying so.
fn records_per_call(fixed: Option<usize>, asked: usize) -> usize {
    match fixed {
        Some(1) if asked != 1 => {
            tracing::info!("the model's batch size is fixed at 1: one record per call, not {asked}")
        }
        Some(b) if b != asked => tracing::info!(
            "the model's batch size is fixed at {b}: up to {b} records per call, not {asked}, a partial call padded"
        ),
        _ => {}
    }
    fixed.unwrap_or(asked)
}

/// Warns when `labels` cannot name the classes of `scores` one for one. Labels go by position,
/// so one missing or extra line (a background class) shifts every name after it.
fn check_labels(labels: &[String], scores: &ferry_backend::IoInfo) {
    if let Some(classes) = scores.shape.last().copied().flatten() {
        if labels.len() != classes {
            tracing::warn!(
                "labels.txt has {} names but output {:?} has {classes} classes: check that line i names class i",
                labels.len(),
                scores.name
            );
        }
    }
}

fn load_profile(cfg: &JobConfig, dir: &ModelDir) -> Result<SketchProfile, JobError> {
    let path = match (&cfg.sketch_profile, &dir.dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join(PROFILE_FILE),
        (None, None) => return Err(JobError::Config("--sketch with a bare .onnx file needs --sketch-profile".into())),
    };
    let text = std::fs::read(&path).map_err(|e| {
        JobError::Config(format!(
            "no sketch profile at {} ({e}); fit one with `ferry sketch fit --model {} --input <calibration images>`",
            path.display(),
            cfg.model.display()
        ))
    })?;
    SketchProfile::from_json(&text).map_err(|e| JobError::Config(format!("{}: {e}", path.display())))
}

/// Every key under a location, and what of it could not be listed, as failures.
async fn list(location: &Location) -> Result<(Vec<Path>, Vec<Failure>), JobError> {
    let (keys, unlisted) = location.list().await?;
    Ok((keys, unlisted_failures(unlisted)))
}

fn unlisted_failures(unlisted: Vec<(String, String)>) -> Vec<Failure> {
    unlisted.into_iter().map(|(object, reason)| Failure { object, record: None, reason }).collect()
}

/// The largest manifest read: a million keys of a hundred characters.
const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// The location a manifest's prefix names and the keys of its entries under it; entries that are
/// not keys (`..`, an empty part) are failures, named.
async fn from_manifest(url: &str, max_retries: usize) -> Result<(Location, (Vec<Path>, Vec<Failure>)), JobError> {
    let bad = |reason: String| JobError::Config(format!("manifest {url}: {reason}"));
    let bytes = crate::store::read_object(url, max_retries, MAX_MANIFEST_BYTES).await.map_err(bad)?;
    let manifest = crate::manifest::parse(&bytes).map_err(bad)?;
    if manifest.keys.is_empty() {
        return Err(bad("it lists no objects".into()));
    }
    let (folder, relatives) = manifest.split(|p| std::path::Path::new(p.strip_prefix("file://").unwrap_or(p)).is_dir());
    let input = Location::open(&folder, false, max_retries)?;
    let (mut keys, mut failures) = (Vec::new(), Vec::new());
    for relative in relatives {
        let parts: Vec<&str> = relative.split('/').collect();
        match input.child(&parts, "") {
            Ok(key) => keys.push(key),
            Err(reason) => failures.push(Failure { object: relative, record: None, reason }),
        }
    }
    Ok((input, (keys, failures)))
}

/// The output prefix relative to the input prefix when outputs are written inside the inputs, so
/// that a rerun does not take its own outputs for inputs. Empty when they are the same prefix.
fn nested_output(input: &str, output: &str) -> Option<Vec<String>> {
    let norm = |s: &str| -> String {
        if s.contains("://") && !s.starts_with("file://") {
            return s.trim_end_matches('/').to_string();
        }
        let p = PathBuf::from(s.strip_prefix("file://").unwrap_or(s));
        std::fs::canonicalize(&p).unwrap_or(p).to_string_lossy().trim_end_matches('/').to_string()
    };
    let (i, o) = (norm(input), norm(output));
    if i == o {
        return Some(Vec::new());
    }
    let rest = o.strip_prefix(&i)?.strip_prefix('/')?;
    Some(rest.split('/').map(str::to_string).collect())
}

/// Runs a transform job to the end and returns its report. Per-object failures are in the report;
/// an `Err` means the job could not run at all.
pub async fn run(cfg: JobConfig) -> Result<JobReport, JobError> {
    let started = Instant::now();
    if cfg.max_batch_size == 0 || cfg.max_concurrent == 0 || cfg.threads == 0 || cfg.decode_threads == 0 {
        return Err(JobError::Config("batch size, concurrency and thread counts must be at least 1".into()));
    }
    if cfg.sketch_part_records == 0 {
        return Err(JobError::Config("records per sketch part must be at least 1".into()));
    }
    if cfg.part_size < 5 << 20 {
        return Err(JobError::Config("part size must be at least 5 MiB (the S3 minimum)".into()));
    }
    // The stores are listed while the model loads: listing a large prefix of an object store
    // takes a request per thousand keys, seconds that need not wait for the sessions. Whichever
    // fails first is the job's error.
    let preparing = {
        let cfg = cfg.clone();
        async move { tokio::task::spawn_blocking(move || prepare(&cfg)).await.expect("model preparation panicked") }
    };
    let listing = async {
        let t = Instant::now();
        let output = Location::open(&cfg.output, true, cfg.max_retries)?.with_fsync(cfg.fsync);
        let sketches = match &cfg.sketch {
            Some(url) => Some(Location::open(url, true, cfg.max_retries)?.with_fsync(cfg.fsync)),
            None => None,
        };
        let inputs = async {
            match cfg.manifest {
                false => {
                    let (input, (keys, unnamed)) = crate::store::list_inputs(&cfg.input, cfg.max_retries).await?;
                    Ok((input, (keys, unlisted_failures(unnamed))))
                }
                true => from_manifest(&cfg.input, cfg.max_retries).await,
            }
        };
        let ((input, objects), done) = tokio::try_join!(inputs, list(&output))?;
        Ok::<_, JobError>((input, output, sketches, done, objects, t.elapsed().as_secs_f64()))
    };
    let (prepared, (input, output, sketches, (done, _), (mut objects, unnamed), list_seconds)) =
        tokio::try_join!(preparing, listing)?;
    if let (Some(set), Some(w)) = (&sketches, &prepared.sketch) {
        claim(set, &w.profile).await.map_err(JobError::Config)?;
    }
    let runtime = prepared.runtime.clone();
    tracing::info!(model = %cfg.model.display(), %runtime, input = %input.url, output = %output.url, "starting transform");

    let job_key = output.prefix.clone().join(JOB_DIR).join("job.json");
    // The output's listing says whether there is a record to read.
    let previous = match done.contains(&job_key) {
        true => read_provenance(&output, &job_key).await?,
        false => None,
    };
    let mut done: HashSet<Path> = done.into_iter().filter(|p| p.as_ref().ends_with(".out")).collect();
    if cfg.overwrite {
        done.clear();
    }
    objects.sort();
    let exclude = nested_output(&input.url, &cfg.output);
    let exclude_sketches = cfg.sketch.as_deref().and_then(|s| nested_output(&input.url, s));

    let mine = |relative: &str| cfg.shard.is_none_or(|s| s.owns(relative));
    let mut inputs_listed = !unnamed.is_empty();
    let mut failures: Vec<Failure> = unnamed.into_iter().filter(|f| mine(&f.object)).collect();
    let mut objects_total = failures.len();
    let mut items = Vec::new();
    let mut skipped = 0;
    for key in objects {
        let parts = input.relative(&key).unwrap_or_default();
        if ours(&parts, exclude.as_deref(), ".out") || ours(&parts, exclude_sketches.as_deref(), ".parquet") {
            continue;
        }
        inputs_listed = true;
        if !mine(&parts.join("/")) {
            continue;
        }
        objects_total += 1;
        match output.child(&parts, ".out") {
            Ok(out_key) if done.contains(&out_key) => skipped += 1,
            Ok(out_key) => items.push(Item { key, out_key, relative: parts.join("/") }),
            Err(reason) => failures.push(Failure { object: key.to_string(), record: None, reason }),
        }
    }
    if !inputs_listed {
        return Err(JobError::Config(format!("no objects under {}", input.url)));
    }
    let ours = &prepared.provenance;
    if let Some(then) = previous.as_ref().filter(|then| *then != ours) {
        if skipped > 0 {
            return Err(JobError::Config(format!(
                "{} holds outputs of another job ({}); a rerun keeps every .out that exists, which would mix the \
                 two: give another --output, or --overwrite to write every object again",
                output.url,
                ours.differences(then).join("; ")
            )));
        }
    }
    if previous.as_ref() != Some(ours) {
        let body = serde_json::to_vec_pretty(ours).expect("serialises");
        output.write_whole(&job_key, body).await.map_err(|e| JobError::Config(format!("writing {job_key}: {e}")))?;
    }
    let rejected = failures.len();
    if skipped > 0 {
        tracing::info!(skipped, "resuming: objects with an existing .out are skipped");
    }

    let setup_seconds = started.elapsed().as_secs_f64();
    let stats = Arc::new(Stats::default());
    let items = Arc::new(items);
    let places = Places { input: &input, output: &output, sketches: sketches.as_ref() };
    let outcome = run_pipeline(&cfg, prepared, places, items.clone(), stats.clone(), skipped).await;
    failures.extend(outcome.failures);

    let wall = started.elapsed().as_secs_f64();
    let batches = stats.batches.load(Ordering::Relaxed);
    let report = JobReport {
        input: input.url.clone(),
        output: output.url.clone(),
        shard: cfg.shard.map(|s| format!("{}/{}", s.index, s.count)),
        model: cfg.model.display().to_string(),
        runtime,
        objects_total,
        objects_succeeded: outcome.succeeded,
        objects_failed: outcome.failed + rejected,
        objects_skipped: skipped,
        objects_not_started: outcome.not_started,
        records: outcome.records,
        records_failed: outcome.records_failed,
        batches,
        mean_batch_size: if batches > 0 {
            stats.batch_items.load(Ordering::Relaxed) as f64 / batches as f64
        } else {
            0.0
        },
        bytes_read: stats.bytes_read.load(Ordering::Relaxed),
        bytes_written: stats.bytes_written.load(Ordering::Relaxed),
        wall_seconds: wall,
        setup_seconds,
        records_per_second: outcome.records as f64 / wall.max(1e-9),
        stage_seconds: StageSeconds {
            list: list_seconds,
            fetch: Stats::secs(&stats.fetch_ns),
            decode: Stats::secs(&stats.decode_ns),
            infer: Stats::secs(&stats.infer_ns),
            encode: Stats::secs(&stats.encode_ns),
            sketch: Stats::secs(&stats.sketch_ns),
            write: Stats::secs(&stats.write_ns),
        },
        failures,
    };
    match write_report(&cfg, &output, &report).await {
        Ok(()) => Ok(report),
        Err((path, reason)) => Err(JobError::Report { path, reason, report: Box::new(report) }),
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Whether an object under the input prefix is one a job wrote: its outputs live under `exclude`
/// (relative to the input prefix), or next to the inputs when `exclude` is empty.
fn ours(parts: &[String], exclude: Option<&[String]>, suffix: &str) -> bool {
    match exclude {
        None => false,
        Some([]) => {
            parts.last().is_some_and(|p| p.ends_with(suffix) || is_partial(p)) || parts.iter().any(|p| p == JOB_DIR)
        }
        Some(ex) => parts.len() >= ex.len() && parts.iter().zip(ex).all(|(a, b)| a == b),
    }
}

/// 32 random bits for this job's part names (std's randomly seeded hasher keys).
fn run_tag() -> u32 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id()) as u32
}

/// How `value` is written on the command line.
fn flag_value(value: impl clap::ValueEnum) -> String {
    value.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

/// What the job that wrote an output's `.out`s recorded of itself; `None` when the record is gone
/// or cannot be read as one.
async fn read_provenance(output: &Location, key: &Path) -> Result<Option<Provenance>, JobError> {
    match crate::store::get_bytes(output.store.as_ref(), key).await {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes)
            .inspect_err(|e| tracing::warn!("{key} is not a job record ({e}); it will be replaced"))
            .ok()),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(JobError::Config(format!("reading {key}: {e}{}", output.hint(&e.to_string())))),
    }
}

/// Writes the report where `cfg` says; on failure, where and why.
async fn write_report(cfg: &JobConfig, output: &Location, report: &JobReport) -> Result<(), (String, String)> {
    let body = serde_json::to_vec_pretty(report).expect("the report serialises");
    match &cfg.report {
        Some(path) => {
            crate::store::write_file(path, &body, cfg.fsync).map_err(|e| (path.display().to_string(), e.to_string()))
        }
        None => {
            let name = match cfg.shard {
                Some(s) => format!("report-{}-of-{}.json", s.index, s.count),
                None => "report.json".into(),
            };
            let key = output.prefix.clone().join(JOB_DIR).join(name.as_str());
            output.write_whole(&key, body).await.map_err(|reason| (key.to_string(), reason))
        }
    }
}

struct PipelineOutcome {
    not_started: usize,
    succeeded: usize,
    failed: usize,
    records: u64,
    records_failed: u64,
    failures: Vec<Failure>,
}

struct Pending {
    records: Vec<Option<Result<RecordOutputs, String>>>,
    remaining: usize,
    permit: OwnedSemaphorePermit,
}

async fn run_pipeline(
    cfg: &JobConfig,
    prepared: Prepared,
    places: Places<'_>,
    items: Arc<Vec<Item>>,
    stats: Arc<Stats>,
    skipped: usize,
) -> PipelineOutcome {
    let Places { input, output, sketches } = places;
    let Prepared { runtime: _, provenance: _, instances, plan, fixed_batch, encoder, sketch } = prepared;
    let max_batch = records_per_call(fixed_batch, cfg.max_batch_size);
    let encoder = Arc::new(encoder);
    let sketch = sketch.map(Arc::new);
    let (decode_tx, decode_rx) = async_channel::bounded::<DecodeJob>(cfg.decode_threads * 4);
    let (infer_tx, infer_rx) = crossbeam_channel::bounded::<Decoded>(cfg.threads * max_batch * 2);
    let (event_tx, event_rx) = async_channel::unbounded::<Event>();
    let (pool_tx, pool_rx) = crossbeam_channel::bounded::<Vec<u8>>(cfg.threads * max_batch * 2);

    let mut threads = Vec::new();
    let gunzip = (cfg.compression == Compression::Gzip).then_some(cfg.max_payload);
    for i in 0..cfg.decode_threads {
        let (rx, tx, events, stats, plan, pool) =
            (decode_rx.clone(), infer_tx.clone(), event_tx.clone(), stats.clone(), plan.clone(), pool_rx.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("ferry-decode-{i}"))
                .spawn(move || decode_loop(plan, gunzip, rx, tx, events, stats, pool))
                .expect("spawning a decode thread"),
        );
    }
    drop(infer_tx);
    for (i, backend) in instances.into_iter().enumerate() {
        let worker = ModelThread {
            rx: infer_rx.clone(),
            events: event_tx.clone(),
            stats: stats.clone(),
            plan: plan.clone(),
            max_batch,
            pad_to: fixed_batch,
            wait: cfg.batch_wait,
            pool: pool_tx.clone(),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("ferry-model-{i}"))
                .spawn(move || infer_loop(backend, worker))
                .expect("spawning a model thread"),
        );
    }
    drop(infer_rx);
    // Sketches take far less than inference; one thread per four model threads.
    let mut sketch_tx = sketch.as_ref().map(|w| {
        let (tx, rx) = crossbeam_channel::bounded::<SketchJob>(SKETCH_BATCH_RECORDS);
        for i in 0..cfg.threads.div_ceil(4) {
            let (w, rx, stats) = (w.clone(), rx.clone(), stats.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ferry-sketch-{i}"))
                    .spawn(move || sketch_loop(w, rx, stats))
                    .expect("spawning a sketch thread"),
            );
        }
        tx
    });

    let semaphore = Arc::new(Semaphore::new(cfg.max_concurrent));
    let max_payload = cfg.max_payload;
    let feeder = {
        let (items, store, events, stats) = (items.clone(), input.store.clone(), event_tx.clone(), stats.clone());
        let mut stop = cfg.stop.clone();
        tokio::spawn(async move {
            for id in 0..items.len() {
                let stopped = async {
                    match &mut stop {
                        Some(rx) => rx.wait_for(|&s| s).await.map(|_| ()).unwrap_or(()),
                        None => std::future::pending().await,
                    }
                };
                let permit = tokio::select! {
                    biased;
                    () = stopped => {
                        let _ = events.send(Event::Stopped { count: id }).await;
                        break;
                    }
                    p = semaphore.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                };
                let (items, store, events, decode, stats) =
                    (items.clone(), store.clone(), events.clone(), decode_tx.clone(), stats.clone());
                tokio::spawn(async move {
                    let t = Instant::now();
                    let got = get_bytes_within(store.as_ref(), &items[id].key, max_payload).await;
                    Stats::add(&stats.fetch_ns, t);
                    match got {
                        Ok(bytes) => {
                            stats.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            let _ = events.send(Event::Fetched { id, records: 1, permit }).await;
                            let _ = decode.send(DecodeJob { id, index: 0, bytes }).await;
                        }
                        // Like an image bomb, a record: `--on-error error-record` writes its error.
                        Err(e @ FetchError::TooLarge { .. }) => {
                            let _ = events.send(Event::Fetched { id, records: 1, permit }).await;
                            let outcome = Err(e.to_string());
                            let _ = events.send(Event::Record { id, index: 0, outcome }).await;
                        }
                        Err(e) => {
                            drop(permit);
                            let _ = events.send(Event::FetchFailed { id, reason: e.to_string() }).await;
                        }
                    }
                });
            }
        })
    };
    drop(event_tx);

    let mut progress = Progress::new(cfg.progress, items.len(), skipped);
    let mut pending: HashMap<usize, Pending> = HashMap::new();
    let mut out = PipelineOutcome {
        not_started: 0,
        succeeded: 0,
        failed: 0,
        records: 0,
        records_failed: 0,
        failures: Vec::new(),
    };
    let mut finished = 0;
    // Writers hold a sender so the loop can hear their results; the loop ends when every object is
    // accounted for.
    let (writer_tx, writer_rx) = async_channel::unbounded::<Event>();
    let out_limit = write_limit(output);
    let parts = match (&sketch, sketches) {
        (Some(w), Some(set)) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_millis());
            let open = Arc::new(AtomicUsize::new(items.len()));
            let writer = PartWriter {
                sketch: w.clone(),
                sketches: set.clone(),
                sketch_limit: write_limit(set),
                output: output.clone(),
                out_limit: out_limit.clone(),
                part_size: cfg.part_size,
                part_records: cfg.sketch_part_records,
                events: writer_tx.clone(),
                stats: stats.clone(),
                open: open.clone(),
                // Jobs that write one set may start in the same millisecond (shards of one job, or
                // a replacement pod beside the one it replaces): their parts must not share a name.
                run: match cfg.shard {
                    Some(s) => format!("{run:013}-{:08x}-shard{}of{}", run_tag(), s.index, s.count),
                    None => format!("{run:013}-{:08x}", run_tag()),
                },
                seq: 0,
            };
            Some((tx, open, tokio::spawn(writer.run(rx))))
        }
        _ => None,
    };
    let mut stages_open = true;
    let mut writing = 0usize;
    // Objects whose `.out` waits for a sketch part; once nothing else is open, the last part
    // is written without waiting for it to fill.
    let (mut parked, mut flushed) = (HashSet::new(), false);
    // Every object, unless the job is told to stop.
    let mut total = items.len();
    while finished < total {
        // Once every object has gone to be written, the sketch threads need not wait for more.
        if finished + writing == total {
            sketch_tx = None;
        }
        if let Some((tx, open, _)) = &parts {
            open.store(total - finished - parked.len(), Ordering::Relaxed);
            if !parked.is_empty() && !flushed && finished + parked.len() == total {
                let _ = tx.send(PartMsg::Flush);
                flushed = true;
            }
        }
        if !stages_open && writing == 0 {
            break;
        }
        let event = tokio::select! {
            e = event_rx.recv(), if stages_open => match e {
                Ok(e) => e,
                Err(_) => {
                    stages_open = false;
                    continue;
                }
            },
            e = writer_rx.recv() => e.expect("the loop holds a writer sender"),
        };
        match event {
            Event::Fetched { id, records, permit } => {
                pending
                    .insert(id, Pending { records: (0..records).map(|_| None).collect(), remaining: records, permit });
            }
            Event::FetchFailed { id, reason } => {
                out.failed += 1;
                finished += 1;
                out.failures.push(Failure { object: items[id].key.to_string(), record: None, reason });
                progress.object_done(0, true);
            }
            Event::Record { id, index, outcome } => {
                let p = pending.get_mut(&id).expect("a record arrived for an object never fetched. This is a bug.");
                out.records += 1;
                if let Err(reason) = &outcome {
                    out.records_failed += 1;
                    out.failures.push(Failure {
                        object: items[id].key.to_string(),
                        record: Some(index),
                        reason: reason.clone(),
                    });
                }
                p.remaining -= 1;
                if p.remaining > 0 {
                    // It waits for the rest of its object, which may take many batches.
                    p.records[index] = Some(outcome.map(|mut r| {
                        r.detach();
                        r
                    }));
                    continue;
                }
                p.records[index] = Some(outcome);
                let p = pending.remove(&id).expect("present");
                let mut records: Vec<_> = p.records.into_iter().map(|r| r.expect("all records are back")).collect();
                let record_count = records.len() as u64;
                if cfg.on_error == OnError::FailObject && records.iter().any(|r| r.is_err()) {
                    out.failed += 1;
                    finished += 1;
                    progress.object_done(record_count, true);
                    continue;
                }
                let (to, key, encoder, stats, tx, write_limit) = (
                    output.clone(),
                    items[id].out_key.clone(),
                    encoder.clone(),
                    stats.clone(),
                    writer_tx.clone(),
                    out_limit.clone(),
                );
                let sketch_job = match (&sketch, &parts, &sketch_tx) {
                    (Some(w), Some((tx, ..)), Some(stage)) => {
                        Some((w.clone(), tx.clone(), stage.clone(), items[id].relative.clone()))
                    }
                    _ => None,
                };
                let part_size = cfg.part_size;
                let permit = p.permit;
                writing += 1;
                tokio::spawn(async move {
                    let t = Instant::now();
                    let stats2 = stats.clone();
                    let (body, rows) = tokio::task::spawn_blocking(move || {
                        let body = encoder.body(&mut records);
                        Stats::add(&stats2.encode_ns, t);
                        let t = Instant::now();
                        let rows = sketch_job.map(|(w, parts, stage, key)| {
                            let dags = w.dags(&records);
                            Stats::add(&stats2.sketch_ns, t);
                            // A full queue blocks this blocking-pool thread while the object
                            // still holds its permit.
                            let rows = match dags {
                                Ok(dags) if dags.is_empty() => Ok(None),
                                Ok(dags) => {
                                    let (reply, rows) = tokio::sync::oneshot::channel();
                                    match stage.send(SketchJob { key, dags, reply }) {
                                        Ok(()) => Ok(Some(rows)),
                                        Err(_) => Err("the sketch threads stopped. This is a bug.".to_string()),
                                    }
                                }
                                Err(e) => Err(e),
                            };
                            (rows, parts)
                        });
                        (body, rows)
                    })
                    .await
                    .expect("encoding panicked");
                    let outcome = match rows {
                        None | Some((Ok(None), _)) => {
                            write_object(to, key, body, part_size, &write_limit, &stats).await
                        }
                        Some((Err(e), _)) => Err(e),
                        Some((Ok(Some(rows)), parts)) => {
                            // The permit goes back now: the bounded queue, then the part writer,
                            // bound what they hold.
                            drop(permit);
                            match rows.await {
                                Ok(Ok(rows)) => {
                                    let parked = Parked { id, out_key: key, body, rows };
                                    if parts.send(PartMsg::Park(parked)).is_ok() {
                                        let _ = tx.send(Event::Parked { id }).await;
                                        return;
                                    }
                                    Err("the sketch part writer stopped. This is a bug.".to_string())
                                }
                                Ok(Err(e)) => Err(e),
                                Err(_) => Err("the sketch threads stopped. This is a bug.".to_string()),
                            }
                        }
                    };
                    let _ = tx.send(Event::Written { id, outcome }).await;
                });
                progress.records(record_count);
            }
            Event::Parked { id } => {
                parked.insert(id);
            }
            Event::Stopped { count } => {
                tracing::warn!(
                    started = count,
                    left = items.len() - count,
                    "stopping: finishing the objects in flight"
                );
                total = count;
            }
            Event::Written { id, outcome } => {
                writing -= 1;
                finished += 1;
                parked.remove(&id);
                match outcome {
                    Ok(()) => {
                        out.succeeded += 1;
                        progress.object_done(0, false);
                    }
                    Err(reason) => {
                        out.failed += 1;
                        out.failures.push(Failure { object: items[id].key.to_string(), record: None, reason });
                        progress.object_done(0, true);
                    }
                }
            }
        }
    }
    progress.finish();
    drop(sketch_tx);
    if let Some((tx, _, writer)) = parts {
        drop(tx);
        writer.await.expect("the sketch part writer panicked");
    }
    feeder.await.expect("the feeder task panicked");
    for t in threads {
        t.join().expect("a pipeline thread panicked");
    }
    out.not_started = items.len() - total;
    if finished < total {
        for p in pending.keys() {
            out.failures.push(Failure {
                object: items[*p].key.to_string(),
                record: None,
                reason: "lost in the pipeline. This is a bug.".into(),
            });
        }
    }
    out
}

/// Puts at once to a store: for a local folder, half the cores. Creating files in one folder
/// takes the folder's lock, and writers that find it taken spin on it, burning the cores the model
/// needs; a local put is quick, so a few writers keep up. For a remote store, as many as
/// `--max-concurrent` lets through, since each put is mostly waiting.
fn write_limit(at: &Location) -> Arc<Semaphore> {
    let n = if at.is_local() {
        (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1)
    } else {
        Semaphore::MAX_PERMITS
    };
    Arc::new(Semaphore::new(n))
}

/// One atomic put (multipart past `part_size`), counted in the job's write time and bytes.
async fn write_object(
    to: Location,
    key: Path,
    body: Vec<u8>,
    part_size: usize,
    limit: &Semaphore,
    stats: &Stats,
) -> Result<(), String> {
    let t = Instant::now();
    let _permit = limit.acquire().await.expect("the write limit is never closed");
    let len = body.len() as u64;
    let outcome = to.write(&key, body, part_size).await;
    Stats::add(&stats.write_ns, t);
    if outcome.is_ok() {
        stats.bytes_written.fetch_add(len, Ordering::Relaxed);
    }
    outcome
}

/// `bytes` gunzipped into `out`, refused past `limit` bytes: a few kilobytes of gzip can hold
/// gigabytes of zeros.
fn gunzip(bytes: &[u8], limit: u64, out: &mut Vec<u8>) -> Result<(), String> {
    use std::io::Read;
    out.clear();
    // Concatenated members are one stream, as gzip(1) reads them.
    let mut reader = flate2::read::MultiGzDecoder::new(bytes).take(limit + 1);
    reader.read_to_end(out).map_err(|e| format!("not gzip data (--compression gzip): {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("decompresses to more than the payload limit of {} MiB (--max-payload-mb)", limit >> 20));
    }
    Ok(())
}

/// Decodes images until `rx` closes; `gunzip_limit` is the decompressed-size limit when the inputs
/// are gzip-compressed.
fn decode_loop(
    plan: ImagePlan,
    gunzip_limit: Option<u64>,
    rx: async_channel::Receiver<DecodeJob>,
    tx: crossbeam_channel::Sender<Decoded>,
    events: async_channel::Sender<Event>,
    stats: Arc<Stats>,
    pool: crossbeam_channel::Receiver<Vec<u8>>,
) {
    let mut decoder = ImageDecoder::new(plan.clone());
    let mut inflated = Vec::new();
    while let Ok(job) = rx.recv_blocking() {
        let t = Instant::now();
        let bytes = match gunzip_limit {
            None => Ok(&job.bytes[..]),
            Some(limit) => gunzip(&job.bytes, limit, &mut inflated).map(|()| &inflated[..]),
        };
        let mut pixels = pool.try_recv().unwrap_or_else(|_| Vec::with_capacity(plan.pixels_len()));
        let result = bytes.map(|bytes| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decoder.decode_pixels(bytes, &mut pixels)))
        });
        Stats::add(&stats.decode_ns, t);
        let error = match result {
            Err(e) => e,
            Ok(Ok(Ok(()))) => {
                if tx.send(Decoded { id: job.id, index: job.index, pixels }).is_err() {
                    return;
                }
                continue;
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(_)) => {
                decoder = ImageDecoder::new(plan.clone());
                "the image decoder panicked on this input".to_string()
            }
        };
        let _ = events.send_blocking(Event::Record { id: job.id, index: job.index, outcome: Err(error) });
    }
}

/// What a model thread works with, besides its backend.
struct ModelThread {
    rx: crossbeam_channel::Receiver<Decoded>,
    events: async_channel::Sender<Event>,
    stats: Arc<Stats>,
    plan: ImagePlan,
    max_batch: usize,
    /// Rows of every model call, for a model with a fixed batch size.
    pad_to: Option<usize>,
    wait: Duration,
    pool: crossbeam_channel::Sender<Vec<u8>>,
}

fn infer_loop(mut backend: Box<dyn Backend>, t: ModelThread) {
    let ModelThread { rx, events, stats, plan, max_batch, pad_to, wait, pool } = t;
    let item_shape = plan.item_shape();
    let mut input = Tensor { shape: Vec::new(), data: Vec::new() };
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + wait;
        while batch.len() < max_batch {
            match rx.recv_deadline(deadline) {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let n = batch.len();
        // Every float is written below, so the buffer is only resized, never cleared.
        let len = plan.item_len();
        input.data.resize(n * len, 0.0);
        for (d, item) in batch.iter_mut().zip(input.data.chunks_exact_mut(len)) {
            plan.normalise(&d.pixels, item);
            // Pixel buffers go back to the decoders: fresh ones cost page faults.
            let _ = pool.try_send(std::mem::take(&mut d.pixels));
        }
        input.shape.clear();
        input.shape.push(n);
        input.shape.extend_from_slice(&item_shape);
        let rows = pad_to.unwrap_or(n).max(n);
        input.pad_rows(rows);
        let t = Instant::now();
        let result = backend.run(&input);
        Stats::add(&stats.infer_ns, t);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.batch_items.fetch_add(n as u64, Ordering::Relaxed);
        let result = result.map_err(|e| e.to_string()).and_then(|outputs| {
            match outputs.iter().find(|o| o.shape.first() != Some(&rows)) {
                Some(o) => Err(format!("the model returned shape {:?} for a batch of {rows}", o.shape)),
                None => Ok(outputs),
            }
        });
        let result = result.map(Arc::<[_]>::from);
        for (i, d) in batch.into_iter().enumerate() {
            let outcome = match &result {
                Ok(outputs) => Ok(RecordOutputs::new(outputs.clone(), i)),
                Err(e) => Err(e.clone()),
            };
            let _ = events.send_blocking(Event::Record { id: d.id, index: d.index, outcome });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::profile::{fit_profile, FitSettings};

    #[test]
    fn shards_partition_keys_by_their_hash() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1/0", "-1/4", "1", "a/b", ""] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.contains("give INDEX/COUNT"), "{bad:?}: {err}");
        }
        let shards: Vec<Shard> = (0..4).map(|index| Shard { index, count: 4 }).collect();
        let mut sizes = [0; 4];
        for i in 0..4000 {
            let key = format!("photos/{}/img_{i:05}.jpg", i % 17);
            let owners: Vec<u64> = shards.iter().filter(|s| s.owns(&key)).map(|s| s.index).collect();
            assert_eq!(owners.len(), 1, "{key}: {owners:?}");
            sizes[owners[0] as usize] += 1;
        }
        assert!(sizes.iter().all(|&n| (900..1100).contains(&n)), "{sizes:?}");
        // xxHash64 with seed 0, so other tools can tell which shard holds a key.
        assert_eq!(twox_hash::XxHash64::oneshot(0, b""), 0xef46_db37_51d8_e999);
    }

    #[test]
    fn objects_sketched_together_get_their_own_sketches_and_a_bad_one_fails_alone() {
        let features: Vec<Vec<f32>> = (0..64)
            .map(|i| (0..32).map(|j| ((i * 7 + j * 3) % 11) as f32 + (i as f32 * 0.1).sin()).collect())
            .collect();
        let labels = (0..10).map(|i| format!("c{i}")).collect();
        let profile =
            fit_profile(&features, labels, &FitSettings::default(), "f".into(), "s".into(), Vec::new()).unwrap();
        let sketcher = profile.sketcher().unwrap();
        let writer = SketchWriter { profile, sketcher, inputs: HashMap::new() };
        let dag = |i: usize| {
            let mut probs = vec![0.02f32; 10];
            probs[i % 10] = 0.8;
            writer.profile.dag(&features[i], &probs)
        };
        let mut bad = dag(5);
        bad.nodes[0].module = 10_000;
        let objects = vec![
            ("a".to_string(), vec![(0, dag(0)), (2, dag(1))]),
            ("b".to_string(), vec![(0, dag(2)), (1, bad)]),
            ("c".to_string(), vec![(3, dag(3))]),
        ];
        // Each object's rows: its keys and record indices, each sketch what it would be alone.
        let check = |rows: &[Result<Vec<SketchRow>, String>], objects: &[(String, RecordDags)], skip: Option<usize>| {
            assert_eq!(rows.len(), objects.len());
            for (i, (key, dags)) in objects.iter().enumerate().filter(|&(i, _)| Some(i) != skip) {
                let got = rows[i].as_ref().unwrap();
                assert_eq!(got.len(), dags.len(), "{key}");
                for (row, (record, dag)) in got.iter().zip(dags) {
                    assert_eq!((&row.key, row.record), (key, *record));
                    assert_eq!(row.sketch, writer.sketcher.sketch(dag).unwrap().data, "{key} record {record}");
                }
            }
        };
        let rows = writer.rows(objects.clone());
        assert!(rows[1].as_ref().is_err_and(|e| e.contains("10000")), "{:?}", rows[1].as_ref().err());
        check(&rows, &objects, Some(1));
        // Without the bad record, all in one batch.
        let mut good = objects.clone();
        good[1].1.pop();
        check(&writer.rows(good.clone()), &good, None);
    }

    #[test]
    fn outputs_inside_inputs_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().to_str().unwrap().to_string();
        std::fs::create_dir_all(dir.path().join("out/x")).unwrap();
        assert_eq!(nested_output(&input, &format!("{input}/out/x")), Some(vec!["out".into(), "x".into()]));
        assert_eq!(nested_output(&format!("{input}/"), &format!("file://{input}/out")), Some(vec!["out".into()]));
        assert_eq!(nested_output(&format!("{input}/out"), &input), None);
        assert_eq!(nested_output(&input, &format!("file://{input}/")), Some(vec![]));
        assert_eq!(nested_output("s3://b/in", "s3://b/in/out/"), Some(vec!["out".into()]));
        assert_eq!(nested_output("s3://b/in", "s3://b/input"), None);
    }
}
