//! Where inputs come from and outputs go: a local folder or an S3-compatible bucket.
//!
//! Everything past this module sees an `Arc<dyn ObjectStore>` and a prefix, so the pipeline is the
//! same for a folder and a bucket, and tests can use object_store's in-memory store. S3 settings
//! come from the standard `AWS_*` variables; a plain-`http://` endpoint (a local S3-compatible
//! server) is allowed when `AWS_ENDPOINT_URL` names one.
//!
//! A folder is listed by walking it rather than through object_store, whose listing stops at the
//! first file whose name is not a valid key (a control character, bytes that are not UTF-8): one
//! such file would hide every file after it. Here it is reported by name and the walk goes on.
//!
//! Writes are the other place a folder differs. An S3 object appears whole or not at all; a file
//! exists while it is written. object_store stages local writes in `<name>#<n>`, which it hides
//! from its own listings but which other readers (pyarrow, Spark, a shell glob) take for data,
//! and which a killed job leaves behind for good. So a file is written unnamed (`O_TMPFILE`) in
//! its folder, which a kill leaves nothing of, and given a hidden name of its own
//! (`.<name>.<pid>-<n>.ferry-partial`) only to be renamed over the target: two writers of one
//! file at once never expose each other's half. Where unnamed files are not supported, the
//! hidden file is `.<name>.ferry-partial` throughout; other tools skip dot-files, and a rerun that
//! redoes the object overwrites and renames the same file.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::io::AsyncWriteExt;

