//! What decides the bytes of a job's outputs, kept beside them in `_ferry/job.json`.
//!
//! A rerun skips every object whose `.out` exists, which is what makes a killed job resumable.
//! It is also how a rerun after a change of model or settings (a fixed `ferry.toml`, another
//! `--top-k`) would silently keep the old outputs of every object the first run finished. So a
//! job records the model's files (by hash) and the settings that shape an `.out`, and a rerun
//! whose record differs refuses to mix the two unless told to write every object again.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file of a model directory that only sketches read; it does not change an `.out`.
const SKETCH_PROFILE: &str = "sketch_profile.json";

/// What produced a job's outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// xxHash64 (seed 0) of the model's files, each relative path and its bytes, in path order.
    pub model: String,
    /// `--top-k`.
    pub top_k: Option<usize>,
    /// `--on-error`.
    pub on_error: String,
    /// `--compression`.
    pub compression: String,
    /// Whether large JPEGs are decoded at a DCT scale (`--no-dct-scaling` turns it off).
    pub dct_scaling: bool,
}

impl Provenance {
    /// What differs between `self` (this job) and `then` (the job that wrote the outputs), in
    /// words; empty when nothing does.
    pub fn differences(&self, then: &Provenance) -> Vec<String> {
        let mut said = Vec::new();
        if self.model != then.model {
            said.push("the model's files differ".to_string());
        }
        let mut setting = |flag: &str, then: String, now: String| {
            if then != now {
                said.push(format!("{flag} was {then}, now {now}"));
            }
        };
        let k = |k: Option<usize>| k.map_or_else(|| "not given".to_string(), |k| k.to_string());
        setting("--top-k", k(then.top_k), k(self.top_k));
        setting("--on-error", then.on_error.clone(), self.on_error.clone());
        setting("--compression", then.compression.clone(), self.compression.clone());
        let dct = |on: bool| if on { "on" } else { "off (--no-dct-scaling)" }.to_string();
        setting("DCT scaling", dct(then.dct_scaling), dct(self.dct_scaling));
        said
    }
}

/// The hash of the model at `path`: an `.onnx` file, or every file under a model directory but
/// its sketch profile.
pub fn model_hash(path: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    if path.is_file() {
        files.push((String::new(), path.to_path_buf()));
    } else {
        for entry in walkdir::WalkDir::new(path).follow_links(true).sort_by_file_name() {
            let entry = entry.map_err(std::io::Error::other)?;
            let relative = entry.path().strip_prefix(path).unwrap_or(entry.path()).to_string_lossy().into_owned();
            if entry.file_type().is_file() && relative != SKETCH_PROFILE {
                files.push((relative, entry.path().to_path_buf()));
            }
        }
    }
    let mut hasher = twox_hash::XxHash64::with_seed(0);
    let mut buf = vec![0u8; 1 << 20];
    for (relative, file) in files {
        use std::hash::Hasher;
        hasher.write(relative.as_bytes());
        hasher.write_u8(0);
        let mut f = std::fs::File::open(&file)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.write(&buf[..n]);
        }
        hasher.write_u8(0);
    }
    Ok(format!("{:016x}", std::hash::Hasher::finish(&hasher)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(model: &str) -> Provenance {
        Provenance {
            model: model.into(),
            top_k: Some(5),
            on_error: "fail-object".into(),
            compression: "none".into(),
            dct_scaling: true,
        }
    }

    #[test]
    fn differences_are_named() {
        assert!(of("a").differences(&of("a")).is_empty());
        let now = Provenance { top_k: None, dct_scaling: false, ..of("b") };
        assert_eq!(
            now.differences(&of("a")),
            [
                "the model's files differ",
                "--top-k was 5, now not given",
                "DCT scaling was on, now off (--no-dct-scaling)"
            ]
        );
    }

    #[test]
    fn a_model_is_hashed_by_its_files_but_not_its_sketch_profile() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"weights").unwrap();
        std::fs::write(dir.path().join("ferry.toml"), b"[input]\nresize = 256\n").unwrap();
        let first = model_hash(dir.path()).unwrap();
        std::fs::write(dir.path().join(SKETCH_PROFILE), b"{}").unwrap();
        assert_eq!(model_hash(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join("ferry.toml"), b"[input]\nresize = 257\n").unwrap();
        assert_ne!(model_hash(dir.path()).unwrap(), first);
        // A file's bytes moving into its name is another model.
        std::fs::write(dir.path().join("ferry.toml"), b"[input]\nresize = 256\n").unwrap();
        std::fs::write(dir.path().join("labels.txt"), b"").unwrap();
        assert_ne!(model_hash(dir.path()).unwrap(), first);
        assert_ne!(model_hash(&dir.path().join("model.onnx")).unwrap(), first);
    }
}
