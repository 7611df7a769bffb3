//! The recipes that turn one record's model outputs into an object graph, and their fitted
//! parameters.
//!
//! **classifier**: each record becomes a small object graph:
//!
//! ```text
//! image (attributes: whitened PCA of the pooled features)
//!  ├─ slot 0, weight 1: the top class (attributes: [score, PCA of the features])
//!  └─ slot 1, weight = probability: the next classes, in one bag slot
//! ```
//!
//! Modules are the image plus one per class, so "how many images showed an espresso" is a count
//! of module `espresso` in slot 0 of the sum of the job's sketches, and "which images look like
//! this one" is the cosine of two sketches, which weighs the image's own attributes and agreement
//! of the top class. The top class has weight 1 so that counts are counts of predictions; the
//! others are weighted by their probability, so they add to similarity and to aggregate
//! statistics without being individually decodable.
//!
//! **stages**: the backbone's stages are layers and their "visual words" are modules. Each stage
//! output (`C × H × W`) gives its strongest locations (activation = RMS over channels, 3×3
//! non-maximum suppression); a location's module is the nearest codeword of its channel vector
//! (spherical k-means on the calibration set) and its attributes are its position, its log
//! activation and a PCA of its channel vector. The image holds the deepest stage's peaks in
//! ordered slots (α = 1/√n); each peak holds the two strongest peaks of the next finer stage
//! within 1.5 of its cells (α = 1/√2), which makes a DAG when two parents share a child.

use ferry_sketch::learn::{project, project_each, Pca};
use ferry_sketch::{Dag, ModuleSpec, Params, Sampler, Sketcher};
use serde::{Deserialize, Serialize};

/// File name of a profile next to its model, and inside a sketch set's `_ferry/` folder.
pub const PROFILE_FILE: &str = "sketch_profile.json";

/// The profile format `ferry sketch fit` writes. Format 1 drew the matrices' normals through the
/// platform's libm ([`Sampler::Libm`]); its sets are still read and extended that way.
pub const FORMAT: u32 = 2;

/// Module id of the image (root) object.
pub const IMAGE_MODULE: u32 = 0;

/// A fitted sketch recipe: everything needed to write sketches for a model and to read them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SketchProfile {
    /// Profile format version.
    pub format: u32,
    /// The recipe: `classifier` or `stages`.
    pub recipe: String,
    /// Sketch dimension.
    pub d: usize,
    /// Seed of every sketch matrix.
    pub seed: u64,
    /// Presence constant.
    pub c: f32,
    /// Model output holding the pooled features.
    pub features_output: String,
    /// Model output holding class scores.
    pub scores_output: String,
    /// Classes attached to each image: the top one in slot 0, the rest in the bag slot.
    pub top_classes: usize,
    /// Attribute dimension of the image object.
    pub image_dim: usize,
    /// Attribute dimension of a class object: the score plus `class_dim - 1` feature components.
    pub class_dim: usize,
    /// Share of a class object's attribute vector given to the score (the rest to the features).
    pub score_scale: f32,
    /// PCA of the pooled features on the calibration set.
    pub pca_mean: Vec<f32>,
    /// Principal directions, largest first (at least `image_dim` of them).
    pub pca_components: Vec<Vec<f32>>,
    /// Variance along each direction.
    pub pca_variances: Vec<f32>,
    /// 99th percentile norm of the whitened image attributes on the calibration set.
    pub image_norm: f32,
    /// 99th percentile norm of the whitened class feature attributes on the calibration set.
    pub class_norm: f32,
    /// The stages recipe's stages, deepest (coarsest) first; empty for the classifier recipe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageProfile>,
    /// Module names: `image`, then one per class in output order (classifier) or one per stage
    /// codeword, `<stage>:cNN` (stages).
    pub modules: Vec<String>,
    /// Records the profile was fitted on.
    pub calibration_records: usize,
}