/// Errors opening a location or mapping keys.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local input folder that does not exist.
    #[error("{0}: no such folder")]
    NoSuchFolder(PathBuf),
    /// A local location that is a file: inputs and outputs are folders.
    #[error("{0}: a file, not a folder (give the folder that holds the inputs or outputs)")]
    NotAFolder(PathBuf),
    /// A URL scheme ferry does not speak.
    #[error("{0}: unsupported location (use a local path, file://, or s3://bucket/prefix)")]
    Unsupported(String),
    /// The AWS profile named, or its files, could not be used.
    #[error("{0}")]
    Profile(String),
    /// A URL that should name one object and does not.
    #[error("{url}: not an object ({reason})")]
    BadKey {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A bucket prefix that is not a key (an empty part, a control character).
    #[error("{url}: the prefix is not a valid key ({reason})")]
    BadPrefix {
        /// The location.
        url: String,
        /// Why.
        reason: String,
    },
    /// An endpoint that is not an `http://` or `https://` URL, which the store would only find out
    /// when it signs its first request.
    #[error("{from} {value:?} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:9000)")]
    BadEndpoint {
        /// Where it was given: a variable, or the profile's `endpoint_url`.
        from: String,
        /// What was given.
        value: String,
    },
    /// A credential that cannot be sent as it is.
    #[error("{0}")]
    BadCredential(String),
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

/// Why a location's keys could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The location could not be opened.
    #[error(transparent)]
    Open(#[from] StoreError),
    /// A local file's name that cannot be a key.
    #[error("{url}: {reason}")]
    BadName {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The store could not list it.
    #[error("listing {url}: {source}{hint}")]
    List {
        /// The location.
        url: String,
        /// The store's error.
        source: object_store::Error,
        /// What the error means or what may be missing ([`Location::hint`]).
        hint: String,
    },
}

/// The inputs `url` names, as `--input` reads it, with the location they are relative to:
/// every key under a folder or bucket prefix; one local file; or, for a bucket prefix under
/// which no folder holds anything, every key that begins with it (S3's own reading of a prefix,
/// and SageMaker's `S3Prefix`), relative to its folder part. Keys that cannot be named come back
/// as `(name, reason)`.
pub async fn list_inputs(url: &str, max_retries: usize) -> Result<(Location, Keys), ListError> {
    if let Some((folder, name)) = local_file(url) {
        let input = Location::open(&folder, false, max_retries)?;
        let key = input.child(&[name], "").map_err(|reason| ListError::BadName { url: url.into(), reason })?;
        return Ok((input, (vec![key], Vec::new())));
    }
    let input = Location::open(url, false, max_retries)?;
    let (keys, unnamed) = input.list().await?;
    if !keys.is_empty() || !unnamed.is_empty() {
        return Ok((input, (keys, unnamed)));
    }
    match input.list_key_name_prefix().await.map_err(|e| input.list_error(e))? {
        Some((folder, (keys, unnamed))) if !keys.is_empty() || !unnamed.is_empty() => Ok((folder, (keys, unnamed))),
        _ => Ok((input, (keys, unnamed))),
    }
}

/// Listed keys, and the names of what could not be listed with the reason.
pub type Keys = (Vec<Path>, Vec<(String, String)>);

/// An opened location: a store and the prefix inside it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix every key of this location starts with.
    pub prefix: Path,
    /// The location as the user wrote it.
    pub url: String,
    /// The same store when it is a local folder, for listing it by walking it and for writes
    /// that go through a hidden file.
    pub local: Option<Folder>,
    /// A bucket's own listing, for keys the store cannot name.
    bucket: Option<crate::s3list::Lister>,
}

/// A local folder's store and the folder it is rooted at.
#[derive(Debug, Clone)]
pub struct Folder {
    /// The store.
    pub fs: Arc<LocalFileSystem>,
    /// The folder.
    pub root: PathBuf,
    /// Whether each file's data reaches the disk before it is renamed into place.
    pub fsync: bool,
}

/// What the AWS CLI's shared files (`~/.aws/credentials`, `~/.aws/config`) give the profile
/// `AWS_PROFILE` names (`default` when unset), for what the `AWS_*` variables leave out: how a
/// laptop or a workstation is usually set up. Keys in the credentials file win over the config
/// file's, as in the CLI. Profiles that get credentials by running something (SSO, a role,
/// `credential_process`) are refused with the command that exports them.
#[derive(Debug, Default, PartialEq)]
struct SharedProfile {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
}

impl SharedProfile {
    /// The profile from the files the environment points at, or `None` when the variables
    /// already hold credentials or no file has the profile (unless `AWS_PROFILE` named it). Read
    /// once per process: a job opens several locations, and its errors ask again.
    fn from_env() -> Result<Option<&'static Self>, String> {
        static PROFILE: std::sync::OnceLock<Result<Option<SharedProfile>, String>> = std::sync::OnceLock::new();
        PROFILE.get_or_init(Self::read_env).as_ref().map(Option::as_ref).map_err(Clone::clone)
    }

    fn read_env() -> Result<Option<Self>, String> {
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
            return Ok(None);
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        let file =
            |var: &str, name: &str| std::env::var_os(var).map_or_else(|| home.join(".aws").join(name), PathBuf::from);
        let named = std::env::var("AWS_PROFILE").or_else(|_| std::env::var("AWS_DEFAULT_PROFILE")).ok();
        let name = named.clone().unwrap_or_else(|| "default".into());
        let profile =
            Self::read(&file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), &file("AWS_CONFIG_FILE", "config"), &name)?;
        match profile {
            None if named.is_some() => Err(format!(
                "AWS_PROFILE={name}, but neither {} nor {} has that profile",
                file("AWS_SHARED_CREDENTIALS_FILE", "credentials").display(),
                file("AWS_CONFIG_FILE", "config").display()
            )),
            other => Ok(other),
        }
    }

    /// Profile `name` from a credentials file and a config file (`[name]` in the first,
    /// `[profile name]` in the second except for `default`); `None` if neither has it.
    fn read(credentials: &std::path::Path, config: &std::path::Path, name: &str) -> Result<Option<Self>, String> {
        let load = |path: &std::path::Path| -> Result<Option<ini::Ini>, String> {
            if !path.is_file() {
                return Ok(None);
            }
            // Secrets are taken as written: no quotes or escapes.
            let opt = ini::ParseOption { enabled_quote: false, enabled_escape: false, ..Default::default() };
            ini::Ini::load_from_file_opt(path, opt).map(Some).map_err(|e| format!("{}: {e}", path.display()))
        };
        let (creds, conf) = (load(credentials)?, load(config)?);
        let in_config = if name == "default" { name.to_string() } else { format!("profile {name}") };
        let sections = [
            creds.as_ref().and_then(|i| i.section(Some(name))),
            conf.as_ref().and_then(|i| i.section(Some(in_config.as_str()))),
        ];
        if sections.iter().all(Option::is_none) {
            return Ok(None);
        }
        let get = |key: &str| sections.iter().flatten().find_map(|s| s.get(key)).map(str::to_string);
        let profile = Self {
            access_key_id: get("aws_access_key_id"),
            secret_access_key: get("aws_secret_access_key"),
            session_token: get("aws_session_token"),
            region: get("region"),
            endpoint_url: get("endpoint_url"),
        };
        if profile.access_key_id.is_none() {
            let how = ["sso_session", "sso_start_url", "role_arn", "credential_process", "web_identity_token_file"]
                .into_iter()
                .find(|k| get(k).is_some());
            if let Some(how) = how {
                return Err(format!(
                    "AWS profile {name} gets its credentials through {how}, which ferry does not run; export them \
                     first: eval \"$(aws configure export-credentials --profile {name} --format env)\""
                ));
            }
        }
        Ok(Some(profile))
    }

    /// `builder` with what the variables left unset.
    fn apply(&self, mut builder: AmazonS3Builder) -> AmazonS3Builder {
        use object_store::aws::AmazonS3ConfigKey as Key;
        for (key, value) in [
            (Key::AccessKeyId, &self.access_key_id),
            (Key::SecretAccessKey, &self.secret_access_key),
            (Key::Token, &self.session_token),
            (Key::Region, &self.region),
            (Key::Endpoint, &self.endpoint_url),
        ] {
            if let Some(v) = value.as_ref().filter(|_| builder.get_config_value(&key).is_none()) {
                builder = builder.with_config(key, v);
            }
        }
        builder
    }
}

/// The suffix of the hidden file a local write goes through.
pub const PARTIAL_SUFFIX: &str = ".ferry-partial";

/// The folder under an output or a sketch set that holds what ferry writes of the job itself (the
/// report, the job record, a set's profile), never taken for an input.
pub const JOB_DIR: &str = "_ferry";

/// Whether `name` is the hidden file of an unfinished local write.
pub fn is_partial(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)
}

