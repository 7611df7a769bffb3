//! The `ferry` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferry::artifact;
use ferry::progress::ProgressMode;
use ferry::transform::{self, Compression, JobConfig, JobReport, OnError};
use ferry_backend::BackendKind;

/// Carries a dataset through a trained model.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a batch job: every object under --input through the model, one <key>.out per object
    /// under --output.
    Transform(TransformArgs),
    /// Measure the model alone: every thread runs batches of synthetic input flat out. Prints one
    /// JSON line.
    ModelBench(ModelBenchArgs),
    /// Sketches: fit a profile for a model, and query the sketch sets jobs write with --sketch.
    #[command(subcommand)]
    Sketch(SketchCommand),
}

#[derive(Debug, Subcommand)]
enum SketchCommand {
    /// Run the model over calibration images and write the sketch profile (PCA of the pooled
    /// features, attribute scales, modules) next to the model.
    Fit(FitArgs),
    /// The records most similar to one, by cosine of their sketches. Prints JSON lines.
    Similar(SimilarArgs),
    /// How many records had a class as their top class, over all records or those under --prefix.
    Count(ClassArgs),
    /// Count, mean score and mean attributes of a class, over all records or those under --prefix.
    /// Prints JSON.
    Stats(ClassArgs),
    /// The object tree recovered from one record's sketch. Prints JSON.
    Decode(DecodeArgs),
    /// Write a smaller copy of a sketch set keeping the first D' coordinates of every sketch; it
    /// answers the same queries, less precisely.
    Erase(EraseArgs),
}

#[derive(Debug, Args)]
struct FitArgs {
    /// A model directory whose ferry.toml names the features output.
    #[arg(long, env = "FERRY_MODEL")]
    model: String,
    /// Calibration images: a folder, file://PATH or s3://bucket/prefix.
    #[arg(long)]
    input: String,
    /// Where to write the profile [default: <model>/sketch_profile.json].
    #[arg(long)]
    output: Option<PathBuf>,
    /// Use at most this many images, spread evenly over the listing.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// The recipe: classifier (image and top classes) or stages (backbone stages as layers,
    /// their codewords as modules; give --stage).
    #[arg(long, default_value = "classifier", value_parser = ["classifier", "stages"])]
    recipe: String,
    /// A stage tensor of the model for the stages recipe (C × H × W per record), deepest first;
    /// repeat for each stage.
    #[arg(long)]
    stage: Vec<String>,
    /// Peaks of the deepest stage per record; each finer stage takes twice as many.
    #[arg(long, default_value_t = 8)]
    peaks: usize,
    /// Codewords (modules) per stage.
    #[arg(long, default_value_t = 64)]
    codewords: usize,
    /// Sketch dimension d (floats per sketch) [default: 1024 for classifier, 4096 for stages].
    #[arg(long)]
    dim: Option<usize>,
    /// Seed of the sketch matrices.
    #[arg(long, default_value_t = ferry::sketch::profile::FitSettings::default().seed)]
    seed: u64,
    /// Classes attached to each image (the top one, and the rest weighted by probability).
    #[arg(long, default_value_t = 3)]
    top_classes: usize,
    /// Model runtime: auto, ort or tract.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Records per model call.
    #[arg(long, default_value_t = transform::DEFAULT_MAX_BATCH_SIZE)]
    max_batch_size: usize,
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The sketch set: the --sketch location of a transform job.
    #[arg(long, env = "FERRY_SKETCHES")]
    sketches: String,
    /// Retries of a failed request to a remote store.
    #[arg(long, default_value_t = 10)]
    max_retries: usize,
}

#[derive(Debug, Args)]
struct SimilarArgs {
    #[command(flatten)]
    set: SetArgs,
    /// The query: an input key relative to the job's input prefix.
    #[arg(long)]
    to: String,
    /// Record index inside that object [default: the first].
    #[arg(long)]
    record: Option<i64>,
    /// How many to return.
    #[arg(short, long, default_value_t = 10)]
    k: usize,
}

#[derive(Debug, Args)]
struct ClassArgs {
    #[command(flatten)]
    set: SetArgs,
    /// The class: a label from the model's labels.txt, or class:N.
    #[arg(long)]
    module: String,
    /// Only records whose key starts with this.
    #[arg(long, default_value = "")]
    prefix: String,
}