/// One backbone stage of the stages recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageProfile {
    /// Short name, the prefix of its module names (`s1`, `s2`, ...).
    pub name: String,
    /// The model tensor (`C × H × W` per record) this stage reads.
    pub output: String,
    /// Peaks taken per record.
    pub peaks: usize,
    /// Unit codewords of the peaks' channel vectors; one module each.
    pub codebook: Vec<Vec<f32>>,
    /// PCA of the peaks' channel vectors.
    pub pca_mean: Vec<f32>,
    /// Principal directions.
    pub pca_components: Vec<Vec<f32>>,
    /// Variance along each.
    pub pca_variances: Vec<f32>,
    /// 99th percentile of `ln(1 + activation)` on the calibration set.
    pub activation_norm: f32,
    /// 99th percentile norm of the raw attribute vector on the calibration set.
    pub attr_norm: f32,
}

/// Attribute dimension of a stage object: position (2), log activation (1), PCA (13).
pub const STAGE_DIM: usize = 16;

/// A strong location of a stage output.
#[derive(Debug, Clone, PartialEq)]
pub struct Peak {
    /// Cell centre, as a fraction of the height and width.
    pub y: f32,
    /// See `y`.
    pub x: f32,
    /// RMS of the channel vector.
    pub activation: f32,
    /// The channel vector.
    pub vector: Vec<f32>,
}

/// The strongest `n` locations of a `C × H × W` tensor after 3×3 non-maximum suppression,
/// strongest first (ties in raster order).
pub fn peaks(shape: &[usize], values: &[f32], n: usize) -> Result<Vec<Peak>, String> {
    let [c, h, w] = shape else {
        return Err(format!("a stage output must be C × H × W per record, got {shape:?}"));
    };
    let (c, h, w) = (*c, *h, *w);
    if c * h * w != values.len() || c == 0 {
        return Err(format!("stage output of shape {shape:?} holds {} values", values.len()));
    }
    let mut act = vec![0.0f32; h * w];
    for ch in 0..c {
        for (a, v) in act.iter_mut().zip(&values[ch * h * w..(ch + 1) * h * w]) {
            *a += v * v;
        }
    }
    act.iter_mut().for_each(|a| *a = (*a / c as f32).sqrt());
    // A cell survives unless a neighbour beats it: higher activation, or equal and earlier.
    let key = |i: usize| (act[i], std::cmp::Reverse(i));
    let mut kept = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let beaten = (y.saturating_sub(1)..=(y + 1).min(h - 1)).any(|ny| {
                (x.saturating_sub(1)..=(x + 1).min(w - 1)).any(|nx| {
                    let j = ny * w + nx;
                    j != i && key(j).partial_cmp(&key(i)) == Some(std::cmp::Ordering::Greater)
                })
            });
            if !beaten {
                kept.push(i);
            }
        }
    }
    kept.sort_by(|&a, &b| act[b].total_cmp(&act[a]).then(a.cmp(&b)));
    kept.truncate(n);
    // Channel by channel for all peaks at once: a channel's plane is read once, where a peak at
    // a time would touch a cache line per channel for each peak.
    // One allocation each: `vec![v; n]` would clone `v` without its capacity.
    let mut vectors: Vec<Vec<f32>> = kept.iter().map(|_| Vec::with_capacity(c)).collect();
    for plane in values.chunks_exact(h * w) {
        for (v, &i) in vectors.iter_mut().zip(&kept) {
            v.push(plane[i]);
        }
    }
    Ok(kept
        .into_iter()
        .zip(vectors)
        .map(|(i, vector)| Peak {
            y: ((i / w) as f32 + 0.5) / h as f32,
            x: ((i % w) as f32 + 0.5) / w as f32,
            activation: act[i],
            vector,
        })
        .collect())
}