/// The whole of one object.
pub async fn get_bytes(store: &dyn ObjectStore, key: &Path) -> object_store::Result<Bytes> {
    store.get(key).await?.bytes().await
}

/// Why [`get_bytes_within`] returned no bytes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    /// The store failed: a rerun may succeed.
    #[error("read failed: {0}")]
    Read(String),
    /// The object is larger than the limit: it is what it is.
    #[error("object is {size} bytes, over the payload limit of {} MiB (--max-payload-mb)", limit >> 20)]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

/// The whole of one object if it holds at most `limit` bytes; a larger one is refused from the
/// size its response declares, before its body is read.
pub async fn get_bytes_within(store: &dyn ObjectStore, key: &Path, limit: u64) -> Result<Bytes, FetchError> {
    let got = store.get(key).await.map_err(|e| FetchError::Read(e.to_string()))?;
    let size = got.meta.size;
    if size > limit {
        return Err(FetchError::TooLarge { size, limit });
    }
    got.bytes().await.map_err(|e| FetchError::Read(e.to_string()))
}

/// Whether an endpoint URL is plain `http://` (a local S3-compatible server), or why it is not a
/// URL at all: `localhost:9000` parses as a URL of scheme `localhost`.
fn plain_http(from: String, value: String) -> Result<bool, StoreError> {
    match url::Url::parse(&value) {
        Ok(u) if u.has_host() && matches!(u.scheme(), "http" | "https") => Ok(u.scheme() == "http"),
        _ => Err(StoreError::BadEndpoint { from, value }),
    }
}

/// Refuses a value bound for a request header that holds a control character.
fn header_safe(from: &str, value: &str) -> Result<(), StoreError> {
    match value.bytes().position(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        None => Ok(()),
        Some(at) => Err(StoreError::BadCredential(format!(
            "{from} holds a line break or other control character (byte {at} of {}): give it without",
            value.len()
        ))),
    }
}

/// The whole of the one object `url` names (a file, or an `s3://` object), if it holds at most
/// `limit` bytes.
pub async fn read_object(url: &str, max_retries: usize, limit: u64) -> Result<Bytes, String> {
    let (location, key) = Location::open_object(url, max_retries).map_err(|e| e.to_string())?;
    get_bytes_within(location.store.as_ref(), &key, limit).await.map_err(|e| match e {
        FetchError::Read(reason) => format!("{reason}{}", location.hint(&reason)),
        FetchError::TooLarge { size, limit } => format!("{size} bytes, over the limit of {limit}"),
    })
}

/// The folder and name of the local file `url` names, for a job whose input is one file; `None`
/// for a folder, a bucket, or a path that does not exist.
fn local_file(url: &str) -> Option<(String, String)> {
    if url.contains("://") && !url.starts_with("file://") {
        return None;
    }
    let path = std::path::Path::new(url.strip_prefix("file://").unwrap_or(url));
    if !path.is_file() {
        return None;
    }
    let name = path.file_name()?.to_str()?.to_string();
    let folder = path.parent().map(|p| p.to_string_lossy().into_owned()).filter(|p| !p.is_empty());
    Some((folder.unwrap_or_else(|| ".".into()), name))
}

/// Whether `url` names a bucket's objects rather than a local path.
pub fn is_bucket_url(url: &str) -> bool {
    url.starts_with("s3://") || url.starts_with("s3a://")
}

impl Location {
    /// The location holding the one object `url` names (`s3://bucket/models/m.onnx`, or a file),
    /// and the object's key there.
    pub fn open_object(url: &str, max_retries: usize) -> Result<(Self, Path), StoreError> {
        let bad = |reason: &str| StoreError::BadKey { url: url.to_string(), reason: reason.to_string() };
        let (parent, name) = url.rsplit_once('/').unwrap_or((".", url));
        if name.is_empty() || parent.ends_with(':') || parent.ends_with(":/") {
            return Err(bad("it names a prefix, not an object"));
        }
        let location = Self::open(&format!("{parent}/"), false, max_retries)?;
        let key = location.child(&[name], "").map_err(|e| bad(&e))?;
        Ok((location, key))
    }

