//! The model runtime boundary of ferry.
//!
//! A [`Backend`] is one loaded model that runs one batch at a time on the calling thread. It is
//! deliberately synchronous and `&mut self`: ONNX Runtime sessions are not safe to run
//! concurrently, tract keeps per-run state, and on a CPU the fastest arrangement measured is one
//! single-threaded instance per core, each fed whole batches by its own worker thread. A
//! [`Model`] is the shared, immutable part (the file, its description, a loaded library); it
//! hands out as many [`Backend`] instances as the caller has workers.
//!
//! Two implementations exist: ONNX Runtime through `ort` (the fast path; the shared library is
//! found at run time, see [`find_onnxruntime`]) and `tract` (pure Rust, always available, also
//! the test oracle for the other one).
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod onnxruntime;
mod tract;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use onnxruntime::find_onnxruntime;

/// Errors of the backend layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The model file could not be read or parsed, or the runtime refused it.
    #[error("model {path} could not be loaded: {reason}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// What the runtime said.
        reason: String,
    },
    /// ONNX Runtime was asked for explicitly but its library could not be found or opened.
    #[error("ONNX Runtime is not available: {0}")]
    RuntimeUnavailable(String),
    /// The model's inputs are not what ferry can feed.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A batch does not have the shape the model takes.
    #[error("input shape {got:?} does not fit the model's input {name} {expected}")]
    Shape {
        /// The model's input name.
        name: String,
        /// The declared shape, dynamic axes shown as `?`.
        expected: String,
        /// The shape given.
        got: Vec<usize>,
    },
    /// The runtime failed while running a batch.
    #[error("inference failed: {0}")]
    Run(String),
}

/// `Result` with [`BackendError`].
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// A dense `f32` tensor in row-major order.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor").field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl Tensor {
    /// Builds a tensor, checking that the data fits the shape.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor data does not match its shape");
        Self { shape, data }
    }

    /// Number of values in one item along the first (batch) axis.
    pub fn row_len(&self) -> usize {
        row_len(&self.shape)
    }

    /// The values of item `i` along the first axis.
    pub fn row(&self, i: usize) -> &[f32] {
        row(&self.shape, &self.data, i)
    }
}

/// Values in one item along the first (batch) axis of `shape`.
fn row_len(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}

/// Item `i` along the first axis of row-major `values` of `shape`.
fn row<'a>(shape: &[usize], values: &'a [f32], i: usize) -> &'a [f32] {
    let n = row_len(shape);
    &values[i * n..(i + 1) * n]
}

/// One output tensor of a batch, row-major. Its values may stay in the memory the runtime
/// returned them in: a stage tensor of a batch of eight MobileNetV2 images is megabytes, and
/// copying it out of the runtime and again into each record took as long as building the
/// records' sketches.
pub struct Output {
    /// Dimensions, outermost (batch) first.
    pub shape: Vec<usize>,
    values: Box<dyn OutputValues>,
    /// The values as the model typed them, when they are not floats.
    exact: Option<Exact>,
}

/// The values of an output that are not floats (class ids from an `ArgMax`, counts, masks,
/// label strings), kept as they are so that they are written as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum Exact {
    /// Any integer type, widened.
    Int(Vec<i64>),
    /// Booleans.
    Bool(Vec<bool>),
    /// Strings.
    Text(Vec<String>),
}

