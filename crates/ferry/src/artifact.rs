//! Where `--model` points: a model directory or an `.onnx` file as they are, or an archive
//! (SageMaker's `model.tar.gz`) or a bucket location, which are first made into a local
//! directory that lives as long as the returned [`Artifact`].
//!
//! Everything after this reads a local path: ONNX Runtime and tract load files, and a model's
//! external data is found beside it. An archive is unpacked by the `tar` crate, which refuses
//! entries that would land outside the folder it unpacks into.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::store::{is_bucket_url, Location, StoreError};

/// Why a model location could not be made local.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The bucket location.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading from the bucket.
    #[error("fetching the model from {url}: {reason}")]
    Fetch {
        /// The location.
        url: String,
        /// Why.
        reason: String,
    },
    /// Writing or unpacking locally.
    #[error("{path}: {reason}")]
    Local {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The archive or folder holds no model, or several.
    #[error("{0}")]
    NoModel(String),
}

/// A model made local: `path` is a model directory or an `.onnx` file.
#[derive(Debug)]
pub struct Artifact {
    /// What to load.
    pub path: PathBuf,
    /// Whether `path` is a copy that goes away with this value (so nothing should be written
    /// next to it).
    pub temporary: bool,
    _dir: Option<tempfile::TempDir>,
}

/// Whether `name` is a gzipped tar archive.
fn is_archive(name: &str) -> bool {
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Makes `--model`'s value local: a path as it is, an archive unpacked, an `s3://` object or
/// prefix fetched (and unpacked when it is an archive).
pub async fn resolve(model: &str, max_retries: usize) -> Result<Artifact, ArtifactError> {
    if !is_bucket_url(model) {
        let path = PathBuf::from(model.strip_prefix("file://").unwrap_or(model));
        if !(path.is_file() && is_archive(model)) {
            return Ok(Artifact { path, temporary: false, _dir: None });
        }
        let dir = temp_dir()?;
        let file = std::fs::File::open(&path).map_err(|e| local(&path, e))?;
        unpack(file, &path, dir.path())?;
        return found(dir, model);
    }
    let fetch = |reason: String| ArtifactError::Fetch { url: model.to_string(), reason };
    let dir = temp_dir()?;
    let trimmed = model.trim_end_matches('/');
    let name = trimmed.rsplit_once('/').map_or(trimmed, |(_, name)| name);
    if is_archive(name) || name.ends_with(".onnx") {
        // One object, fetched into a file of the same name.
        let (location, key) = Location::open_object(trimmed, max_retries)?;
        let file = dir.path().join(name);
        download(&location, &key, &file).await.map_err(fetch)?;
        if name.ends_with(".onnx") {
            return Ok(Artifact { path: file, temporary: true, _dir: Some(dir) });
        }
        let unpacked = dir.path().join("model");
        let archive = std::fs::File::open(&file).map_err(|e| local(&file, e))?;
        unpack(archive, &file, &unpacked)?;
        std::fs::remove_file(&file).map_err(|e| local(&file, e))?;
        return found_in(dir, &unpacked, model);
    }
    // A prefix: every object under it, at its relative path.
    let location = Location::open(model, false, max_retries)?;
    let (keys, unlisted) = location.list().await.map_err(|e| fetch(e.to_string()))?;
    if let Some((name, reason)) = unlisted.first() {
        return Err(fetch(format!("{name}: {reason}")));
    }
    if keys.len() > MAX_MODEL_FILES {
        return Err(ArtifactError::NoModel(format!(
            "{model} holds {} objects, not a model directory's few (model.onnx, ferry.toml, labels.txt, ...)",
            keys.len()
        )));
    }
    for key in &keys {
        let parts = location.relative(key).unwrap_or_default();
        // `child` refuses parts that could climb out; the same rule keeps files inside `dir`.
        location.child(&parts, "").map_err(fetch)?;
        let file = parts.iter().fold(dir.path().to_path_buf(), |p, part| p.join(part));
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| local(parent, e))?;
        }
        download(&location, key, &file).await.map_err(|e| fetch(format!("{key}: {e}")))?;
    }
    found(dir, model)
}

/// The most objects a model prefix is fetched with: a model directory holds a few files, and a
/// prefix with many more is most likely a mistake (a bucket's root) that would be copied whole.
const MAX_MODEL_FILES: usize = 64;

fn temp_dir() -> Result<tempfile::TempDir, ArtifactError> {
    tempfile::Builder::new().prefix("ferry-model-").tempdir().map_err(|e| local(&std::env::temp_dir(), e))
}

fn local(path: &Path, e: impl std::fmt::Display) -> ArtifactError {
    ArtifactError::Local { path: path.to_owned(), reason: e.to_string() }
}

/// Streams one object into `file`.
async fn download(location: &Location, key: &object_store::path::Path, file: &Path) -> Result<(), String> {
    let mut stream = location.store.get(key).await.map_err(|e| e.to_string())?.into_stream();
    let mut out = std::fs::File::create(file).map_err(|e| format!("{}: {e}", file.display()))?;
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk.map_err(|e| e.to_string())?).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(())
}

/// Unpacks the gzipped tar `archive` (read from `path`) into `into`.
fn unpack(archive: impl std::io::Read, path: &Path, into: &Path) -> Result<(), ArtifactError> {
    std::fs::create_dir_all(into).map_err(|e| local(into, e))?;
    tar::Archive::new(flate2::read::GzDecoder::new(archive))
        .unpack(into)
        .map_err(|e| local(path, format!("not a gzipped tar archive, or a broken one: {e}")))
}

fn found(dir: tempfile::TempDir, what: &str) -> Result<Artifact, ArtifactError> {
    let root = dir.path().to_path_buf();
    found_in(dir, &root, what)
}

/// The model inside `root`: the folder holding `model.onnx` (at the top or one or two folders
/// down, as archives are often made of a folder), else a lone `.onnx` file at the top.
fn found_in(dir: tempfile::TempDir, root: &Path, what: &str) -> Result<Artifact, ArtifactError> {
    let mut holders: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .max_depth(3)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name() == "model.onnx")
        .filter_map(|e| e.path().parent().map(Path::to_path_buf))
        .collect();
    holders.sort();
    let path = match holders.as_slice() {
        [one] => one.clone(),
        [] => {
            let onnx: Vec<PathBuf> = std::fs::read_dir(root)
                .map_err(|e| local(root, e))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "onnx"))
                .collect();
            match onnx.as_slice() {
                [one] => one.clone(),
                _ => return Err(ArtifactError::NoModel(format!("{what} holds no model.onnx"))),
            }
        }
        several => {
            let names: Vec<String> =
                several.iter().map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string()).collect();
            return Err(ArtifactError::NoModel(format!("{what} holds several models, in {names:?}")));
        }
    };
    Ok(Artifact { path, temporary: true, _dir: Some(dir) })
}