#[derive(Debug, Args)]
struct DecodeArgs {
    #[command(flatten)]
    set: SetArgs,
    /// An input key relative to the job's input prefix.
    key: String,
    /// Record index inside that object [default: the first].
    #[arg(long)]
    record: Option<i64>,
}

#[derive(Debug, Args)]
struct EraseArgs {
    #[command(flatten)]
    set: SetArgs,
    /// Coordinates to keep (D' < d).
    #[arg(long)]
    keep: usize,
    /// Where to write the smaller set.
    #[arg(long)]
    output: String,
}

#[derive(Debug, Args)]
struct ModelBenchArgs {
    /// An .onnx file or a model directory.
    #[arg(long)]
    model: String,
    /// Records per model call.
    #[arg(long, default_value_t = transform::DEFAULT_MAX_BATCH_SIZE)]
    max_batch_size: usize,
    /// Model threads [default: CPU cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Threads inside one model call.
    #[arg(long, default_value_t = 1)]
    intra_op_threads: usize,
    /// Model runtime: auto, ort or tract.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

#[derive(Debug, Args)]
struct TransformArgs {
    /// An .onnx file, or a model directory holding model.onnx and optionally ferry.toml and
    /// labels.txt.
    #[arg(long, env = "FERRY_MODEL")]
    model: String,
    /// Where the inputs are: a folder, file://PATH, one file, or s3://bucket/prefix (S3 settings
    /// come from the AWS_* variables; AWS_ENDPOINT_URL for S3-compatible stores). A bucket prefix
    /// that is not a folder selects every key that begins with it, as S3Prefix does in SageMaker.
    #[arg(long, env = "FERRY_INPUT")]
    input: String,
    /// Where the outputs go, same forms. <output>/<key relative to input>.out per input object.
    #[arg(long, env = "FERRY_OUTPUT")]
    output: String,
    /// Content type of the inputs. Image formats are told apart by their bytes.
    #[arg(long, env = "FERRY_CONTENT_TYPE", default_value = "application/x-image",
          value_parser = ["application/x-image", "image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp",
                          "image/tiff"])]
    content_type: String,
    /// Write only the K best classes (with labels when the model has labels.txt) instead of every
    /// score.
    #[arg(long, env = "FERRY_TOP_K")]
    top_k: Option<usize>,
    /// Most records per model call.
    #[arg(long, env = "FERRY_MAX_BATCH_SIZE", default_value_t = transform::DEFAULT_MAX_BATCH_SIZE)]
    max_batch_size: usize,
    /// How long a model thread waits for more records to fill a batch, in milliseconds.
    #[arg(long, env = "FERRY_BATCH_WAIT_MS", default_value_t = 5)]
    batch_wait_ms: u64,
    /// Objects in flight (read but not yet written). Bounds memory.
    #[arg(long, env = "FERRY_MAX_CONCURRENT", default_value_t = 64)]
    max_concurrent: usize,
    /// Model threads, each with its own single-threaded model instance [default: CPU cores].
    #[arg(long, env = "FERRY_THREADS")]
    threads: Option<usize>,
    /// Image decoding threads [default: CPU cores].
    #[arg(long, env = "FERRY_DECODE_THREADS")]
    decode_threads: Option<usize>,
    /// Threads inside one model call (ONNX Runtime intra-op threads).
    #[arg(long, env = "FERRY_INTRA_OP_THREADS", default_value_t = 1)]
    intra_op_threads: usize,
    /// Model runtime: ort (ONNX Runtime), tract (pure Rust), or auto (ONNX Runtime when its library
    /// is found: ORT_DYLIB_PATH, system folders, a Python onnxruntime package).
    #[arg(long, env = "FERRY_BACKEND", default_value = "auto")]
    backend: BackendKind,
    /// What a failed record does: fail-object writes no .out for its object; error-record writes
    /// {"error": "..."} in place of its prediction.
    #[arg(long, env = "FERRY_ON_ERROR", value_enum, default_value_t = OnError::FailObject)]
    on_error: OnError,
    /// Largest image, in declared pixels, that will be decoded; larger ones fail (image bombs).
    #[arg(long, env = "FERRY_MAX_IMAGE_PIXELS", default_value_t = 178_956_970)]
    max_image_pixels: u64,
    /// Largest object, in MiB, that will be read; larger ones fail without being read (SageMaker's
    /// MaxPayloadInMB).
    #[arg(long, env = "FERRY_MAX_PAYLOAD_MB", default_value_t = transform::DEFAULT_MAX_PAYLOAD_MB,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_payload_mb: u64,
    /// Decode every JPEG at full size instead of at 1/2, 1/4 or 1/8 scale when that leaves at
    /// least twice the resized size.
    #[arg(long, env = "FERRY_NO_DCT_SCALING")]
    no_dct_scaling: bool,
    /// Outputs larger than this many MiB are uploaded in parts of this size (at least 5).
    #[arg(long, env = "FERRY_PART_SIZE_MB", default_value_t = 8)]
    part_size_mb: usize,
    /// Flush each output written to a local folder to disk before renaming it into place, so that
    /// after a power loss every .out that exists is complete and a rerun resumes correctly
    /// (about 3% slower on a 2-core bench). A kill needs no flush.
    #[arg(long, env = "FERRY_FSYNC")]
    fsync: bool,
    /// Write the job report here instead of <output>/_ferry/report.json.
    #[arg(long, env = "FERRY_REPORT")]
    report: Option<PathBuf>,
    /// Progress display.
    #[arg(long, env = "FERRY_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Retries of a failed request to a remote store, with exponential backoff.
    #[arg(long, env = "FERRY_MAX_RETRIES", default_value_t = 10)]
    max_retries: usize,
    /// Also write a sketch of every record here (Parquet part files), for `ferry sketch`
    /// queries. Needs a sketch profile (`ferry sketch fit`).
    #[arg(long, env = "FERRY_SKETCH")]
    sketch: Option<String>,
    /// The sketch profile [default: <model>/sketch_profile.json].
    #[arg(long, env = "FERRY_SKETCH_PROFILE")]
    sketch_profile: Option<PathBuf>,
    /// Records per sketch part file. An object's .out is written after the part holding its
    /// sketches, which is written when full or 5 s after its first record.
    #[arg(long, default_value_t = 1024)]
    sketch_part_records: usize,
    /// Run one shard of the objects, INDEX/COUNT (0/4 to 3/4), as one pod of a Kubernetes Indexed
    /// Job: `--shard $(JOB_COMPLETION_INDEX)/4`. Shards split the objects by a hash of their keys,
    /// write to the same output, and each writes its report to _ferry/report-INDEX-of-COUNT.json.
    #[arg(long, env = "FERRY_SHARD")]
    shard: Option<ferry::transform::Shard>,
    /// --input names a manifest file (a local file or an s3:// object) listing the inputs, as
    /// SageMaker's S3DataType=ManifestFile: [{"prefix": "s3://bucket/prefix/"}, "key", ...].
    #[arg(long, env = "FERRY_MANIFEST")]
    manifest: bool,
    /// How the input objects are stored, as SageMaker's CompressionType: gzip decompresses each
    /// before decoding it (its decompressed size is held to --max-payload-mb too).
    #[arg(long, env = "FERRY_COMPRESSION", value_enum, ignore_case = true, default_value_t = Compression::None)]
    compression: Compression,
    /// Write every object, also those whose .out exists. Without it a rerun skips them (resuming
    /// a killed job), and refuses outputs another model or other settings wrote.
    #[arg(long, env = "FERRY_OVERWRITE")]
    overwrite: bool,
}