/// A run of an [`Exact`] output's values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExactSlice<'a> {
    /// See [`Exact::Int`].
    Int(&'a [i64]),
    /// See [`Exact::Bool`].
    Bool(&'a [bool]),
    /// See [`Exact::Text`].
    Text(&'a [String]),
}

impl Exact {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Exact::Int(v) => v.len(),
            Exact::Bool(v) => v.len(),
            Exact::Text(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> ExactSlice<'_> {
        match self {
            Exact::Int(v) => ExactSlice::Int(&v[range]),
            Exact::Bool(v) => ExactSlice::Bool(&v[range]),
            Exact::Text(v) => ExactSlice::Text(&v[range]),
        }
    }

    /// The values as floats, for whatever reads numbers: integers rounded to the nearest float,
    /// booleans 0 or 1, strings NaN.
    fn floats(&self) -> Vec<f32> {
        match self {
            Exact::Int(v) => v.iter().map(|&x| x as f32).collect(),
            Exact::Bool(v) => v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
            Exact::Text(v) => vec![f32::NAN; v.len()],
        }
    }
}

impl ExactSlice<'_> {
    /// The values as an owned [`Exact`].
    pub fn to_owned(self) -> Exact {
        match self {
            ExactSlice::Int(v) => Exact::Int(v.to_vec()),
            ExactSlice::Bool(v) => Exact::Bool(v.to_vec()),
            ExactSlice::Text(v) => Exact::Text(v.to_vec()),
        }
    }
}

/// Where an [`Output`]'s values live.
pub trait OutputValues: Send + Sync {
    /// The values, row-major.
    fn values(&self) -> &[f32];
}

impl OutputValues for Vec<f32> {
    fn values(&self) -> &[f32] {
        self
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Output").field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl Output {
    /// An output of `shape` over `values`, checking that they fit.
    pub fn new(shape: Vec<usize>, values: impl OutputValues + 'static) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.values().len(), "output values do not match the shape");
        Self { shape, values: Box::new(values), exact: None }
    }

    /// An output of `shape` whose values are not floats.
    pub fn exact(shape: Vec<usize>, exact: Exact) -> Self {
        assert_eq!(shape.iter().product::<usize>(), exact.len(), "output values do not match the shape");
        Self { shape, values: Box::new(exact.floats()), exact: Some(exact) }
    }

    /// Item `i`'s values as the model typed them, when they are not floats.
    pub fn exact_row(&self, i: usize) -> Option<ExactSlice<'_>> {
        let n = self.row_len();
        self.exact.as_ref().map(|e| e.slice(i * n..(i + 1) * n))
    }

    /// All values, row-major; an [`Exact`] output's as floats (see [`Output::exact`]).
    pub fn values(&self) -> &[f32] {
        self.values.values()
    }

    /// Number of values in one item along the first (batch) axis.
    pub fn row_len(&self) -> usize {
        row_len(&self.shape)
    }

    /// The values of item `i` along the first axis.
    pub fn row(&self, i: usize) -> &[f32] {
        row(&self.shape, self.values(), i)
    }
}

/// One input or output of a model as the model file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoInfo {
    /// Name in the graph.
    pub name: String,
    /// Element type as ONNX names it (`float`, `int64`, ...).
    pub dtype: String,
    /// Declared dimensions; `None` for a dynamic (symbolic or unknown) axis.
    pub shape: Vec<Option<usize>>,
}

impl IoInfo {
    /// The shape written with `?` for dynamic axes, e.g. `[?, 3, 224, 224]`.
    pub fn shape_string(&self) -> String {
        let dims: Vec<String> =
            self.shape.iter().map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string())).collect();
        format!("[{}]", dims.join(", "))
    }

    /// Whether a concrete shape fits the declared one.
    pub fn accepts(&self, shape: &[usize]) -> bool {
        self.shape.len() == shape.len() && self.shape.iter().zip(shape).all(|(d, s)| d.is_none_or(|d| d == *s))
    }
}

/// What a model takes and gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Graph inputs (initialisers excluded).
    pub inputs: Vec<IoInfo>,
    /// Graph outputs.
    pub outputs: Vec<IoInfo>,
}

impl ModelInfo {
    /// The batch size the first input declares, when it is a number rather than a dynamic axis
    /// (an export without a dynamic batch axis declares 1). Such a model must be run on exactly
    /// that many rows: see [`Tensor::pad_rows`].
    pub fn fixed_batch(&self) -> Option<usize> {
        self.inputs.first().and_then(|i| i.shape.first().copied().flatten()).filter(|&b| b > 0)
    }
}

impl Tensor {
    /// Makes a batch of `shape[0]` rows into one of `rows` rows, the new rows zeros, for a model
    /// with a fixed batch size; the extra rows of its outputs are then ignored.
    pub fn pad_rows(&mut self, rows: usize) {
        let Some(&n) = self.shape.first() else { return };
        if n == 0 || rows <= n {
            return;
        }
        let len = self.data.len() / n;
        self.data.resize(rows * len, 0.0);
        self.shape[0] = rows;
    }
}

/// Which runtime runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// ONNX Runtime when its library is found, tract otherwise.
    #[default]
    Auto,
    /// ONNX Runtime; an error when its library is not found.
    Ort,
    /// tract, the pure-Rust runtime.
    Tract,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "ort" | "onnxruntime" => Ok(Self::Ort),
            "tract" => Ok(Self::Tract),
            other => Err(format!("unknown backend {other:?}: expected auto, ort or tract")),
        }
    }
}

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Which runtime to use.
    pub kind: BackendKind,
    /// Threads inside one run (ONNX Runtime's intra-op threads). Default 1: parallelism comes
    /// from running one instance per core.
    pub intra_op_threads: usize,
    /// An explicit ONNX Runtime library; otherwise [`find_onnxruntime`] looks for one.
    pub onnxruntime_path: Option<PathBuf>,
    /// Intermediate tensors to expose as extra outputs, after the model's own (for example a
    /// backbone stage read by sketches), so one forward pass serves both.
    pub extra_outputs: Vec<String>,
    /// Instances the caller is about to ask for. ONNX Runtime builds their sessions side by side
    /// while loading, instead of one after the other; a hint, not a limit.
    pub instances: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            kind: BackendKind::Auto,
            intra_op_threads: 1,
            onnxruntime_path: None,
            extra_outputs: Vec::new(),
            instances: 1,
        }
    }
}