impl StageProfile {
    /// The attribute vector of each peak before normalisation, reading the PCA components once
    /// for all.
    fn raw_attrs(&self, peaks: &[Peak]) -> Vec<Vec<f32>> {
        let vectors: Vec<&[f32]> = peaks.iter().map(|p| p.vector.as_slice()).collect();
        let z = project_each(&self.pca_mean, &self.pca_components, &self.pca_variances, &vectors, true);
        let scale = ((STAGE_DIM - 3) as f32).sqrt();
        peaks
            .iter()
            .zip(z)
            .map(|(p, z)| {
                let mut v = vec![p.y - 0.5, p.x - 0.5, (1.0 + p.activation).ln() / self.activation_norm.max(1e-6)];
                v.extend(z.into_iter().take(STAGE_DIM - 3).map(|z| z / scale));
                v.resize(STAGE_DIM, 0.0);
                v
            })
            .collect()
    }

    /// The codeword (module index within the stage) and attributes of each peak.
    pub fn objects(&self, peaks: &[Peak]) -> Vec<(usize, Vec<f32>)> {
        let vectors: Vec<&[f32]> = peaks.iter().map(|p| p.vector.as_slice()).collect();
        let codes = ferry_sketch::learn::nearest_each(&self.codebook, &vectors);
        codes.into_iter().zip(self.raw_attrs(peaks)).map(|(c, a)| (c, unit_ball(&a, self.attr_norm))).collect()
    }
}

impl SketchProfile {
    /// The sketcher these sketches are made and read with.
    pub fn sketcher(&self) -> Result<Sketcher, ferry_sketch::Error> {
        let sampler = if self.format == 1 { Sampler::Libm } else { Sampler::Portable };
        Sketcher::new(
            Params { d: self.d, c: self.c, seed: self.seed, sampler, ..Params::default() },
            &self.module_specs(),
        )
    }

    /// The shape of every module, in id order.
    pub fn module_specs(&self) -> Vec<ModuleSpec> {
        if self.stages.is_empty() {
            let mut specs = vec![ModuleSpec { attr_dim: self.image_dim, n_slots: 2 }];
            specs.extend((1..self.modules.len()).map(|_| ModuleSpec { attr_dim: self.class_dim, n_slots: 0 }));
            specs
        } else {
            let mut specs = vec![ModuleSpec { attr_dim: self.image_dim, n_slots: self.stages[0].peaks }];
            for (i, st) in self.stages.iter().enumerate() {
                let slots = if i + 1 < self.stages.len() { 2 } else { 0 };
                specs.extend(st.codebook.iter().map(|_| ModuleSpec { attr_dim: STAGE_DIM, n_slots: slots }));
            }
            specs
        }
    }

    /// Levels below the image that the recipe writes.
    pub fn depth(&self) -> usize {
        self.stages.len().max(1)
    }

    /// Every model output the recipe reads.
    pub fn outputs(&self) -> Vec<String> {
        let mut out = vec![self.features_output.clone()];
        if self.stages.is_empty() {
            out.push(self.scores_output.clone());
        }
        out.extend(self.stages.iter().map(|s| s.output.clone()));
        out
    }

    /// Module id of codeword `c` of stage `i`.
    fn stage_module(&self, i: usize, c: usize) -> u32 {
        (1 + self.stages[..i].iter().map(|s| s.codebook.len()).sum::<usize>() + c) as u32
    }

