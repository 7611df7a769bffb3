//! ONNX Runtime through `ort`, with the shared library found at run time.
//!
//! The library is loaded, not linked: ferry builds offline and with no C++ toolchain for ONNX
//! Runtime, and users already have the library, usually inside a Python `onnxruntime` wheel.
//! Loading happens once per process (ONNX Runtime's API table is global), so the environment
//! lives in a `OnceLock` and later loads reuse it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use ort::session::builder::{GraphOptimizationLevel, PrepackedWeights, SessionBuilder};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use crate::{
    Backend, BackendError, Exact, InputType, IoInfo, LoadOptions, Model, ModelInfo, Output, OutputValues, Result,
    Tensor,
};

static ENVIRONMENT: OnceLock<std::result::Result<(ort::environment::Environment, PathBuf), String>> = OnceLock::new();

/// Looks for `libonnxruntime.so` where users usually have it: `ORT_DYLIB_PATH`, the system
/// library folders, then the `capi/` folder of a Python `onnxruntime` package.
pub fn find_onnxruntime() -> std::result::Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("ORT_DYLIB_PATH={} is not a file", p.display())) };
    }
    let system =
        ["/usr/local/lib", "/usr/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"];
    for dir in system {
        if let Some(p) = library_in(Path::new(dir)) {
            return Ok(p);
        }
    }
    // Known Python package folders first: asking a Python interpreter costs 30 ms, or 200 ms
    // behind a version manager's shim, on every job start.
    if let Some(p) = python_packages().into_iter().find_map(|dir| library_in(&dir.join("onnxruntime/capi"))) {
        return Ok(p);
    }
    for python in ["python3", "python"] {
        let Ok(out) = Command::new(python)
            .args([
                "-c",
                "import importlib.util as u; s = u.find_spec('onnxruntime'); \
                 print(s.submodule_search_locations[0] if s else '')",
            ])
            .output()
        else {
            continue;
        };
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            if let Some(p) = library_in(&Path::new(&dir).join("capi")) {
                return Ok(p);
            }
        }
    }
    Err("no libonnxruntime.so in ORT_DYLIB_PATH, the system library folders, or a Python onnxruntime package \
         (pip install onnxruntime, or set ORT_DYLIB_PATH)"
        .into())
}

/// Package folders of the Python environments a user is likely to have installed onnxruntime
/// into: an active virtualenv or conda environment, pyenv versions, the user's and the system's.
fn python_packages() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|p| PathBuf::from(p).join("lib"))
        .collect();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let pyenv = std::env::var_os("PYENV_ROOT").map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".pyenv")));
    if let Some(Ok(versions)) = pyenv.map(|p| std::fs::read_dir(p.join("versions"))) {
        roots.extend(versions.filter_map(|e| e.ok()).map(|e| e.path().join("lib")));
    }
    roots.extend(home.map(|h| h.join(".local/lib")));
    roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    let mut out = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else { continue };
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name().to_str().is_some_and(|n| n.starts_with("python3")) {
                out.push(e.path().join("site-packages"));
                out.push(e.path().join("dist-packages"));
            }
        }
    }
    out.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    out
}

/// `libonnxruntime.so` or the newest `libonnxruntime.so.1.*` in `dir`.
fn library_in(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join("libonnxruntime.so");
    if plain.is_file() {
        return Some(plain);
    }
    let mut versioned: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so.")))
        .collect();
    versioned.sort();
    versioned.pop()
}

fn environment(explicit: Option<&Path>) -> Result<&'static (ort::environment::Environment, PathBuf)> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => find_onnxruntime()?,
        };
        let builder = ort::init_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let env = builder.with_name("ferry").build().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((env, path))
    });
    env.as_ref().map_err(|e| BackendError::RuntimeUnavailable(e.clone()))
}

/// A model loaded into ONNX Runtime.
///
/// The graph is optimised once, by a first session that saves the result in ONNX Runtime's own
/// format, and every instance is a session over those bytes that reads its weights where they
/// lie. Optimising in each session instead gives each its own copy of the weights (they are
/// rewritten, e.g. into the blocked layout of the x86 convolution kernels): ResNet-50 took about
/// 250 MB more per session, so a job with a session per core on a large machine held tens of
/// copies. Should the optimised graph not save, each session optimises the model itself.
#[derive(Debug)]
pub(crate) struct OrtModel {
    path: PathBuf,
    intra_op_threads: usize,
    info: ModelInfo,
    library: PathBuf,
    /// Sessions built while loading (one describes the model), handed to the first instances:
    /// building a session takes a noticeable part of a second for a large model, so they are
    /// built side by side. Declared before `source`, so dropped before it.
    ready: std::sync::Mutex<Vec<Session>>,
    source: Source,
}

