//! The classifier recipe and its fitted parameters.
//!
//! Each record becomes a small object graph:
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

use ferry_sketch::learn::Pca;
use ferry_sketch::{Dag, ModuleSpec, Params, Sketcher};
use serde::{Deserialize, Serialize};

/// File name of a profile next to its model, and inside a sketch set's `_ferry/` folder.
pub const PROFILE_FILE: &str = "sketch_profile.json";

/// Module id of the image (root) object.
pub const IMAGE_MODULE: u32 = 0;

/// A fitted sketch recipe: everything needed to write sketches for a model and to read them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SketchProfile {
    /// Profile format version.
    pub format: u32,
    /// The recipe; only `classifier` exists.
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
    /// Module names: `image`, then one per class in output order.
    pub modules: Vec<String>,
    /// Records the profile was fitted on.
    pub calibration_records: usize,
}

impl SketchProfile {
    /// The sketcher these sketches are made and read with.
    pub fn sketcher(&self) -> Result<Sketcher, ferry_sketch::Error> {
        let mut specs = vec![ModuleSpec { attr_dim: self.image_dim, n_slots: 2 }];
        specs.extend((1..self.modules.len()).map(|_| ModuleSpec { attr_dim: self.class_dim, n_slots: 0 }));
        Sketcher::new(Params { d: self.d, c: self.c, seed: self.seed, ..Params::default() }, &specs)
    }

    /// Checks internal consistency (a hand-edited or truncated file).
    pub fn validate(&self) -> Result<(), String> {
        if self.format != 1 || self.recipe != "classifier" {
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
        {
            return Err("inconsistent sketch profile".into());
        }
        Ok(())
    }

    fn pca(&self) -> Pca {
        Pca {
            mean: self.pca_mean.clone(),
            components: self.pca_components.clone(),
            variances: self.pca_variances.clone(),
        }
    }

    /// Whitened PCA coordinates of the features.
    pub fn project(&self, features: &[f32]) -> Vec<f32> {
        self.pca().project(features, true)
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
    modules.extend(labels);
    Ok(SketchProfile {
        format: 1,
        recipe: "classifier".into(),
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
}

impl Default for FitSettings {
    fn default() -> Self {
        FitSettings { d: 1024, seed: 0x5eed_f322, top_classes: 3, image_dim: 16, class_dim: 8 }
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
        fit_profile(&features, labels, &FitSettings::default(), "f".into(), "s".into()).unwrap()
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
}