    /// The object graph of one record; `get` returns a named output's per-record shape and values.
    pub fn record_dag<'a>(&self, get: impl Fn(&str) -> Option<(&'a [usize], &'a [f32])>) -> Result<Dag, String> {
        let read = |name: &str| get(name).ok_or_else(|| format!("the model did not return output {name:?}"));
        let (_, features) = read(&self.features_output)?;
        if self.stages.is_empty() {
            let (_, scores) = read(&self.scores_output)?;
            return Ok(self.dag(features, scores));
        }
        let z = self.project(features);
        let mut dag = Dag::default();
        let root = dag.add(IMAGE_MODULE, unit_ball(&z[..self.image_dim], self.image_norm));
        dag.top.push((root, 1.0));
        // Nodes of the previous (coarser) stage, and its grid in cells.
        let mut above: Vec<(usize, Peak)> = Vec::new();
        let mut above_grid = (1.0f32, 1.0f32);
        for (i, st) in self.stages.iter().enumerate() {
            let (shape, values) = read(&st.output)?;
            if shape.first() != Some(&st.pca_mean.len()) {
                return Err(format!(
                    "output {:?} has shape {shape:?}; stage {:?} of the profile expects {} channels",
                    st.output,
                    st.name,
                    st.pca_mean.len()
                ));
            }
            let found = peaks(shape, values, st.peaks)?;
            let ids: Vec<usize> =
                st.objects(&found).into_iter().map(|(code, attr)| dag.add(self.stage_module(i, code), attr)).collect();
            if i == 0 {
                let alpha = 1.0 / (ids.len().max(1) as f32).sqrt();
                for (slot, &id) in ids.iter().enumerate() {
                    dag.link(root, slot, alpha, id);
                }
            } else {
                let (ph, pw) = above_grid;
                for (pid, parent) in &above {
                    // `found` is strongest first, so the first two near ones are the strongest.
                    let near = (0..found.len())
                        .filter(|&j| {
                            (found[j].y - parent.y).abs() <= 1.5 / ph && (found[j].x - parent.x).abs() <= 1.5 / pw
                        })
                        .take(2);
                    for (slot, j) in near.enumerate() {
                        dag.link(*pid, slot, std::f32::consts::FRAC_1_SQRT_2, ids[j]);
                    }
                }
            }
            above = ids.into_iter().zip(found).collect();
            above_grid = (shape[1] as f32, shape[2] as f32);
        }
        Ok(dag)
    }

    /// Parses a profile file and checks it.
    pub fn from_json(text: &[u8]) -> Result<SketchProfile, String> {
        let profile: SketchProfile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        profile.validate()?;
        Ok(profile)
    }

    /// Checks internal consistency (a hand-edited or truncated file).
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=FORMAT).contains(&self.format) || !matches!(self.recipe.as_str(), "classifier" | "stages") {
            return Err(format!("unsupported profile (format {}, recipe {:?})", self.format, self.recipe));
        }
        let width = self.pca_mean.len();
        let comps = self.image_dim.max(self.class_dim.saturating_sub(1));
        if self.image_dim == 0
            || self.class_dim < 2
            || self.pca_components.len() < comps
            || self.pca_variances.len() != self.pca_components.len()
            || self.pca_components.iter().any(|c| c.len() != width)
            || self.modules.len() < 2
            || self.top_classes == 0
            || !(0.0..1.0).contains(&self.score_scale)
            || (self.recipe == "stages") == self.stages.is_empty()
        {
            return Err("inconsistent sketch profile".into());
        }
        for st in &self.stages {
            let width = st.pca_mean.len();
            if st.codebook.is_empty()
                || st.peaks == 0
                || st.codebook.iter().chain(&st.pca_components).any(|v| v.len() != width)
                || st.pca_variances.len() != st.pca_components.len()
            {
                return Err(format!(
                    "inconsistent sketch profile: stage {:?} has vectors of different widths",
                    st.name
                ));
            }
        }
        let stage_modules: usize = self.stages.iter().map(|s| s.codebook.len()).sum();
        if !self.stages.is_empty() && self.modules.len() != 1 + stage_modules {
            return Err("inconsistent sketch profile: module names do not match the codebooks".into());
        }
        Ok(())
    }

    /// Whitened PCA coordinates of the features.
    pub fn project(&self, features: &[f32]) -> Vec<f32> {
        project(&self.pca_mean, &self.pca_components, &self.pca_variances, features, true)
    }

    /// The object graph of one record from its pooled features and class probabilities.
    pub fn dag(&self, features: &[f32], probabilities: &[f32]) -> Dag {
        let z = self.project(features);
        let mut dag = Dag::default();
        let root = dag.add(IMAGE_MODULE, unit_ball(&z[..self.image_dim], self.image_norm));
        dag.top.push((root, 1.0));
        let feat = unit_ball(&z[..self.class_dim - 1], self.class_norm);
        let f = (1.0 - self.score_scale * self.score_scale).sqrt();
        let classes = probabilities.len().min(self.modules.len() - 1);
        for (rank, &(class, p)) in top_k(&probabilities[..classes], self.top_classes).iter().enumerate() {
            let mut attr = Vec::with_capacity(self.class_dim);
            attr.push(self.score_scale * p.clamp(0.0, 1.0));
            attr.extend(feat.iter().map(|v| v * f));
            let id = dag.add(class as u32 + 1, attr);
            if rank == 0 {
                dag.link(root, 0, 1.0, id);
            } else {
                dag.link(root, 1, p.clamp(0.0, 1.0), id);
            }
        }
        dag
    }

    /// The score a class object's attributes carry.
    pub fn score_of(&self, attr: &[f32]) -> f32 {
        attr.first().map_or(0.0, |s| s / self.score_scale)
    }

    /// Module ids matching a name: a class label (every class of that name), `image`, or
    /// `class:N` for class index N.
    pub fn modules_named(&self, name: &str) -> Vec<u32> {
        if let Some(n) = name.strip_prefix("class:").and_then(|n| n.parse::<usize>().ok()) {
            return if n + 1 < self.modules.len() { vec![n as u32 + 1] } else { Vec::new() };
        }
        self.modules.iter().enumerate().filter(|(_, m)| m.as_str() == name).map(|(i, _)| i as u32).collect()
    }

    /// Up to `n` module names (the image excluded) that contain `name` ignoring case, quoted, for
    /// a query that named none exactly.
    pub fn modules_like(&self, name: &str, n: usize) -> Vec<String> {
        let want = name.to_lowercase();
        let mut like: Vec<&String> = self.modules.iter().skip(1).filter(|m| m.to_lowercase().contains(&want)).collect();
        // An exact match but for case first, then the shortest (the closest) names.
        like.sort_by_key(|m| (m.to_lowercase() != want, m.len()));
        like.into_iter().take(n).map(|m| format!("{m:?}")).collect()
    }
}