/// The fewest instances whose sessions share one optimised graph. Saving the graph takes about
/// half as long again as building a session (ResNet-50: 0.45 s more to set up two sessions on
/// two cores, which build side by side in the time of one), and two sessions hold just one
/// extra copy of the weights; from three on, the copies are what matters.
const SHARE_FROM: usize = 3;

/// What sessions are built from.
enum Source {
    /// The graph optimised for this machine, in ONNX Runtime's format. Sessions read their
    /// weights from these bytes in place, so every session holds a reference to them, and share
    /// the kernels' pre-packed forms of them through one container.
    Optimized(Arc<Vec<u8>>, PrepackedWeights),
    /// The ONNX model, which each session optimises itself.
    Onnx(Vec<u8>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Optimized(b, _) => write!(f, "Optimized({} bytes)", b.len()),
            Source::Onnx(b) => write!(f, "Onnx({} bytes)", b.len()),
        }
    }
}

impl OrtModel {
    pub(crate) fn load(path: &Path, bytes: Vec<u8>, options: &LoadOptions) -> Result<Self> {
        let (env, library) = environment(options.onnxruntime_path.as_deref())?;
        let threads = options.intra_op_threads.max(1);
        let instances = options.instances.max(1);
        // From SHARE_FROM instances on, the first session optimises the graph and saves it, and
        // the others are built from what it saved, side by side.
        let (first, source) = if instances < SHARE_FROM {
            (None, Source::Onnx(bytes))
        } else {
            let prepacked = PrepackedWeights::new();
            match optimize(env, &bytes, threads, &prepacked, &folder(path)) {
                Ok((session, optimized)) => (Some(session), Source::Optimized(Arc::new(optimized), prepacked)),
                // A model that does not load fails again below, with the runtime's message.
                Err(reason) => {
                    tracing::warn!(%reason, "the optimised graph could not be saved; each session keeps its own copy of the weights");
                    (None, Source::Onnx(bytes))
                }
            }
        };
        let mut model = Self {
            path: path.to_owned(),
            intra_op_threads: threads,
            info: ModelInfo { inputs: vec![], outputs: vec![] },
            library: library.clone(),
            ready: std::sync::Mutex::new(Vec::new()),
            source,
        };
        let mut sessions: Vec<Session> = first.into_iter().collect();
        let more = instances - sessions.len();
        sessions.extend(std::thread::scope(|scope| {
            let model = &model;
            let handles: Vec<_> = (0..more).map(|_| scope.spawn(|| model.session())).collect();
            handles.into_iter().map(|h| h.join().expect("building a session panicked")).collect::<Result<Vec<_>>>()
        })?);
        let session = &sessions[0];
        model.info = ModelInfo {
            inputs: session.inputs().iter().map(|o| io_info(o.name(), o.dtype())).collect(),
            outputs: session.outputs().iter().map(|o| io_info(o.name(), o.dtype())).collect(),
        };
        model.ready = std::sync::Mutex::new(sessions);
        Ok(model)
    }

    fn session(&self) -> Result<Session> {
        let (env, _) = environment(None)?;
        build_session(env, &self.source, self.intra_op_threads, &folder(&self.path))
            .map_err(|e| BackendError::Load { path: self.path.clone(), reason: e.to_string() })
    }
}

/// [`crate::model_folder`], as a session option takes it.
fn folder(path: &Path) -> String {
    crate::model_folder(path).to_string_lossy().into_owned()
}

/// A session over the model, and the graph it optimised for this machine, in ONNX Runtime's
/// format.
fn optimize(
    env: &ort::environment::Environment,
    bytes: &[u8],
    threads: usize,
    prepacked: &PrepackedWeights,
    folder: &str,
) -> std::result::Result<(Session, Vec<u8>), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary folder: {e}"))?;
    // The extension chooses the format.
    let file = dir.path().join("model.ort");
    let session = save_optimized(env, bytes, threads, prepacked, &file, folder).map_err(|e| e.to_string())?;
    let optimized = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok((session, optimized))
}

