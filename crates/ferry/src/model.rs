//! A model as the user names it: an `.onnx` file, or a directory that describes itself.
//!
//! A directory holds `model.onnx`, an optional `ferry.toml` (how to turn inputs into the model's
//! tensor, and how to read its outputs) and an optional `labels.txt` (one class name per line, in
//! output order). It plays the part of a TF Serving model folder or a SageMaker `model.tar.gz`:
//! everything needed to run the model travels with it, so the command line stays short.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading a model directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Neither an `.onnx` file nor a directory holding `model.onnx`.
    #[error("{0}: not an .onnx file or a directory holding model.onnx")]
    NotFound(PathBuf),
    /// `ferry.toml` exists but cannot be read or is invalid.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// How an image becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    /// Resize before cropping: one number resizes the short side to it (keeping the aspect
    /// ratio), `[h, w]` resizes to exactly that. Absent: resize straight to the model's size.
    #[serde(default)]
    pub resize: Option<Resize>,
    /// Centre crop `[h, w]` after resizing.
    #[serde(default)]
    pub crop: Option<[u32; 2]>,
    /// Pixels are divided by this before `mean`/`std` are applied; absent, 255 for a model that
    /// takes floats and 1 for one that takes integers (see [`ImageInput::for_model`]).
    #[serde(default)]
    pub scale: Option<f32>,
    /// Mean subtracted after scaling: one per channel (red, green, blue), or one for all.
    #[serde(default = "zero")]
    pub mean: Vec<f32>,
    /// Standard deviation divided by last, like `mean`.
    #[serde(default = "one")]
    pub std: Vec<f32>,
    /// Channels the model expects; absent, read from the model (see [`ImageInput::for_model`]).
    #[serde(default)]
    pub channels: Option<Channels>,
    /// Tensor layout the model expects; absent, read from the model (see [`ImageInput::for_model`]).
    #[serde(default)]
    pub layout: Option<Layout>,
}

impl Default for ImageInput {
    fn default() -> Self {
        Self { resize: None, crop: None, scale: None, mean: zero(), std: one(), channels: None, layout: None }
    }
}

impl ImageInput {
    /// This pre-processing with its layout, channels and scale settled for `info`'s input, each as
    /// written, else read from the model. Layout: channels last when the input's last axis is 3
    /// or 1 and its second is neither (`[N, 224, 224, 3]`, as TensorFlow exports declare it),
    /// else channels first. Channels: greyscale when the channel axis is 1, else RGB. Scale: 1
    /// when the input takes integers (the pixels as they are, as a `uint8` image input of a
    /// TensorFlow export expects them), else 255.
    pub fn for_model(&self, info: &ferry_backend::ModelInfo) -> Self {
        let integer = info
            .inputs
            .first()
            .and_then(|i| ferry_backend::InputType::from_onnx(&i.dtype))
            .is_some_and(|t| t.integer_range().is_some());
        let scale = Some(self.scale.unwrap_or(if integer { 1.0 } else { 255.0 }));
        let few = |c: &Option<usize>| matches!(c, Some(1 | 3));
        let inferred = match info.inputs.first().map(|i| i.shape.as_slice()) {
            Some([_, c, _, last]) if few(last) && !few(c) => Layout::Nhwc,
            _ => Layout::Nchw,
        };
        let settled = Self { layout: Some(self.layout.unwrap_or(inferred)), scale, ..self.clone() };
        let channels = match settled.declared_channels(info) {
            Some(1) => Channels::Gray,
            _ => Channels::Rgb,
        };
        Self { channels: Some(self.channels.unwrap_or(channels)), ..settled }
    }

    /// The height and width the model's first input declares for this layout, when both are fixed.
    pub fn declared_hw(&self, info: &ferry_backend::ModelInfo) -> Option<(u32, u32)> {
        info.inputs.first().and_then(|i| match (self.layout.unwrap_or_default(), i.shape.as_slice()) {
            (Layout::Nchw, [_, _, Some(h), Some(w)]) | (Layout::Nhwc, [_, Some(h), Some(w), _]) => {
                Some((*h as u32, *w as u32))
            }
            _ => None,
        })
    }