/// `v / scale`, clipped to the unit ball.
fn unit_ball(v: &[f32], scale: f32) -> Vec<f32> {
    let mut out: Vec<f32> = v.iter().map(|x| x / scale.max(1e-12)).collect();
    let n = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 1.0 {
        out.iter_mut().for_each(|x| *x /= n);
    }
    out
}

/// The `k` largest values with their indices, largest first (ties by lower index).
fn top_k(values: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = values.iter().copied().enumerate().filter(|(_, v)| v.is_finite()).collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx.truncate(k);
    idx
}

/// Fits a profile from calibration records: the PCA of the features and the attribute scales.
pub fn fit_profile(
    features: &[Vec<f32>],
    labels: Vec<String>,
    settings: &FitSettings,
    features_output: String,
    scores_output: String,
    stages: Vec<StageProfile>,
) -> Result<SketchProfile, String> {
    let comps = settings.image_dim.max(settings.class_dim - 1);
    if features.len() < comps + 1 {
        return Err(format!(
            "{} calibration records cannot fit {comps} components; give at least {}",
            features.len(),
            comps + 1
        ));
    }
    let pca = Pca::fit(features, comps).map_err(|e| e.to_string())?;
    let p99 = |dim: usize| {
        let mut norms: Vec<f32> =
            features.iter().map(|f| pca.project(f, true)[..dim].iter().map(|x| x * x).sum::<f32>().sqrt()).collect();
        norms.sort_by(f32::total_cmp);
        norms[((norms.len() - 1) as f64 * 0.99).round() as usize].max(1e-6)
    };
    let mut modules = vec!["image".to_string()];
    if stages.is_empty() {
        modules.extend(labels);
    } else {
        for st in &stages {
            modules.extend((0..st.codebook.len()).map(|c| format!("{}:c{c:02}", st.name)));
        }
    }
    Ok(SketchProfile {
        format: FORMAT,
        recipe: if stages.is_empty() { "classifier" } else { "stages" }.into(),
        stages,
        d: settings.d,
        seed: settings.seed,
        c: 1.0,
        features_output,
        scores_output,
        top_classes: settings.top_classes,
        image_dim: settings.image_dim,
        class_dim: settings.class_dim,
        score_scale: 0.7,
        image_norm: p99(settings.image_dim),
        class_norm: p99(settings.class_dim - 1),
        pca_mean: pca.mean,
        pca_components: pca.components,
        pca_variances: pca.variances,
        modules,
        calibration_records: features.len(),
    })
}