fn save_optimized(
    env: &ort::environment::Environment,
    bytes: &[u8],
    threads: usize,
    prepacked: &PrepackedWeights,
    file: &Path,
    folder: &str,
) -> ort::Result<Session> {
    builder(env, threads, folder)?
        .with_prepacked_weights(prepacked)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_optimized_model_path(file)?
        .commit_from_memory(bytes)
}

// `ort::Error<SessionBuilder>` is not `Send`; keeping each builder chain in a function that
// returns `ort::Result` turns every step's error into the plain kind.
fn builder(env: &ort::environment::Environment, threads: usize, folder: &str) -> ort::Result<SessionBuilder> {
    let builder = Session::builder(env)?
        .with_intra_threads(threads)?
        .with_inter_threads(1)?
        // A model loaded from memory finds its external data (`location` in the file, as
        // PyTorch's exporter writes large weights) next to the model, not in the working folder.
        .with_config_entry("session.model_external_initializers_file_folder_path", folder)?;
    if threads == 1 {
        return Ok(builder.with_intra_op_spinning(false)?);
    }
    Ok(builder)
}

fn build_session(
    env: &ort::environment::Environment,
    source: &Source,
    threads: usize,
    folder: &str,
) -> ort::Result<Session> {
    match source {
        Source::Optimized(bytes, prepacked) => builder(env, threads, folder)?
            .with_prepacked_weights(prepacked)?
            // Already optimised, for this machine.
            .with_optimization_level(GraphOptimizationLevel::Disable)?
            // The weights stay in `bytes`, which the session's owner keeps alive.
            .with_config_entry("session.use_ort_model_bytes_directly", "1")?
            .with_config_entry("session.use_ort_model_bytes_for_initializers", "1")?
            .commit_from_memory(bytes),
        Source::Onnx(bytes) => builder(env, threads, folder)?
            .with_optimization_level(GraphOptimizationLevel::All)?
            .commit_from_memory(bytes),
    }
}

fn io_info(name: &str, ty: &ValueType) -> IoInfo {
    let (dtype, shape) = match ty {
        ValueType::Tensor { ty, shape, .. } => {
            (element_name(*ty), shape.iter().map(|&d| usize::try_from(d).ok().filter(|_| d >= 0)).collect())
        }
        other => (format!("{other:?}"), vec![]),
    };
    IoInfo { name: name.to_string(), dtype, shape }
}

fn element_name(ty: TensorElementType) -> String {
    match ty {
        TensorElementType::Float32 => "float".into(),
        TensorElementType::Float64 => "double".into(),
        TensorElementType::Float16 => "float16".into(),
        TensorElementType::Int64 => "int64".into(),
        TensorElementType::Int32 => "int32".into(),
        TensorElementType::Uint8 => "uint8".into(),
        TensorElementType::Int8 => "int8".into(),
        TensorElementType::Uint16 => "uint16".into(),
        TensorElementType::Int16 => "int16".into(),
        TensorElementType::Uint32 => "uint32".into(),
        TensorElementType::Uint64 => "uint64".into(),
        TensorElementType::Bool => "bool".into(),
        TensorElementType::Bfloat16 => "bfloat16".into(),
        TensorElementType::String => "string".into(),
        other => other.to_string(),
    }
}

impl Model for OrtModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn runtime(&self) -> String {
        format!("onnxruntime ({})", self.library.display())
    }

    fn instance(&self) -> Result<Box<dyn Backend>> {
        let ready = self.ready.lock().expect("the session pool is never poisoned").pop();
        let session = match ready {
            Some(s) => s,
            None => self.session()?,
        };
        let weights = match &self.source {
            Source::Optimized(bytes, _) => Some(bytes.clone()),
            Source::Onnx(_) => None,
        };
        Ok(Box::new(OrtBackend { session, info: self.info.clone(), _weights: weights }))
    }
}

struct OrtBackend {
    // Declared before `_weights`, so dropped before the bytes it reads its weights from.
    session: Session,
    info: ModelInfo,
    _weights: Option<Arc<Vec<u8>>>,
}