    /// Opens `url`. With `create`, a local folder is created if missing (for outputs);
    /// `max_retries` bounds retries of a failed request to a remote store.
    pub fn open(url: &str, create: bool, max_retries: usize) -> Result<Self, StoreError> {
        if let Some(rest) = url.strip_prefix("s3://").or_else(|| url.strip_prefix("s3a://")) {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let retry = RetryConfig { max_retries, ..Default::default() };
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
            let var = |name: &str| std::env::var(name).ok().map(|v| (name.to_string(), v));
            let mut endpoint = var("AWS_ENDPOINT_URL").or_else(|| var("AWS_ENDPOINT"));
            if let Some(profile) = SharedProfile::from_env().map_err(StoreError::Profile)? {
                builder = profile.apply(builder);
                let named = || profile.endpoint_url.clone().map(|v| ("the profile's endpoint_url".to_string(), v));
                endpoint = endpoint.or_else(named);
            }
            let mut http = false;
            if let Some((from, value)) = endpoint {
                http = plain_http(from, value)?;
                builder = builder.with_allow_http(http);
            }
            // The token is sent as a header as it is; a line break in it made the store panic
            // while signing the first request.
            if let Some(token) = builder.get_config_value(&object_store::aws::AmazonS3ConfigKey::Token) {
                let from = ["AWS_SESSION_TOKEN", "AWS_TOKEN"].into_iter().find(|v| std::env::var_os(v).is_some());
                header_safe(from.unwrap_or("the profile's aws_session_token"), &token)?;
            }
            let store = Arc::new(
                builder.clone().build().map_err(|source| StoreError::Config { url: url.to_string(), source })?,
            );
            // As written: `s3://b/été/` lists `été/…`, not a percent-encoded prefix.
            let prefix = Path::parse(prefix)
                .map_err(|e| StoreError::BadPrefix { url: url.to_string(), reason: e.to_string() })?;
            let lister = crate::s3list::Lister::new(&builder, store.clone(), http);
            return Ok(Self { store, prefix, url: url.to_string(), local: None, bucket: Some(lister) });
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(StoreError::Unsupported(url.to_string()));
        }
        let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::NotAFolder(dir));
        }
        if create {
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.clone(), source })?;
        } else if !dir.is_dir() {
            return Err(StoreError::NoSuchFolder(dir));
        }
        let store = Arc::new(
            LocalFileSystem::new_with_prefix(&dir)
                .map_err(|source| StoreError::Config { url: url.to_string(), source })?,
        );
        let local = Some(Folder { fs: store.clone(), root: dir, fsync: false });
        Ok(Self { store, prefix: Path::default(), url: url.to_string(), local, bucket: None })
    }

    /// With `on`, a folder's writes reach the disk before they are renamed into place, so that
    /// after a power loss a file that exists is complete (ext4 and others may otherwise show it
    /// empty). A bucket's objects are durable when their upload returns; nothing changes there.
    pub fn with_fsync(mut self, on: bool) -> Self {
        if let Some(local) = &mut self.local {
            local.fsync = on;
        }
        self
    }

    /// Writes `body` to `key` so that no reader sees part of it, whatever stops the writer: a
    /// folder through a hidden file renamed into place, a store with a single upload, or a
    /// multipart one of `part_size` parts when the body is larger.
    pub async fn write(&self, key: &Path, body: Vec<u8>, part_size: usize) -> Result<(), String> {
        if let Some(local) = &self.local {
            let target = local.fs.path_to_filesystem(key).map_err(|e| e.to_string())?;
            let fsync = local.fsync;
            return tokio::task::spawn_blocking(move || write_file(&target, &body, fsync))
                .await
                .map_err(|e| format!("the write panicked: {e}"))?
                .map_err(|e| format!("write failed: {e}"));
        }
        let mut attributes = Attributes::new();
        if let Some(mime) = content_type(key) {
            attributes.insert(Attribute::ContentType, mime.into());
        }
        if body.len() <= part_size {
            let put = self.store.put_opts(key, body.into(), attributes.into());
            return put.await.map(|_| ()).map_err(|e| format!("write failed: {e}"));
        }
        let mut writer =
            BufWriter::with_capacity(self.store.clone(), key.clone(), part_size).with_attributes(attributes);
        match writer.write_all(&body).await {
            Ok(()) => writer.shutdown().await.map_err(|e| format!("write failed: {e}")),
            Err(e) => {
                let _ = writer.abort().await;
                Err(format!("write failed: {e}"))
            }
        }
    }

    /// [`Location::write`] with a single upload whatever the size, for small objects.
    pub async fn write_whole(&self, key: &Path, body: Vec<u8>) -> Result<(), String> {
        self.write(key, body, usize::MAX).await
    }

    /// [`Location::list_keys`], its error saying where and what it means.
    pub async fn list(&self) -> Result<Keys, ListError> {
        self.list_keys().await.map_err(|e| self.list_error(e))
    }

    fn list_error(&self, source: object_store::Error) -> ListError {
        ListError::List { url: self.url.clone(), hint: self.hint(&source.to_string()), source }
    }

    /// Every key under this location, and what could not be listed as `(name, reason)`: files of
    /// a folder whose names are not keys, or that could not be read. A store that cannot list is
    /// an error.
    async fn list_keys(&self) -> Result<Keys, object_store::Error> {
        let Some(local) = &self.local else {
            let (metas, unnamed) = match self.store.list(Some(&self.prefix)).try_collect::<Vec<_>>().await {
                Ok(metas) => (metas, Vec::new()),
                Err(object_store::Error::InvalidPath { source }) if self.bucket.is_some() => {
                    tracing::info!(url = %self.url, "listing again to find keys ferry cannot name ({source})");
                    self.list_every_key().await?
                }
                Err(e) => return Err(e),
            };
            return Ok((self.without_markers(metas).await, unnamed));
        };
        // A folder's store is rooted at the folder, so its keys are paths relative to it.
        let root = local.root.clone();
        Ok(tokio::task::spawn_blocking(move || walk(&root)).await.expect("listing a folder panicked"))
    }

    /// The keys of `metas` less folder markers. The consoles' "create folder" leaves a zero-byte
    /// object whose key ends in `/`, listed without the slash (a `Path` has none), so reading it by
    /// that name finds nothing. A zero-byte entry that a HEAD does not find is such a marker, not
    /// an input; a real empty object is kept, and fails as one.
    async fn without_markers(&self, metas: Vec<object_store::ObjectMeta>) -> Vec<Path> {
        let markers: HashSet<Path> = futures::stream::iter(metas.iter().filter(|m| m.size == 0))
            .map(|m| async move {
                match self.store.head(&m.location).await {
                    Err(object_store::Error::NotFound { .. }) => Some(m.location.clone()),
                    _ => None,
                }
            })
            .buffer_unordered(16)
            .filter_map(std::future::ready)
            .collect()
            .await;
        if !markers.is_empty() {
            tracing::info!(count = markers.len(), url = %self.url, "skipping folder markers (keys ending in /)");
        }
        metas.into_iter().map(|m| m.location).filter(|k| !markers.contains(k)).collect()
    }

    /// Every object under a bucket's prefix, through [`crate::s3list`]: those a `Path` can name,
    /// and the others as `(key, reason)`, for the job to report as failed.
    async fn list_every_key(
        &self,
    ) -> Result<(Vec<object_store::ObjectMeta>, Vec<(String, String)>), object_store::Error> {
        let prefix = match self.prefix.as_ref() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        self.list_raw(&prefix).await
    }

    /// S3's own reading of a prefix, which SageMaker's `S3Prefix` follows, for a bucket prefix
    /// that names no folder: `s3://b/images/ca` selects `images/cat.jpg` and `images/cars/1.jpg`,
    /// and one object's key selects that object. Returns the location of the prefix's folder
    /// part, which the keys are relative to, every key that begins with the prefix, and those a
    /// `Path` cannot name as `(key, reason)`. `None` for a local folder or a URL ending in `/`.
    async fn list_key_name_prefix(&self) -> Result<Option<(Location, Keys)>, object_store::Error> {
        if self.bucket.is_none() || self.url.ends_with('/') || self.prefix.as_ref().is_empty() {
            return Ok(None);
        }
        let prefix = self.prefix.as_ref();
        let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let folder = Location {
            prefix: Path::parse(dir).expect("the folder part of a valid prefix is valid"),
            url: self.url[..=self.url.rfind('/').expect("s3://bucket/prefix")].to_string(),
            ..self.clone()
        };
        let lister = self.bucket.as_ref().expect("a bucket");
        let (metas, unnamed) = match lister.list_paginated(prefix).await {
            Ok(metas) => (metas, Vec::new()),
            Err(object_store::Error::InvalidPath { .. }) => self.list_raw(prefix).await?,
            Err(e) => return Err(e),
        };
        Ok(Some((folder, (self.without_markers(metas).await, unnamed))))
    }

    /// Every key of a bucket that begins with `prefix`, a string rather than a `Path`.
    async fn list_raw(
        &self,
        prefix: &str,
    ) -> Result<(Vec<object_store::ObjectMeta>, Vec<(String, String)>), object_store::Error> {
        let lister = self.bucket.as_ref().expect("a bucket");
        let listed =
            lister.list(prefix).await.map_err(|e| object_store::Error::Generic { store: "S3", source: e.into() })?;
        let (mut metas, mut unnamed) = (Vec::new(), Vec::new());
        for (key, size) in listed {
            // A folder marker's key ends in `/`; parsing drops the slash, as object_store's listing does.
            match Path::parse(key.strip_suffix('/').unwrap_or(&key)) {
                Ok(location) => metas.push(object_store::ObjectMeta {
                    location,
                    last_modified: Default::default(),
                    size,
                    e_tag: None,
                    version: None,
                }),
                Err(_) if !(size == 0 && key.ends_with('/')) => {
                    let what = match key.chars().find(|c| c.is_control()) {
                        Some(c) => format!("a control character ({})", c.escape_debug()),
                        None => "an empty part (`//`, or a leading `/`)".into(),
                    };
                    let reason = format!(
                        "its key has {what}, which ferry's store library cannot name; copy the object to a key without it"
                    );
                    unnamed.push((key, reason))
                }
                Err(_) => {}
            }
        }
        Ok((metas, unnamed))
    }

    /// Whether this is a local folder.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// What to add to `error`, an error from this store: what an S3 error code in it means, and
    /// that no credentials are set ([`Location::credentials_hint`]). Empty for a folder.
    pub fn hint(&self, error: &str) -> String {
        if self.is_local() {
            return String::new();
        }
        let meaning = s3_error_code(error).and_then(|code| explain_s3_error(code, self));
        format!("{}{}", meaning.map(|m| format!(" ({m})")).unwrap_or_default(), self.credentials_hint())
    }

    /// What to add to an error from this store when the environment holds no credentials: the
    /// AWS client then asks the instance metadata service, and its error names that, not the
    /// missing variables. Empty otherwise.
    fn credentials_hint(&self) -> &'static str {
        const SOURCES: [&str; 5] = [
            "AWS_ACCESS_KEY_ID",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_SKIP_SIGNATURE",
        ];
        let profile = || SharedProfile::from_env().ok().flatten().is_some_and(|p| p.access_key_id.is_some());
        if self.is_local() || SOURCES.iter().any(|v| std::env::var_os(v).is_some()) || profile() {
            return "";
        }
        " (no AWS credentials are set: give AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile in \
         ~/.aws/credentials, a web identity token, or AWS_SKIP_SIGNATURE=true for a public bucket; without them \
         the instance metadata service is asked)"
    }

    /// `key` relative to this location's prefix, as its parts.
    pub fn relative(&self, key: &Path) -> Option<Vec<String>> {
        key.prefix_match(&self.prefix).map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
    }

    /// This location's key for relative `parts` plus `suffix` on the last part.
    ///
    /// Parts are taken as they are, as a listing gives them: `été #1.jpg` gives `été #1.jpg.out`,
    /// not a percent-encoded name. Refuses parts that could climb out of the prefix (`..`, `.`,
    /// empty, or with a `/`), so an input key can never make ferry write outside its output. A
    /// backslash is an ordinary character in S3 keys and Linux file names (keys uploaded from
    /// Windows tools hold them), so it is kept.
    pub fn child<S: AsRef<str>>(&self, parts: &[S], suffix: &str) -> Result<Path, String> {
        if parts.is_empty() {
            return Err("empty key".into());
        }
        let mut key = self.prefix.as_ref().to_string();
        for (i, part) in parts.iter().map(AsRef::as_ref).enumerate() {
            if part.is_empty() || part == "." || part == ".." || part.contains('/') {
                return Err(format!("key part {part:?} is not allowed in an output key"));
            }
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(part);
            if i + 1 == parts.len() {
                key.push_str(suffix);
            }
        }
        Path::parse(&key).map_err(|e| format!("{key:?} is not allowed as an output key: {e}"))
    }
}