/// Fits one stage from the peaks of the calibration records: codebook, PCA and scales.
pub fn fit_stage(
    name: String,
    output: String,
    peaks_per_record: usize,
    found: &[Peak],
    codewords: usize,
    seed: u64,
) -> Result<StageProfile, String> {
    let vectors: Vec<Vec<f32>> = found.iter().map(|p| p.vector.clone()).collect();
    let comps = (STAGE_DIM - 3).min(vectors.first().map_or(0, Vec::len));
    if vectors.len() < comps.max(codewords) + 1 {
        return Err(format!(
            "stage {name}: {} peaks cannot fit {codewords} codewords; give more calibration images",
            vectors.len()
        ));
    }
    let codebook = ferry_sketch::learn::spherical_kmeans(&vectors, codewords, 20, seed).map_err(|e| e.to_string())?;
    let pca = Pca::fit(&vectors, comps).map_err(|e| e.to_string())?;
    let p99 = |mut v: Vec<f32>| {
        v.sort_by(f32::total_cmp);
        v[((v.len() - 1) as f64 * 0.99).round() as usize].max(1e-6)
    };
    let mut stage = StageProfile {
        name,
        output,
        peaks: peaks_per_record,
        codebook,
        pca_mean: pca.mean,
        pca_components: pca.components,
        pca_variances: pca.variances,
        activation_norm: p99(found.iter().map(|p| (1.0 + p.activation).ln()).collect()),
        attr_norm: 1.0,
    };
    stage.attr_norm = p99(stage.raw_attrs(found).iter().map(|a| a.iter().map(|v| v * v).sum::<f32>().sqrt()).collect());
    Ok(stage)
}

/// What `ferry sketch fit` chooses.
#[derive(Debug, Clone)]
pub struct FitSettings {
    /// Sketch dimension.
    pub d: usize,
    /// Matrix seed.
    pub seed: u64,
    /// Classes per image.
    pub top_classes: usize,
    /// Image attribute dimension.
    pub image_dim: usize,
    /// Class attribute dimension.
    pub class_dim: usize,
    /// Stage tensors for the stages recipe, deepest first; empty for the classifier recipe.
    pub stages: Vec<String>,
    /// Peaks of the deepest stage per record; each finer stage takes twice as many.
    pub peaks: usize,
    /// Codewords (modules) per stage.
    pub codewords: usize,
}