/// The folder holding a model file, where its external data (weights the file keeps beside it)
/// lies: both runtimes are given the model's bytes, and would otherwise look in the working folder.
fn model_folder(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The model file's bytes, with `extra` tensors appended to the graph's outputs.
///
/// Only the tensor names are decoded; the weights are skipped, not copied. The new outputs go
/// on as a second, partial `ModelProto` after the file's bytes: protobuf parsers merge a
/// repeated message field's occurrences, so the graph's `output` list gains the new entries and
/// nothing else changes. Decoding and re-encoding the whole model copied its weights twice.
fn model_bytes(path: &Path, extra: &[String]) -> Result<Vec<u8>> {
    use prost::Message;
    use tract_onnx::pb;
    let load = |reason: String| BackendError::Load { path: path.to_owned(), reason };
    let mut bytes = std::fs::read(path).map_err(|e| load(e.to_string()))?;
    if extra.is_empty() {
        return Ok(bytes);
    }
    let names = ModelNames::decode(bytes.as_slice()).map_err(|e| load(format!("not an ONNX model: {e}")))?;
    let graph = names.graph.ok_or_else(|| load("the model has no graph".into()))?;
    let mut added = Vec::new();
    for name in extra {
        if graph.output.iter().any(|o| &o.name == name) || added.iter().any(|v: &pb::ValueInfoProto| &v.name == name) {
            continue;
        }
        if !graph.node.iter().any(|n| n.output.iter().any(|o| o == name)) {
            return Err(BackendError::Unsupported(format!("the model has no tensor named {name:?} to expose")));
        }
        let float = pb::type_proto::Value::TensorType(pb::type_proto::Tensor { elem_type: 1, shape: None });
        added.push(pb::ValueInfoProto {
            name: name.clone(),
            r#type: Some(pb::TypeProto { value: Some(float), denotation: String::new() }),
            doc_string: String::new(),
        });
    }
    if !added.is_empty() {
        let graph = pb::GraphProto { output: added, ..Default::default() };
        pb::ModelProto { graph: Some(graph), ..Default::default() }.encode(&mut bytes).expect("a Vec grows");
    }
    Ok(bytes)
}

/// The fields of an ONNX `ModelProto` that name its tensors (same tags); decoding skips the rest.
#[derive(Clone, PartialEq, prost::Message)]
struct ModelNames {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphNames>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GraphNames {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeNames>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueName>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeNames {
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueName {
    #[prost(string, tag = "1")]
    name: String,
}

/// One instance of a loaded model, owned by one thread.
pub trait Backend: Send {
    /// Runs one batch. `input`'s shape must fit the model's only input; the outputs come back in
    /// the model's output order, each with the batch as its first axis.
    fn run(&mut self, input: &Tensor) -> Result<Vec<Output>>;
}

/// A loaded model: its description and a factory for per-thread instances.
pub trait Model: Send + Sync + fmt::Debug {
    /// Inputs and outputs as declared.
    fn info(&self) -> &ModelInfo;
    /// The runtime's name, for logs and reports (`onnxruntime 1.32.0`, `tract 0.23`).
    fn runtime(&self) -> String;
    /// A new instance for one worker thread.
    fn instance(&self) -> Result<Box<dyn Backend>>;
}

/// Loads an ONNX model with the runtime `options.kind` asks for.
///
/// With [`BackendKind::Auto`], a missing ONNX Runtime library is not an error: the reason is
/// logged and tract is used.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Arc<dyn Model>> {
    if !path.is_file() {
        return Err(BackendError::Load { path: path.to_owned(), reason: "no such file".into() });
    }
    let bytes = model_bytes(path, &options.extra_outputs)?;
    match options.kind {
        BackendKind::Tract => Ok(Arc::new(tract::TractModel::load(path, &bytes)?)),
        BackendKind::Ort => Ok(Arc::new(onnxruntime::OrtModel::load(path, bytes, options)?)),
        BackendKind::Auto => match onnxruntime::OrtModel::load(path, bytes.clone(), options) {
            Ok(m) => Ok(Arc::new(m)),
            Err(BackendError::RuntimeUnavailable(why)) => {
                tracing::warn!("ONNX Runtime not found ({why}); using tract, which is slower");
                Ok(Arc::new(tract::TractModel::load(path, &bytes)?))
            }
            Err(e) => Err(e),
        },
    }
}

/// An element type ferry feeds a model's input. Every batch is built as `f32` and converted on
/// its way into the runtime: half and double precision models get the same numbers rounded, and
/// integer models (TensorFlow exports that take `uint8` images) get whole pixel values, which
/// the caller must make integral (see [`InputType::integer_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputType {
    /// `float`.
    F32,
    /// `float16`.
    F16,
    /// `double`.
    F64,
    /// `uint8`.
    U8,
    /// `int8`.
    I8,
    /// `uint16`.
    U16,
    /// `int16`.
    I16,
    /// `int32`.
    I32,
    /// `int64`.
    I64,
}

impl InputType {
    /// The type ONNX calls `name` (as [`IoInfo::dtype`] gives it), when ferry feeds it.
    pub fn from_onnx(name: &str) -> Option<Self> {
        Some(match name {
            "float" => Self::F32,
            "float16" => Self::F16,
            "double" => Self::F64,
            "uint8" => Self::U8,
            "int8" => Self::I8,
            "uint16" => Self::U16,
            "int16" => Self::I16,
            "int32" => Self::I32,
            "int64" => Self::I64,
            _ => return None,
        })
    }

    /// The smallest and largest value of an integer type; `None` for floats.
    pub fn integer_range(self) -> Option<(f64, f64)> {
        Some(match self {
            Self::F32 | Self::F16 | Self::F64 => return None,
            Self::U8 => (0.0, u8::MAX as f64),
            Self::I8 => (i8::MIN as f64, i8::MAX as f64),
            Self::U16 => (0.0, u16::MAX as f64),
            Self::I16 => (i16::MIN as f64, i16::MAX as f64),
            Self::I32 => (i32::MIN as f64, i32::MAX as f64),
            Self::I64 => (i64::MIN as f64, i64::MAX as f64),
        })
    }
}

/// The type of a model's only input, when ferry feeds it.
pub fn input_type(info: &ModelInfo) -> Result<InputType> {
    let [input] = info.inputs.as_slice() else {
        return Err(BackendError::Unsupported(format!(
            "the model has {} inputs; ferry feeds models with exactly one",
            info.inputs.len()
        )));
    };
    InputType::from_onnx(&input.dtype).ok_or_else(|| {
        BackendError::Unsupported(format!(
            "input {} is {}; ferry feeds float (32, 16 or 64-bit) and integer tensors",
            input.name, input.dtype
        ))
    })
}

/// Checks that a model has exactly one input of a type ferry feeds, and that `shape` fits it.
pub fn check_input(info: &ModelInfo, shape: &[usize]) -> Result<InputType> {
    let ty = input_type(info)?;
    let input = &info.inputs[0];
    if !input.accepts(shape) {
        return Err(BackendError::Shape {
            name: input.name.clone(),
            expected: input.shape_string(),
            got: shape.to_vec(),
        });
    }
    Ok(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_info_accepts_dynamic_axes_only() {
        let io = IoInfo { name: "x".into(), dtype: "float".into(), shape: vec![None, Some(3), Some(224), Some(224)] };
        assert!(io.accepts(&[7, 3, 224, 224]));
        assert!(!io.accepts(&[7, 3, 224, 225]));
        assert!(!io.accepts(&[3, 224, 224]));
        assert_eq!(io.shape_string(), "[?, 3, 224, 224]");
    }

    #[test]
    fn a_fixed_batch_is_read_and_filled_with_zero_rows() {
        let io = |batch| IoInfo { name: "x".into(), dtype: "float".into(), shape: vec![batch, Some(2)] };
        let info = |batch| ModelInfo { inputs: vec![io(batch)], outputs: vec![] };
        assert_eq!(info(None).fixed_batch(), None);
        assert_eq!(info(Some(1)).fixed_batch(), Some(1));
        assert_eq!(info(Some(4)).fixed_batch(), Some(4));
        let mut t = Tensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        t.pad_rows(4);
        assert_eq!(
            (t.shape.as_slice(), t.data.as_slice()),
            ([4, 2].as_slice(), [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0].as_slice())
        );
        t.pad_rows(3);
        assert_eq!(t.shape, [4, 2], "never shrinks");
    }

    #[test]
    fn check_input_names_the_mismatch() {
        let info = ModelInfo {
            inputs: vec![IoInfo { name: "x".into(), dtype: "float".into(), shape: vec![None, Some(3)] }],
            outputs: vec![],
        };
        let err = check_input(&info, &[1, 4]).unwrap_err().to_string();
        assert!(err.contains("[1, 4]") && err.contains("[?, 3]"), "{err}");
        let typed = |dtype: &str| ModelInfo {
            inputs: vec![IoInfo { name: "x".into(), dtype: dtype.into(), shape: vec![None, Some(3)] }],
            outputs: vec![],
        };
        assert_eq!(check_input(&typed("uint8"), &[2, 3]).unwrap(), InputType::U8);
        assert_eq!(check_input(&typed("float16"), &[2, 3]).unwrap(), InputType::F16);
        let err = check_input(&typed("string"), &[2, 3]).unwrap_err().to_string();
        assert!(err.contains("input x is string; ferry feeds float"), "{err}");
    }
}