/// The `<Code>` of an S3 error response quoted in `error`.
fn s3_error_code(error: &str) -> Option<&str> {
    let (_, rest) = error.split_once("<Code>")?;
    rest.split_once("</Code>").map(|(code, _)| code.trim())
}

/// What the S3 error codes users meet most mean for a job, in the words of the settings to check.
fn explain_s3_error(code: &str, location: &Location) -> Option<String> {
    let bucket = location.url.split_once("://").map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
    Some(match code {
        "NoSuchBucket" => format!("bucket {bucket:?} does not exist at this endpoint"),
        "AccessDenied" | "AllAccessDisabled" => {
            "these credentials are not allowed this request on this bucket or prefix".into()
        }
        "InvalidAccessKeyId" => "the store does not know this access key id (AWS_ACCESS_KEY_ID)".into(),
        "SignatureDoesNotMatch" => {
            "the secret key does not belong to the access key id: check AWS_SECRET_ACCESS_KEY".into()
        }
        "ExpiredToken" | "TokenRefreshRequired" => "the session token has expired: get new credentials".into(),
        "InvalidToken" => "the session token (AWS_SESSION_TOKEN) is not valid".into(),
        "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException" => {
            format!("bucket {bucket:?} is in another region than AWS_REGION says")
        }
        "RequestTimeTooSkewed" => "this machine's clock is too far from the store's".into(),
        _ => return None,
    })
}

