//! Where inputs come from and outputs go: a local folder or an S3-compatible bucket.
//!
//! Everything past this module sees an `Arc<dyn ObjectStore>` and a prefix, so the pipeline is the
//! same for a folder and a bucket, and tests can use object_store's in-memory store. S3 settings
//! come from the standard `AWS_*` variables; a plain-`http://` endpoint (a local S3-compatible
//! server) is allowed when `AWS_ENDPOINT_URL` names one.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};

/// Errors opening a location or mapping keys.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local input folder that does not exist.
    #[error("{0}: no such folder")]
    NoSuchFolder(PathBuf),
    /// A URL scheme ferry does not speak.
    #[error("{0}: unsupported location (use a local path, file://, or s3://bucket/prefix)")]
    Unsupported(String),
    /// The object store refused the configuration.
    #[error("{url}: {source}")]
    Config {
        /// The location.
        url: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A folder could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// An opened location: a store and the prefix inside it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix every key of this location starts with.
    pub prefix: Path,
    /// The location as the user wrote it.
    pub url: String,
}

/// The whole of one object.
pub async fn get_bytes(store: &dyn ObjectStore, key: &Path) -> object_store::Result<Bytes> {
    store.get(key).await?.bytes().await
}

impl Location {
    /// Opens `url`. With `create`, a local folder is created if missing (for outputs);
    /// `max_retries` bounds retries of a failed request to a remote store.
    pub fn open(url: &str, create: bool, max_retries: usize) -> Result<Self, StoreError> {
        if let Some(rest) = url.strip_prefix("s3://").or_else(|| url.strip_prefix("s3a://")) {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let retry = RetryConfig { max_retries, ..Default::default() };
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
            let endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT"));
            if endpoint.is_ok_and(|e| e.starts_with("http://")) {
                builder = builder.with_allow_http(true);
            }
            let store = builder.build().map_err(|source| StoreError::Config { url: url.to_string(), source })?;
            return Ok(Self { store: Arc::new(store), prefix: Path::from(prefix), url: url.to_string() });
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(StoreError::Unsupported(url.to_string()));
        }
        let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        if create {
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        } else if !dir.is_dir() {
            return Err(StoreError::NoSuchFolder(dir));
        }
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|source| StoreError::Config { url: url.to_string(), source })?;
        Ok(Self { store: Arc::new(store), prefix: Path::default(), url: url.to_string() })
    }

    /// Whether this is a local folder.
    pub fn is_local(&self) -> bool {
        !self.url.contains("://") || self.url.starts_with("file://")
    }

    /// `key` relative to this location's prefix, as its parts.
    pub fn relative(&self, key: &Path) -> Option<Vec<String>> {
        key.prefix_match(&self.prefix).map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
    }

    /// This location's key for relative `parts` plus `suffix` on the last part.
    ///
    /// Refuses parts that could climb out of the prefix on any store (`..`, `.`, empty, or with a
    /// path separator), so an input key can never make ferry write outside its output.
    pub fn child<S: AsRef<str>>(&self, parts: &[S], suffix: &str) -> Result<Path, String> {
        let Some((last, dirs)) = parts.split_last() else {
            return Err("empty key".into());
        };
        let mut key = self.prefix.clone();
        for part in dirs.iter().chain(std::iter::once(last)).map(AsRef::as_ref) {
            if part.is_empty() || part == "." || part == ".." || part.contains('/') || part.contains('\\') {
                return Err(format!("key part {part:?} is not allowed in an output key"));
            }
        }
        for part in dirs {
            key = key.join(part.as_ref());
        }
        Ok(key.join(format!("{}{suffix}", last.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(prefix: &str) -> Location {
        Location {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: Path::from(prefix),
            url: format!("mem://{prefix}"),
        }
    }

    #[test]
    fn output_keys_mirror_input_keys() {
        let input = loc("in/images");
        let output = loc("out");
        let key = Path::from("in/images/a/b.jpg");
        let parts = input.relative(&key).unwrap();
        assert_eq!(output.child(&parts, ".out").unwrap(), Path::from("out/a/b.jpg.out"));
        assert!(input.relative(&Path::from("elsewhere/b.jpg")).is_none());
    }

    #[test]
    fn keys_that_climb_out_are_refused() {
        let output = loc("out");
        for bad in [&["..", "etc", "passwd"][..], &["a", ".", "b"], &["", "x"], &["a\\..\\b"], &["a/b"]] {
            assert!(output.child(bad, ".out").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_input_folder_is_named() {
        let err = Location::open("/nonexistent/ferry-input", false, 0).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ferry-input"), "{err}");
        assert!(Location::open("gopher://x/y", false, 0).is_err());
    }
}