impl TransformArgs {
    fn into_config(self, model: PathBuf) -> JobConfig {
        let defaults = JobConfig::default();
        JobConfig {
            model,
            input: self.input,
            output: self.output,
            top_k: self.top_k,
            max_batch_size: self.max_batch_size,
            batch_wait: Duration::from_millis(self.batch_wait_ms),
            max_concurrent: self.max_concurrent,
            threads: self.threads.unwrap_or(defaults.threads),
            decode_threads: self.decode_threads.unwrap_or(defaults.decode_threads),
            intra_op_threads: self.intra_op_threads,
            backend: self.backend,
            on_error: self.on_error,
            max_image_pixels: self.max_image_pixels,
            max_payload: self.max_payload_mb << 20,
            dct_scaling: !self.no_dct_scaling,
            part_size: self.part_size_mb << 20,
            fsync: self.fsync,
            report: self.report,
            progress: self.progress,
            max_retries: self.max_retries,
            sketch: self.sketch,
            sketch_profile: self.sketch_profile,
            sketch_part_records: self.sketch_part_records,
            shard: self.shard,
            manifest: self.manifest,
            compression: self.compression,
            overwrite: self.overwrite,
            stop: None,
        }
    }
}

/// Runs this thread, and every thread it starts from now on, under Linux's `SCHED_BATCH`: a thread
/// that wakes (a decoder handed an image, a writer handed an output) waits for the running one's
/// slice instead of preempting it at once, so the model threads keep their caches between a
/// job's many small hand-offs. A transform of the bench images switched context a third less
/// often and ran about 1.4% faster. Any process may lower itself to this policy.
fn batch_scheduling() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the calling thread (pid 0), read during the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            tracing::debug!("SCHED_BATCH refused: {}", std::io::Error::last_os_error());
        }
    }
}