fn walk(root: &std::path::Path) -> (Vec<Path>, Vec<(String, String)>) {
    let (mut keys, mut unlisted) = (Vec::new(), Vec::new());
    let relative = |p: &std::path::Path| p.strip_prefix(root).unwrap_or(p).to_path_buf();
    for entry in walkdir::WalkDir::new(root).min_depth(1).follow_links(true) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let name = e.path().map_or_else(|| root.to_path_buf(), relative);
                unlisted.push((name.to_string_lossy().into_owned(), e.to_string()));
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = relative(entry.path());
        let name = rel.to_string_lossy().into_owned();
        let Some(parts) = rel.components().map(|c| c.as_os_str().to_str()).collect::<Option<Vec<&str>>>() else {
            unlisted.push((name, "its name is not UTF-8, so it cannot be an object key".into()));
            continue;
        };
        match Path::parse(parts.join("/")) {
            Ok(key) => keys.push(key),
            Err(e) => unlisted.push((name, format!("its name cannot be an object key: {e}"))),
        }
    }
    (keys, unlisted)
}

/// Writes a local file so that no reader ever sees part of it, whatever stops the writer and
/// however many write it at once. The body goes into an unnamed file in the target's folder
/// (`O_TMPFILE`), which a killed writer leaves nothing of; only when complete (and flushed to disk
/// with `fsync`) is it linked under a hidden name of its own and renamed over the target. Where
/// the file system has no unnamed files, the hidden file is `.<name>.ferry-partial`, which a
/// rerun overwrites.
pub fn write_file(target: &std::path::Path, body: &[u8], fsync: bool) -> std::io::Result<()> {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(std::io::Error::other(format!("{} is not a file path", target.display())));
    };
    let dir = if dir.as_os_str().is_empty() { std::path::Path::new(".") } else { dir };
    let hidden = |tag: &str| {
        let mut hidden = std::ffi::OsString::from(".");
        hidden.push(name);
        hidden.push(tag);
        hidden.push(PARTIAL_SUFFIX);
        if hidden.len() > MAX_NAME {
            // A name near the file system's limit: the staging name stands for it by a hash.
            use std::os::unix::ffi::OsStrExt;
            let hash = twox_hash::XxHash64::oneshot(0, name.as_bytes());
            hidden = format!(".{hash:016x}{tag}{PARTIAL_SUFFIX}").into();
        }
        dir.join(hidden)
    };
    let unnamed = || {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).mode(0o666).custom_flags(libc::O_TMPFILE).open(dir)
    };
    let file = match unnamed() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            unnamed()
        }
        other => other,
    };
    let mut file = match file {
        Ok(file) => file,
        // Not every file system has unnamed files (EOPNOTSUPP; EISDIR before Linux 3.11).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {
            return write_through(&hidden(""), target, body, fsync);
        }
        Err(e) => return Err(e),
    };
    std::io::Write::write_all(&mut file, body)?;
    if fsync {
        file.sync_data()?;
    }
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staged = hidden(&format!(".{}-{n}", std::process::id()));
    link_unnamed(&file, &staged)?;
    std::fs::rename(&staged, target).inspect_err(|_| {
        let _ = std::fs::remove_file(&staged);
    })?;
    Ok(())
}