    /// The number of channels the model's first input declares for this layout, when fixed.
    pub fn declared_channels(&self, info: &ferry_backend::ModelInfo) -> Option<usize> {
        info.inputs.first().and_then(|i| match (self.layout.unwrap_or_default(), i.shape.as_slice()) {
            (Layout::Nchw, [_, c, _, _]) | (Layout::Nhwc, [_, _, _, c]) => *c,
            _ => None,
        })
    }
}

fn zero() -> Vec<f32> {
    vec![0.0]
}
fn one() -> Vec<f32> {
    vec![1.0]
}

/// A resize target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Resize {
    /// The short side becomes this many pixels.
    ShortSide(u32),
    /// Exactly `[h, w]`.
    Exact([u32; 2]),
}

/// The channels of the model's input, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    /// Red, green, blue.
    #[default]
    Rgb,
    /// Blue, green, red (Caffe and OpenCV models).
    Bgr,
    /// One channel of luma, `(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16` as Pillow's
    /// `convert("L")` computes it (ITU-R 601 weights).
    #[serde(alias = "grey")]
    Gray,
}

impl Channels {
    /// How many there are.
    pub fn count(self) -> usize {
        match self {
            Channels::Gray => 1,
            Channels::Rgb | Channels::Bgr => 3,
        }
    }

    /// The name ferry.toml gives them.
    pub fn name(self) -> &'static str {
        match self {
            Channels::Rgb => "rgb",
            Channels::Bgr => "bgr",
            Channels::Gray => "gray",
        }
    }
}

/// Tensor layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `[batch, channel, height, width]` (PyTorch).
    #[default]
    Nchw,
    /// `[batch, height, width, channel]` (TensorFlow).
    Nhwc,
}

/// How the model's outputs are read.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The output that holds class scores (for `softmax` and top-k); the first output if absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Apply a softmax to that output (for graphs that end in logits).
    #[serde(default)]
    pub softmax: bool,
    /// The output holding pooled features, read by sketches and never written to `.out`.
    #[serde(default)]
    pub features: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FerryToml {
    #[serde(default)]
    input: ImageInput,
    #[serde(default)]
    output: OutputSpec,
}

/// A model and what travels with it.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The model directory; `None` for a bare `.onnx` file.
    pub dir: Option<PathBuf>,
    /// The ONNX file.
    pub onnx: PathBuf,
    /// Input pre-processing.
    pub input: ImageInput,
    /// Output post-processing.
    pub output: OutputSpec,
    /// Class names in output order.
    pub labels: Option<Vec<String>>,
}

impl ModelDir {
    /// Reads `path`: an `.onnx` file (defaults for everything else) or a model directory.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        if path.is_file() {
            return Ok(Self {
                dir: None,
                onnx: path.to_owned(),
                input: ImageInput::default(),
                output: OutputSpec::default(),
                labels: None,
            });
        }
        let onnx = path.join("model.onnx");
        if !onnx.is_file() {
            return Err(ModelError::NotFound(path.to_owned()));
        }
        let toml_path = path.join("ferry.toml");
        let config: FerryToml = if toml_path.is_file() {
            let text = std::fs::read_to_string(&toml_path)
                .map_err(|e| ModelError::Config { path: toml_path.clone(), reason: e.to_string() })?;
            toml::from_str(without_bom(&text))
                .map_err(|e| ModelError::Config { path: toml_path.clone(), reason: e.to_string() })?
        } else {
            FerryToml::default()
        };
        let labels_path = path.join("labels.txt");
        let labels = if labels_path.is_file() {
            let text = std::fs::read_to_string(&labels_path)
                .map_err(|e| ModelError::Config { path: labels_path.clone(), reason: e.to_string() })?;
            Some(without_bom(&text).lines().map(|l| l.trim_end().to_string()).collect())
        } else {
            None
        };
        Ok(Self { dir: Some(path.to_owned()), onnx, input: config.input, output: config.output, labels })
    }
}