impl Backend for OrtBackend {
    fn run(&mut self, input: &Tensor) -> Result<Vec<Output>> {
        let ty = crate::check_input(&self.info, &input.shape)?;
        let run_error = |e: ort::Error| BackendError::Run(e.to_string());
        let value: SessionInputValue<'_> = match ty {
            InputType::F32 => {
                TensorRef::from_array_view((input.shape.clone(), input.data.as_slice())).map_err(run_error)?.into()
            }
            InputType::F16 => converted(input, half::f16::from_f32).map_err(run_error)?.into(),
            InputType::F64 => converted(input, |x| x as f64).map_err(run_error)?.into(),
            // Integer inputs are given whole values; `as` saturates anything outside the type.
            InputType::U8 => converted(input, |x| x as u8).map_err(run_error)?.into(),
            InputType::I8 => converted(input, |x| x as i8).map_err(run_error)?.into(),
            InputType::U16 => converted(input, |x| x as u16).map_err(run_error)?.into(),
            InputType::I16 => converted(input, |x| x as i16).map_err(run_error)?.into(),
            InputType::I32 => converted(input, |x| x as i32).map_err(run_error)?.into(),
            InputType::I64 => converted(input, |x| x as i64).map_err(run_error)?.into(),
        };
        let mut outputs = self.session.run(ort::inputs![value]).map_err(|e| BackendError::Run(e.to_string()))?;
        let mut tensors = Vec::with_capacity(self.info.outputs.len());
        for io in &self.info.outputs {
            let value = outputs
                .remove(&io.name)
                .ok_or_else(|| BackendError::Run(format!("the session returned no output {}", io.name)))?;
            tensors.push(output(value).map_err(|e| BackendError::Run(format!("output {}: {e}", io.name)))?);
        }
        Ok(tensors)
    }
}

/// `input` converted value by value into a tensor of another element type.
fn converted<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
    input: &Tensor,
    f: impl Fn(f32) -> T,
) -> ort::Result<DynValue> {
    let data: Vec<T> = input.data.iter().map(|&x| f(x)).collect();
    Ok(ort::value::Tensor::from_array((input.shape.clone(), data))?.into_dyn())
}

/// A batch's output: floats where ONNX Runtime left them, anything else converted.
fn output(value: DynValue) -> std::result::Result<Output, String> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => return Err(format!("{other:?} is not a tensor")),
    };
    fn dims(shape: &ort::value::Shape) -> Vec<usize> {
        shape.iter().map(|&d| d as usize).collect()
    }
    fn ints<T: ort::value::PrimitiveTensorElementType + Copy + Into<i128>>(
        value: &DynValue,
    ) -> ort::Result<(Vec<usize>, Exact)> {
        let (shape, v) = value.try_extract_tensor::<T>()?;
        // Wider than i64 only for u64 values past i64::MAX, which saturate.
        let v = v.iter().map(|&x| x.into().clamp(i64::MIN as i128, i64::MAX as i128) as i64).collect();
        Ok((dims(shape), Exact::Int(v)))
    }
    let exact = match ty {
        TensorElementType::Float32 => {
            let (shape, _) = value.try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
            return Ok(Output::new(dims(shape), OrtValues(value)));
        }
        TensorElementType::Float64 => {
            let (shape, v) = value.try_extract_tensor::<f64>().map_err(|e| e.to_string())?;
            return Ok(Output::new(dims(shape), v.iter().map(|&x| x as f32).collect::<Vec<f32>>()));
        }
        TensorElementType::Float16 => {
            let (shape, v) = value.try_extract_tensor::<half::f16>().map_err(|e| e.to_string())?;
            return Ok(Output::new(dims(shape), v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>()));
        }
        TensorElementType::Int64 => ints::<i64>(&value),
        TensorElementType::Int32 => ints::<i32>(&value),
        TensorElementType::Int16 => ints::<i16>(&value),
        TensorElementType::Int8 => ints::<i8>(&value),
        TensorElementType::Uint64 => ints::<u64>(&value),
        TensorElementType::Uint32 => ints::<u32>(&value),
        TensorElementType::Uint16 => ints::<u16>(&value),
        TensorElementType::Uint8 => ints::<u8>(&value),
        TensorElementType::Bool => {
            value.try_extract_tensor::<bool>().map(|(shape, v)| (dims(shape), Exact::Bool(v.to_vec())))
        }
        TensorElementType::String => value.try_extract_strings().map(|(shape, v)| (dims(shape), Exact::Text(v))),
        other => return Err(format!("its element type is {}, which ferry does not write", element_name(other))),
    };
    let (shape, exact) = exact.map_err(|e| e.to_string())?;
    Ok(Output::exact(shape, exact))
}

/// An output left in the memory ONNX Runtime returned it in. The value keeps its allocator
/// alive, so it may outlive the session.
struct OrtValues(DynValue);

impl OutputValues for OrtValues {
    fn values(&self) -> &[f32] {
        self.0.try_extract_tensor::<f32>().expect("an f32 tensor when the batch ran, and values do not change").1
    }
}