impl Default for FitSettings {
    fn default() -> Self {
        FitSettings {
            d: 1024,
            seed: 0x5eed_f322,
            top_classes: 3,
            image_dim: 16,
            class_dim: 8,
            stages: Vec::new(),
            peaks: 8,
            codewords: 64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_sketch::DecodeOptions;

    fn profile() -> SketchProfile {
        let features: Vec<Vec<f32>> = (0..64)
            .map(|i| (0..32).map(|j| ((i * 7 + j * 3) % 11) as f32 + (i as f32 * 0.1).sin()).collect())
            .collect();
        let labels = (0..10).map(|i| format!("c{i}")).collect();
        fit_profile(&features, labels, &FitSettings::default(), "f".into(), "s".into(), Vec::new()).unwrap()
    }

    #[test]
    fn a_name_that_is_not_a_module_gets_the_names_like_it() {
        let mut p = profile();
        p.modules = ["image", "tabby", "tiger cat", "Persian cat", "cat"].map(String::from).to_vec();
        assert_eq!(p.modules_like("CAT", 3), ["\"cat\"", "\"tiger cat\"", "\"Persian cat\""]);
        assert_eq!(p.modules_like("persian", 5), ["\"Persian cat\""]);
        assert!(p.modules_like("image", 5).is_empty(), "the image is not a class");
        assert!(p.modules_like("zebra", 5).is_empty());
    }

    #[test]
    fn a_record_decodes_to_its_image_and_top_class() {
        let p = profile();
        p.validate().unwrap();
        let sk = p.sketcher().unwrap();
        let features: Vec<f32> = (0..32).map(|j| (j % 5) as f32).collect();
        let mut probs = vec![0.01; 10];
        probs[7] = 0.8;
        probs[2] = 0.1;
        let s = sk.sketch(&p.dag(&features, &probs)).unwrap();
        let dec = sk.decode(&s, DecodeOptions { max_depth: 1, max_per_slot: 3, refine: false }).unwrap();
        assert_eq!(dec[0].module, IMAGE_MODULE);
        let top = dec.iter().find(|x| x.path == [0]).expect("the top class is found");
        assert_eq!(p.modules[top.module as usize], "c7");
        assert!((p.score_of(&top.attr) - 0.8).abs() < 0.1, "score {}", p.score_of(&top.attr));
        assert_eq!(p.modules_named("c7"), vec![8]);
        assert_eq!(p.modules_named("class:7"), vec![8]);
        assert!(p.modules_named("nope").is_empty());
    }

    #[test]
    fn a_profile_of_format_1_still_makes_its_sketches_with_libm_normals() {
        let mut p = profile();
        assert_eq!((p.format, p.sketcher().unwrap().params().sampler), (FORMAT, Sampler::Portable));
        let new_sketcher = p.sketcher().unwrap();
        let features: Vec<f32> = (0..32).map(|j| (j % 5) as f32).collect();
        let dag = p.dag(&features, &[0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let new = new_sketcher.sketch(&dag).unwrap();
        p.format = 1;
        p.validate().unwrap();
        let old = p.sketcher().unwrap();
        assert_eq!(old.params().sampler, Sampler::Libm);
        // Other matrices, the same object graph: other coordinates, the same decoded objects.
        let old_sketch = old.sketch(&dag).unwrap();
        let moved = old_sketch.data.iter().zip(&new.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(moved > 0.01, "{moved}");
        let opts = DecodeOptions { max_depth: 1, max_per_slot: 1, refine: false };
        let modules = |sk: &Sketcher, s| sk.decode(s, opts).unwrap().iter().map(|x| x.module).collect::<Vec<_>>();
        let (was, is) = (modules(&old, &old_sketch), modules(&new_sketcher, &new));
        assert_eq!((was.as_slice(), &is), ([IMAGE_MODULE, 1].as_slice(), &was), "image and its top class");
        p.format = FORMAT + 1;
        assert!(p.validate().unwrap_err().contains("unsupported profile (format 3"));
    }

    #[test]
    fn peaks_are_local_maxima_strongest_first() {
        // 1 channel, 4 × 5: two plateaus and a lone maximum.
        let v = [
            0.0, 9.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 5.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, 0.0, //
            7.0, 7.0, 0.0, 0.0, 1.0,
        ];
        let p = peaks(&[1, 4, 5], &v, 10).unwrap();
        let at: Vec<(f32, f32, f32)> = p.iter().map(|p| (p.y * 4.0 - 0.5, p.x * 5.0 - 0.5, p.activation)).collect();
        // The tie at (3,0)/(3,1) keeps the first in raster order.
        assert_eq!(at, [(0.0, 1.0, 9.0), (3.0, 0.0, 7.0), (1.0, 3.0, 5.0), (3.0, 4.0, 1.0)]);
        assert!(peaks(&[2, 2], &v, 1).is_err());
        assert!(peaks(&[2, 4, 5], &v, 1).is_err());
    }

    /// A stages profile over synthetic tensors: two stages of 4 channels, codewords the axes.
    fn stages_profile() -> SketchProfile {
        let mut p = profile();
        let axes: Vec<Vec<f32>> = (0..4).map(|i| (0..4).map(|j| if i == j { 1.0 } else { 0.0 }).collect()).collect();
        let stage = |name: &str, peaks: usize| StageProfile {
            name: name.into(),
            output: name.into(),
            peaks,
            codebook: axes.clone(),
            pca_mean: vec![0.0; 4],
            pca_components: axes.clone(),
            pca_variances: vec![1.0; 4],
            activation_norm: 3.0,
            attr_norm: 1.5,
        };
        p.recipe = "stages".into();
        p.d = 4096;
        p.stages = vec![stage("s1", 3), stage("s2", 6)];
        p.modules = std::iter::once("image".to_string())
            .chain(["s1", "s2"].iter().flat_map(|s| (0..4).map(move |c| format!("{s}:c{c:02}"))))
            .collect();
        p.validate().unwrap();
        p
    }

    /// `C × H × W` values with channel `c` set to `a` at each `(y, x, c, a)`.
    fn tensor(h: usize, w: usize, spots: &[(usize, usize, usize, f32)]) -> Vec<f32> {
        let mut v = vec![0.0; 4 * h * w];
        for &(y, x, c, a) in spots {
            v[c * h * w + y * w + x] = a;
        }
        v
    }

    #[test]
    fn the_stages_recipe_links_peaks_to_their_stronger_coarser_neighbours_and_decodes() {
        let p = stages_profile();
        let s1 = tensor(4, 4, &[(0, 0, 2, 8.0), (3, 3, 1, 6.0)]);
        // Finer grid: two spots near (0,0) of s1, one near (3,3), one far from both parents' reach.
        let s2 = tensor(8, 8, &[(0, 1, 0, 5.0), (2, 1, 3, 4.0), (7, 6, 2, 3.0), (0, 7, 1, 9.0)]);
        let features: Vec<f32> = (0..32).map(|j| (j % 5) as f32).collect();
        let (s1_shape, s2_shape, f_shape) = ([4usize, 4, 4], [4usize, 8, 8], [32usize]);
        let get = |name: &str| match name {
            "s1" => Some((&s1_shape[..], &s1[..])),
            "s2" => Some((&s2_shape[..], &s2[..])),
            "f" => Some((&f_shape[..], &features[..])),
            _ => None,
        };
        let dag = p.record_dag(get).unwrap();
        let name = |id: usize| p.modules[dag.nodes[id].module as usize].as_str();
        let root = &dag.nodes[dag.top[0].0];
        let kids: Vec<&str> = root.children.iter().map(|e| name(e.child)).collect();
        assert_eq!(kids, ["s1:c02", "s1:c01"], "s1 peaks, strongest first");
        let first = &dag.nodes[root.children[0].child];
        let grand: Vec<&str> = first.children.iter().map(|e| name(e.child)).collect();
        assert_eq!(grand, ["s2:c00", "s2:c03"], "the two s2 peaks within 1.5 cells of (0,0)");
        let second = &dag.nodes[root.children[1].child];
        assert_eq!(second.children.iter().map(|e| name(e.child)).collect::<Vec<_>>(), ["s2:c02"]);
        // The s2 peak at (0,7) is strongest but out of every parent's reach.
        let sk = p.sketcher().unwrap();
        let dec = sk
            .decode(&sk.sketch(&dag).unwrap(), DecodeOptions { max_depth: 2, max_per_slot: 1, refine: false })
            .unwrap();
        let at = |path: &[u16]| dec.iter().find(|x| x.path == path).map(|x| p.modules[x.module as usize].as_str());
        assert_eq!(at(&[]), Some("image"));
        assert_eq!(at(&[0]), Some("s1:c02"));
        assert_eq!(at(&[1]), Some("s1:c01"));
        assert!(p.record_dag(|n| if n == "s2" { None } else { get(n) }).unwrap_err().contains("s2"));
        // A stage output with other channels than the profile's codebook (another model).
        let wide = [5usize, 8, 8];
        let err = p.record_dag(|n| if n == "s2" { Some((&wide[..], &s2[..])) } else { get(n) }).unwrap_err();
        assert!(err.contains("\"s2\"") && err.contains("4 channels"), "{err}");
        let mut bad = p.clone();
        bad.stages[1].codebook[3].push(0.0);
        assert!(bad.validate().unwrap_err().contains("\"s2\""));
    }
}