/// The media type a bucket serves an object of ferry's as, by its name: predictions and reports
/// are JSON, sketch parts Parquet.
fn content_type(key: &Path) -> Option<&'static str> {
    match key.extension()? {
        "out" | "json" => Some("application/json"),
        "parquet" => Some("application/vnd.apache.parquet"),
        _ => None,
    }
}

/// The longest file name of Linux file systems (ext4, XFS, btrfs), in bytes.
const MAX_NAME: usize = 255;

/// Gives the unnamed file `file` the name `to` (`linkat` of its `/proc/self/fd` entry, which needs
/// no privilege, unlike `AT_EMPTY_PATH`).
fn link_unnamed(file: &std::fs::File, to: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let to = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let rc =
        unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`write_file`] through the named hidden file `partial`, renamed over `target` once complete.
fn write_through(partial: &std::path::Path, target: &std::path::Path, body: &[u8], fsync: bool) -> std::io::Result<()> {
    let mut file = std::fs::File::create(partial)?;
    let written = std::io::Write::write_all(&mut file, body)
        .and_then(|()| if fsync { file.sync_data() } else { Ok(()) })
        .and_then(|()| {
            drop(file);
            std::fs::rename(partial, target)
        });
    if written.is_err() {
        // A full disk, say: what was staged is useless, and the space is better given back.
        let _ = std::fs::remove_file(partial);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(prefix: &str) -> Location {
        Location {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: Path::from(prefix),
            url: format!("mem://{prefix}"),
            local: None,
            bucket: None,
        }
    }

    #[test]
    fn s3_error_codes_are_explained() {
        let bucket = Location::open("s3://photos-2026/in/", false, 0).unwrap();
        let said = |body: &str| bucket.hint(&format!("Error performing GET: 404 Not Found: {body}"));
        let missing = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>gone</Message></Error>";
        assert!(
            said(missing).starts_with(" (bucket \"photos-2026\" does not exist at this endpoint)"),
            "{}",
            said(missing)
        );
        assert!(said("<Error><Code>SignatureDoesNotMatch</Code></Error>").contains("check AWS_SECRET_ACCESS_KEY"));
        assert!(said("<Error><Code>PermanentRedirect</Code></Error>").contains("another region than AWS_REGION"));
        assert_eq!(said("<Error><Code>SlowDown</Code></Error>"), bucket.credentials_hint(), "other codes");
        let folder = Location::open(std::env::temp_dir().to_str().unwrap(), false, 0).unwrap();
        assert_eq!(folder.hint("<Code>NoSuchBucket</Code>"), "", "a folder has no buckets");
    }

    #[test]
    fn a_name_near_the_limit_is_written_through_a_shorter_one() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(format!("{}.jpg.out", "x".repeat(MAX_NAME - 8)));
        write_file(&target, b"long", false).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"long");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing staged is left");
    }

    #[test]
    fn writers_of_one_file_at_once_never_show_part_of_it() {
        // Two pods of one index (a replacement started while the old one still runs) writing the
        // same outputs on a shared volume: a reader sees one writer's whole file or nothing.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x.jpg.out");
        let bodies: Vec<Vec<u8>> = (0..4u8).map(|w| vec![b'a' + w; (256 << 10) * (1 + w as usize)]).collect();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for body in &bodies {
                let (target, done) = (&target, &done);
                s.spawn(move || {
                    for _ in 0..150 {
                        write_file(target, body, false).unwrap();
                    }
                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                });
            }
            let mut seen = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(read) = std::fs::read(&target) {
                    assert!(bodies.contains(&read), "read {} bytes of a partial file", read.len());
                    seen += 1;
                }
            }
            assert!(seen > 0);
        });
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["x.jpg.out"], "nothing staged is left");
    }

    #[test]
    fn a_write_that_fails_leaves_nothing_staged() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.jpg.out");
        write_file(&target, b"first", false).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"first");
        // The rename fails: a non-empty folder is in the way.
        let blocked = dir.path().join("b.jpg.out");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_file(&blocked, b"second", false).is_err());
        // The same through a named hidden file, where the file system has no unnamed ones.
        assert!(write_through(&dir.path().join(".b.jpg.out.ferry-partial"), &blocked, b"second", false).is_err());
        let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["a.jpg.out", "b.jpg.out"]);
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
        for bad in [&["..", "etc", "passwd"][..], &["a", ".", "b"], &["", "x"], &["a/b"], &["a", "../b"]] {
            assert!(output.child(bad, ".out").is_err(), "{bad:?}");
        }
        let windows = output.child(&["photos\\2021\\..\\a.jpg"], ".out").unwrap();
        assert_eq!(windows.as_ref(), "out/photos\\2021\\..\\a.jpg.out", "one key part, a backslash is no separator");
    }

    #[test]
    fn a_missing_input_folder_is_named() {
        let err = Location::open("/nonexistent/ferry-input", false, 0).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ferry-input"), "{err}");
        assert!(Location::open("gopher://x/y", false, 0).is_err());
        for endpoint in ["", "localhost:9000", "127.0.0.1:9000", "ftp://host", "http://", "s3.amazonaws.com"] {
            let err = plain_http("AWS_ENDPOINT_URL".into(), endpoint.into()).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("AWS_ENDPOINT_URL {endpoint:?} is not an http:// or https:// URL")),
                "{err}"
            );
        }
        let err = header_safe("AWS_SESSION_TOKEN", "abc\ndef").unwrap_err().to_string();
        assert!(
            err.starts_with("AWS_SESSION_TOKEN holds a line break or other control character (byte 3 of 7)"),
            "{err}"
        );
        header_safe("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjE+/=").unwrap();
        assert!(plain_http(String::new(), "http://127.0.0.1:9000".into()).unwrap());
        assert!(!plain_http(String::new(), "https://s3.eu-west-1.amazonaws.com/".into()).unwrap());
        let err = Location::open("s3://bucket/a//b/", false, 0).unwrap_err().to_string();
        assert!(err.contains("s3://bucket/a//b/: the prefix is not a valid key"), "{err}");
        let prefixed = Location::open("s3://bucket/été #1/", false, 0).unwrap();
        assert_eq!(prefixed.prefix.as_ref(), "été #1");
        let file = tempfile::NamedTempFile::new().unwrap();
        for create in [false, true] {
            let err = Location::open(file.path().to_str().unwrap(), create, 0).unwrap_err().to_string();
            assert!(err.contains("a file, not a folder"), "{err}");
        }
    }

    fn files_under(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .flat_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() {
                    files_under(&e.path()).into_iter().map(|n| format!("{name}/{n}")).collect()
                } else {
                    vec![name]
                }
            })
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_folder_write_leaves_only_the_finished_file() {
        let tmp = tempfile::tempdir().unwrap();
        let out = Location::open(tmp.path().to_str().unwrap(), true, 0).unwrap();
        let key = out.child(&["a b", "c%d#1 été.jpg"], ".out").unwrap();
        out.write(&key, b"whole".to_vec(), 5 << 20).await.unwrap();
        assert_eq!(files_under(tmp.path()), ["a b/c%d#1 été.jpg.out"]);
        assert_eq!(get_bytes(out.store.as_ref(), &key).await.unwrap().as_ref(), b"whole");
        // Where files are staged under one hidden name, what a job killed between writing and
        // renaming leaves is replaced by the rerun.
        let staged = tmp.path().join("a b/.c%d#1 été.jpg.out.ferry-partial");
        std::fs::write(&staged, b"half").unwrap();
        write_through(&staged, &tmp.path().join("a b/c%d#1 été.jpg.out"), b"again", false).unwrap();
        assert_eq!(files_under(tmp.path()), ["a b/c%d#1 été.jpg.out"]);
        assert_eq!(get_bytes(out.store.as_ref(), &key).await.unwrap().as_ref(), b"again");
        // A folder that does not exist yet is made, with or without flushing to disk.
        let deep = out.child(&["x", "y", "z.jpg"], ".out").unwrap();
        out.clone().with_fsync(true).write(&deep, b"1".to_vec(), 5 << 20).await.unwrap();
        assert_eq!(files_under(tmp.path()), ["a b/c%d#1 été.jpg.out", "x/y/z.jpg.out"]);
        assert!(is_partial(".c%d#1.jpg.out.ferry-partial") && !is_partial("c.jpg.out") && !is_partial(".hidden.jpg"));
    }

    #[tokio::test]
    async fn a_store_write_larger_than_a_part_is_uploaded_in_parts() {
        let out = loc("out");
        let key = Path::from("out/big.out");
        let body: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 251) as u8).collect();
        out.write(&key, body.clone(), 5 << 20).await.unwrap();
        assert_eq!(get_bytes(out.store.as_ref(), &key).await.unwrap().as_ref(), &body[..]);
        // Served as what it is, whole or in parts.
        let small = Path::from("out/_ferry/report.json");
        out.write_whole(&small, b"{}".to_vec()).await.unwrap();
        for (key, mime) in [(&key, "application/json"), (&small, "application/json")] {
            let got = out.store.get(key).await.unwrap();
            assert_eq!(got.attributes.get(&Attribute::ContentType).map(|v| v.as_ref()), Some(mime), "{key}");
        }
        assert_eq!(content_type(&Path::from("s/part-1-00000.parquet")), Some("application/vnd.apache.parquet"));
        assert_eq!(content_type(&Path::from("x/cat.jpg")), None);
    }
}