/// `text` without the byte-order mark some Windows editors put before UTF-8: it would become part
/// of the first class name, or a TOML syntax error.
fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_saved_with_a_byte_order_mark_and_crlf_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"x").unwrap();
        std::fs::write(dir.path().join("ferry.toml"), "\u{feff}[input]\r\nresize = 256\r\n").unwrap();
        std::fs::write(dir.path().join("labels.txt"), "\u{feff}tench\r\ngoldfish\r\n").unwrap();
        let m = ModelDir::open(dir.path()).unwrap();
        assert_eq!(m.input.resize, Some(Resize::ShortSide(256)));
        assert_eq!(m.labels, Some(vec!["tench".to_string(), "goldfish".to_string()]));
    }

    #[test]
    fn reads_a_full_ferry_toml() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"x").unwrap();
        std::fs::write(
            dir.path().join("ferry.toml"),
            "[input]\nresize = 256\ncrop = [224, 224]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n\
             channels = \"bgr\"\nlayout = \"nhwc\"\n[output]\nname = \"prob\"\nsoftmax = true\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("labels.txt"), "cat\ndog\n").unwrap();
        let m = ModelDir::open(dir.path()).unwrap();
        assert_eq!(m.input.resize, Some(Resize::ShortSide(256)));
        assert_eq!(m.input.crop, Some([224, 224]));
        assert_eq!(m.input.channels, Some(Channels::Bgr));
        assert_eq!(m.input.layout, Some(Layout::Nhwc));
        assert_eq!(m.output.name.as_deref(), Some("prob"));
        assert!(m.output.softmax);
        assert_eq!(m.labels, Some(vec!["cat".to_string(), "dog".to_string()]));
    }

    #[test]
    fn rejects_unknown_keys_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"x").unwrap();
        std::fs::write(dir.path().join("ferry.toml"), "[input]\nresise = 256\n").unwrap();
        let err = ModelDir::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ferry.toml") && err.contains("resise"), "{err}");
    }

    #[test]
    fn unwritten_layout_and_channels_are_read_from_the_model() {
        let info = |shape: Vec<Option<usize>>| ferry_backend::ModelInfo {
            inputs: vec![ferry_backend::IoInfo { name: "x".into(), dtype: "float".into(), shape }],
            outputs: vec![],
        };
        let layout = |input: &ImageInput, shape| input.for_model(&info(shape)).layout;
        let unwritten = ImageInput::default();
        assert_eq!(layout(&unwritten, vec![None, Some(3), Some(224), Some(224)]), Some(Layout::Nchw));
        assert_eq!(layout(&unwritten, vec![None, Some(224), Some(224), Some(3)]), Some(Layout::Nhwc));
        assert_eq!(layout(&unwritten, vec![None, None, None, Some(3)]), Some(Layout::Nhwc));
        assert_eq!(layout(&unwritten, vec![None, Some(3), None, None]), Some(Layout::Nchw));
        assert_eq!(layout(&unwritten, vec![None, Some(3), Some(3), Some(3)]), Some(Layout::Nchw));
        let written = ImageInput { layout: Some(Layout::Nchw), ..ImageInput::default() };
        assert_eq!(layout(&written, vec![None, Some(224), Some(224), Some(3)]), Some(Layout::Nchw));

        let settled = |input: &ImageInput, shape| {
            let s = input.for_model(&info(shape));
            (s.layout.unwrap(), s.channels.unwrap())
        };
        let (grey, rgb) = (Channels::Gray, Channels::Rgb);
        assert_eq!(settled(&unwritten, vec![None, Some(1), Some(28), Some(28)]), (Layout::Nchw, grey));
        assert_eq!(settled(&unwritten, vec![None, Some(28), Some(28), Some(1)]), (Layout::Nhwc, grey));
        assert_eq!(settled(&unwritten, vec![None, None, None, Some(1)]), (Layout::Nhwc, grey));
        assert_eq!(settled(&unwritten, vec![None, Some(3), Some(224), Some(224)]), (Layout::Nchw, rgb));
        assert_eq!(settled(&unwritten, vec![None, None, None, None]), (Layout::Nchw, rgb));
        let bgr = ImageInput { channels: Some(Channels::Bgr), ..ImageInput::default() };
        assert_eq!(settled(&bgr, vec![None, Some(1), Some(28), Some(28)]), (Layout::Nchw, Channels::Bgr));
    }

    #[test]
    fn a_directory_without_model_onnx_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(ModelDir::open(dir.path()), Err(ModelError::NotFound(_))));
    }
}