/// The number of the signal that stopped a job, once one has.
static CAUGHT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The first SIGTERM (Kubernetes stopping a pod) or Ctrl-C stops a job gracefully: no new
/// objects, those in flight finished, the report written. A second one ends the process at once,
/// which is safe too: outputs are atomic and a rerun resumes.
fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return rx;
    };
    tokio::spawn(async move {
        loop {
            let number = tokio::select! {
                _ = term.recv() => 15,
                _ = int.recv() => 2,
            };
            if CAUGHT.swap(number, std::sync::atomic::Ordering::Relaxed) != 0 {
                // Without running exit handlers: they would tear down ONNX Runtime under the
                // sessions still running, which then log errors.
                #[cfg(target_os = "linux")]
                unsafe {
                    libc::_exit(128 + number as i32)
                };
                #[cfg(not(target_os = "linux"))]
                std::process::exit(128 + number as i32);
            }
            eprintln!("stopping: finishing the objects in flight (again to stop at once)");
            let _ = tx.send(true);
        }
    });
    rx
}

/// Says why a command could not run, and exits with 2.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // A store that goes away mid-job makes a line per retry of every request in flight
            // (thousands); each object that runs out of retries is reported with the reason anyway.
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| "info,ort=warn,object_store=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before the runtime's threads exist, so that they inherit it.
    if matches!(cli.command, Command::Transform(_) | Command::Sketch(SketchCommand::Fit(_))) {
        batch_scheduling();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting the async runtime");
    match cli.command {
        Command::Transform(args) => {
            let artifact = match runtime.block_on(artifact::resolve(&args.model, args.max_retries)) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let mut config = args.into_config(artifact.path.clone());
            config.stop = Some(runtime.block_on(async { stop_on_signal() }));
            match runtime.block_on(transform::run(config)) {
                Ok(report) if report.objects_not_started > 0 => {
                    summarise(&report);
                    let number = CAUGHT.load(std::sync::atomic::Ordering::Relaxed);
                    eprintln!(
                        "stopped by {}: {} objects not started; run the same command again to finish them",
                        if number == 2 { "SIGINT" } else { "SIGTERM" },
                        report.objects_not_started
                    );
                    ExitCode::from(128 + number)
                }
                Ok(report) => summarise(&report),
                Err(e) => {
                    // The job ran, but its report could not be written: what it did still counts.
                    if let transform::JobError::Report { report, .. } = &e {
                        summarise(report);
                    }
                    fail(e)
                }
            }
        }
        Command::Sketch(cmd) => match runtime.block_on(sketch(cmd)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::ModelBench(args) => {
            let artifact = match runtime.block_on(artifact::resolve(&args.model, 10)) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let config = ferry::bench::BenchConfig {
                model: artifact.path.clone(),
                batch: args.max_batch_size,
                threads: args.threads.unwrap_or_else(|| JobConfig::default().threads),
                intra_op_threads: args.intra_op_threads,
                backend: args.backend,
                duration: Duration::from_secs_f64(args.seconds),
            };
            match ferry::bench::run(&config) {
                Ok(report) => {
                    println!("{}", serde_json::to_string(&report).expect("the report serialises"));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

async fn sketch(cmd: SketchCommand) -> Result<(), String> {
    use ferry::sketch::query::{erase, Queries};
    use ferry::sketch::store::SketchSet;
    let load = |set: SetArgs| async move { SketchSet::load(&set.sketches, set.max_retries).await };
    match cmd {
        SketchCommand::Fit(a) => {
            let artifact = artifact::resolve(&a.model, 10).await.map_err(|e| e.to_string())?;
            if artifact.temporary && a.output.is_none() {
                return Err(format!(
                    "{} is fetched or unpacked into a temporary folder: give --output for the profile",
                    a.model
                ));
            }
            let cfg = ferry::sketch::fit::FitConfig {
                model: artifact.path.clone(),
                input: a.input,
                output: a.output,
                limit: a.limit,
                settings: {
                    let stages = a.recipe == "stages";
                    if stages == a.stage.is_empty() {
                        return Err("--stage is needed by the stages recipe, and only by it".into());
                    }
                    ferry::sketch::profile::FitSettings {
                        d: a.dim.unwrap_or(if stages { 4096 } else { 1024 }),
                        seed: a.seed,
                        top_classes: a.top_classes,
                        stages: a.stage,
                        peaks: a.peaks,
                        codewords: a.codewords,
                        ..Default::default()
                    }
                },
                backend: a.backend,
                threads: JobConfig::default().threads,
                batch: a.max_batch_size,
                max_retries: 10,
            };
            let out = ferry::sketch::fit::run(cfg).await?;
            for (key, reason) in &out.skipped {
                eprintln!("skipped: {key}: {reason}");
            }
            eprintln!(
                "fitted on {} records ({} skipped): d = {}, {} modules; wrote {}",
                out.profile.calibration_records,
                out.skipped.len(),
                out.profile.d,
                out.profile.modules.len(),
                out.path.display()
            );
        }
        SketchCommand::Similar(a) => {
            let q = Queries::new(load(a.set).await?)?;
            for s in q.similar(&a.to, a.record, a.k)? {
                json(&s);
            }
        }
        SketchCommand::Count(a) => {
            let q = Queries::new(load(a.set).await?)?;
            let s = q.class_stats(&a.module, &a.prefix)?;
            println!("{:.1}", s.count);
        }
        SketchCommand::Stats(a) => {
            let q = Queries::new(load(a.set).await?)?;
            json(&q.class_stats(&a.module, &a.prefix)?);
        }
        SketchCommand::Decode(a) => {
            let q = Queries::new(load(a.set).await?)?;
            let objects = q.decode(&a.key, a.record)?;
            json(&serde_json::json!({ "key": a.key, "objects": objects }));
        }
        SketchCommand::Erase(a) => {
            let max_retries = a.set.max_retries;
            let set = load(a.set).await?;
            let n = erase(&set, a.keep, &a.output, max_retries).await?;
            eprintln!(
                "wrote {} records in {n} part{} keeping {} of {} coordinates to {}",
                set.rows.len(),
                if n == 1 { "" } else { "s" },
                a.keep,
                set.profile.d,
                a.output
            );
        }
    }
    Ok(())
}

/// Prints one query result as a JSON line.
fn json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).expect("query results serialise"));
}

fn summarise(r: &JobReport) -> ExitCode {
    eprintln!(
        "transform finished in {:.1}s: {} objects ({} written, {} failed, {} already done), {} records, {:.1} records/s",
        r.wall_seconds,
        r.objects_total,
        r.objects_succeeded,
        r.objects_failed,
        r.objects_skipped,
        r.records,
        r.records_per_second
    );
    for f in &r.failures {
        match f.record {
            // A key's control characters are shown escaped, not sent to the terminal.
            Some(i) => eprintln!("failed: {} record {i}: {}", f.object.escape_debug(), f.reason),
            None => eprintln!("failed: {}: {}", f.object.escape_debug(), f.reason),
        }
    }
    if r.objects_failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
