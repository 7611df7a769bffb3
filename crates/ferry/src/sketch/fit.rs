//! `ferry sketch fit`: run the model over a calibration set and fit a sketch profile.
//!
//! The calibration set is small (hundreds to a few thousand images) and read once, so this is a
//! plain loop on one model instance that uses every core inside each call, rather than the
//! transform pipeline.

use std::path::PathBuf;

use ferry_backend::{BackendKind, LoadOptions, Tensor};
use futures::StreamExt;

use super::profile::{fit_profile, fit_stage, peaks, FitSettings, Peak, SketchProfile, PROFILE_FILE};
use crate::image::{ImageDecoder, ImagePlan};
use crate::model::ModelDir;
use crate::store::{get_bytes, list_inputs};

/// What to fit on and where the profile goes.
#[derive(Debug, Clone)]
pub struct FitConfig {
    /// A model directory; its `ferry.toml` must name the features output.
    pub model: PathBuf,
    /// Calibration images: a folder, `file://` or `s3://`.
    pub input: String,
    /// Where to write the profile; `<model>/sketch_profile.json` when absent.
    pub output: Option<PathBuf>,
    /// At most this many images, spread evenly over the sorted listing.
    pub limit: usize,
    /// Sketch parameters.
    pub settings: FitSettings,
    /// Model runtime.
    pub backend: BackendKind,
    /// Threads inside each model call.
    pub threads: usize,
    /// Records per model call.
    pub batch: usize,
    /// Retries of a failed store request.
    pub max_retries: usize,
}

/// What `fit` did.
#[derive(Debug)]
pub struct FitOutcome {
    /// Where the profile was written.
    pub path: PathBuf,
    /// The profile.
    pub profile: SketchProfile,
    /// Calibration objects that could not be read or decoded (skipped).
    pub skipped: Vec<(String, String)>,
}

/// Fits and writes a profile.
pub async fn run(cfg: FitConfig) -> Result<FitOutcome, String> {
    let dir = ModelDir::open(&cfg.model).map_err(|e| e.to_string())?;
    let features_name = dir.output.features.clone().ok_or_else(|| {
        format!(
            "{}: ferry.toml does not name a features output ([output] features = \"...\"); sketches need the model's pooled features",
            cfg.model.display()
        )
    })?;
    let out_path = match (&cfg.output, &dir.dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join(PROFILE_FILE),
        (None, None) => return Err("the model is a bare .onnx file: give --output for the profile".into()),
    };
    let options = LoadOptions {
        kind: cfg.backend,
        intra_op_threads: cfg.threads.max(1),
        onnxruntime_path: None,
        extra_outputs: std::iter::once(&features_name).chain(&cfg.settings.stages).cloned().collect(),
        instances: 1,
    };
    let model = ferry_backend::load(&dir.onnx, &options).map_err(|e| e.to_string())?;
    let info = model.info().clone();
    let names: Vec<String> = info.outputs.iter().map(|o| o.name.clone()).collect();
    let find = |name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("the model has no output {name:?} (it has {names:?})"))
    };
    let fi = find(&features_name)?;
    let scores_name = dir.output.name.clone().unwrap_or_else(|| names[0].clone());
    let si = find(&scores_name)?;
    let stage_idx: Vec<usize> = cfg.settings.stages.iter().map(|n| find(n)).collect::<Result<_, _>>()?;
    let peaks_at: Vec<usize> = (0..stage_idx.len()).map(|i| cfg.settings.peaks << i).collect();
    let plan = ImagePlan::for_model(&dir.input, &info, 178_956_970).map_err(|e| e.to_string())?;

    let (input, (mut keys, unlisted)) = list_inputs(&cfg.input, cfg.max_retries).await.map_err(|e| e.to_string())?;
    keys.sort();
    if keys.len() > cfg.limit {
        let n = keys.len();
        keys = (0..cfg.limit).map(|i| keys[i * n / cfg.limit].clone()).collect();
    }
    let store = input.store.clone();
    let fetched: Vec<(String, Result<bytes::Bytes, String>)> = futures::stream::iter(keys)
        .map(|key| {
            let store = store.clone();
            async move {
                let got = get_bytes(store.as_ref(), &key).await.map_err(|e| e.to_string());
                (key.to_string(), got)
            }
        })
        .buffered(16)
        .collect()
        .await;

    let fixed_batch = info.fixed_batch();
    let batch = fixed_batch.unwrap_or(cfg.batch.max(1));
    let labels = dir.labels.clone();
    let settings = cfg.settings.clone();
    let (profile, skipped) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let mut backend = model.instance().map_err(|e| e.to_string())?;
        let mut decoder = ImageDecoder::new(plan.clone());
        let mut skipped = Vec::new();
        let mut features = Vec::new();
        let mut stage_peaks: Vec<Vec<Peak>> = vec![Vec::new(); stage_idx.len()];
        let mut classes = 0;
        let mut input = Tensor { shape: Vec::new(), data: Vec::new() };
        let mut pending = 0;
        let mut tensor = Vec::new();
        let mut flush = |input: &mut Tensor, pending: &mut usize, features: &mut Vec<Vec<f32>>| -> Result<(), String> {
            if *pending == 0 {
                return Ok(());
            }
            input.shape = std::iter::once(*pending).chain(plan.item_shape()).collect();
            input.pad_rows(fixed_batch.unwrap_or(0));
            let out = backend.run(input).map_err(|e| e.to_string())?;
            for i in 0..*pending {
                features.push(out[fi].row(i).to_vec());
                for (s, &idx) in stage_idx.iter().enumerate() {
                    stage_peaks[s].extend(peaks(&out[idx].shape[1..], out[idx].row(i), peaks_at[s])?);
                }
            }
            classes = out[si].row_len();
            input.data.clear();
            *pending = 0;
            Ok(())
        };
        for (key, got) in fetched {
            match got
                .map_err(|e| format!("read failed: {e}"))
                .and_then(|b| decoder.decode(&b, &mut tensor).map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    input.data.extend_from_slice(&tensor);
                    pending += 1;
                    if pending == batch {
                        flush(&mut input, &mut pending, &mut features)?;
                    }
                }
                Err(reason) => skipped.push((key, reason)),
            }
        }
        flush(&mut input, &mut pending, &mut features)?;
        let labels = labels
            .filter(|l| l.len() == classes)
            .unwrap_or_else(|| (0..classes).map(|i| format!("class:{i}")).collect());
        let stages = settings
            .stages
            .iter()
            .enumerate()
            .map(|(i, output)| {
                fit_stage(
                    format!("s{}", i + 1),
                    output.clone(),
                    peaks_at[i],
                    &stage_peaks[i],
                    settings.codewords,
                    settings.seed,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let profile = fit_profile(&features, labels, &settings, features_name, scores_name, stages)?;
        Ok((profile, skipped))
    })
    .await
    .expect("fitting panicked")?;
    let body = serde_json::to_vec_pretty(&profile).expect("the profile serialises");
    crate::store::write_file(&out_path, &body, false).map_err(|e| format!("writing {}: {e}", out_path.display()))?;
    Ok(FitOutcome { path: out_path, profile, skipped: unlisted.into_iter().chain(skipped).collect() })
}
