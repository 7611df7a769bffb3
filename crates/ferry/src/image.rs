//! `application/x-image`: JPEG, PNG, WebP, GIF, BMP or TIFF bytes to the model's input tensor, in
//! one pass. JPEGs go through libjpeg-turbo, the rest through the `image` crate.
//!
//! The usual recipe (decode at full size, resize the short side, centre crop, normalise) spends
//! most of its time decoding pixels that the resize then throws away. Here the crop is mapped
//! back into source coordinates, so the resize reads only the pixels that survive; and a JPEG
//! that is at least four times the size needed is decoded at 1/2, 1/4 or 1/8 scale straight from
//! its DCT coefficients (libjpeg-turbo), which skips most of the inverse DCT and colour
//! conversion while leaving the resize at least a factor of two to reduce.
//! Normalisation is a table lookup per channel, and a separate step ([`ImagePlan::normalise`]):
//! a job's decode threads hand on 8-bit pixels, a quarter of the bytes of the float tensor, and
//! the model thread normalises them straight into its batch. Everything that allocates lives in
//! an [`ImageDecoder`], one per worker thread, and is reused across images.
//!
//! Format is decided by the bytes, not the name: a `.jpg` that is really a PNG still decodes, and
//! anything else fails with what it starts with.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::jpeg::{Decompressor, Region};
use crate::model::{Channels, ImageInput, Layout, Resize};

/// Why one image could not become a tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageError {
    /// Zero bytes.
    #[error("empty object (0 bytes)")]
    Empty,
    /// None of the formats read: what it looks like, when that is known, else its first bytes.
    #[error("not a JPEG, PNG, WebP, GIF, BMP or TIFF image ({0})")]
    UnknownFormat(String),
    /// Declared dimensions over the pixel limit (an "image bomb").
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} (--max-image-pixels)")]
    TooLarge {
        /// Declared width.
        width: u64,
        /// Declared height.
        height: u64,
        /// Their product.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The decoder failed: corrupt or truncated data.
    #[error("invalid {format}: {reason}")]
    Corrupt {
        /// `JPEG`, `PNG`, `WebP`, `GIF`, `BMP` or `TIFF`.
        format: &'static str,
        /// The decoder's message.
        reason: String,
    },
}

/// Errors in the pre-processing configuration, found before any image is read.
#[derive(Debug, thiserror::Error)]
#[error("image pre-processing: {0}")]
pub struct PlanError(String);

/// The fixed part of pre-processing, shared by every decoder of a job.
#[derive(Debug, Clone)]
pub struct ImagePlan {
    resize: Option<Resize>,
    out: (u32, u32),
    crop: Option<(u32, u32)>,
    lut: [[f32; 256]; 3],
    channels: Channels,
    layout: Layout,
    max_pixels: u64,
    dct_scaling: bool,
    partial: bool,
}

/// Where to read from in the source and what size to write.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    /// Size after the resize step, before cropping.
    resized: (u32, u32),
    /// The region of the source that becomes the output: left, top, width, height.
    src_box: (f64, f64, f64, f64),
}

impl ImagePlan {
    /// The plan for `spec` feeding the model `info` describes: the layout settled from the model
    /// when `spec` does not give it ([`ImageInput::for_model`]), and the model's declared height
    /// and width used when `spec` gives no size of its own.
    pub fn for_model(spec: &ImageInput, info: &ferry_backend::ModelInfo, max_pixels: u64) -> Result<Self, PlanError> {
        let spec = spec.for_model(info);
        let channels = spec.channels.unwrap_or_default();
        if let Some(c) = spec.declared_channels(info).filter(|&c| c != channels.count()) {
            return Err(PlanError(format!(
                "the model's input takes {c} channel{}; channels = \"{}\" makes {}",
                if c == 1 { "" } else { "s" },
                channels.name(),
                channels.count()
            )));
        }
        let plan = Self::new(&spec, spec.declared_hw(info), max_pixels)?;
        let input = info.inputs.first();
        if let Some((input, (lo, hi))) =
            input.and_then(|i| Some((i, ferry_backend::InputType::from_onnx(&i.dtype)?.integer_range()?)))
        {
            // Every value the tensor can hold comes from the tables, so checking them checks all.
            let whole = |x: f32| x.fract() == 0.0 && (lo..=hi).contains(&(x as f64));
            if let Some((v, x)) = plan.lut.iter().flat_map(|t| t.iter().enumerate()).find(|(_, &x)| !whole(x)) {
                return Err(PlanError(format!(
                    "the model's input {} is {}, which holds whole numbers from {lo} to {hi}; ferry.toml's \
                     scale, mean and std make pixel value {v} into {x}",
                    input.name, input.dtype
                )));
            }
        }
        Ok(plan)
    }

    /// Builds the plan for `spec`; `model_hw` is the model's input height and width when the model
    /// declares them, used when `spec` gives no size of its own.
    pub fn new(spec: &ImageInput, model_hw: Option<(u32, u32)>, max_pixels: u64) -> Result<Self, PlanError> {
        let out = match (spec.crop, spec.resize, model_hw) {
            (Some([h, w]), _, _) => (w, h),
            (None, Some(Resize::Exact([h, w])), _) => (w, h),
            (None, _, Some((h, w))) => (w, h),
            (None, _, None) => {
                return Err(PlanError(
                    "the model's input size is dynamic: give `crop` or `resize = [h, w]` in ferry.toml".into(),
                ))
            }
        };
        if out.0 == 0 || out.1 == 0 {
            return Err(PlanError(format!("output size {}x{} is empty", out.0, out.1)));
        }
        if let (Some([ch, cw]), Some(r)) = (spec.crop, spec.resize) {
            let fits = match r {
                Resize::ShortSide(s) => s >= ch && s >= cw,
                Resize::Exact([h, w]) => h >= ch && w >= cw,
            };
            if !fits {
                return Err(PlanError(format!("crop {ch}x{cw} is larger than the resize {r:?}")));
            }
        }
        if let Some((h, w)) = model_hw {
            if (w, h) != out {
                return Err(PlanError(format!(
                    "ferry.toml makes {}x{} images but the model takes {h}x{w}",
                    out.1, out.0
                )));
            }
        }
        let scale = spec.scale.unwrap_or(255.0);
        if scale == 0.0 || spec.std.contains(&0.0) {
            return Err(PlanError("scale and std must not be zero".into()));
        }
        let channels = spec.channels.unwrap_or_default();
        for (name, values) in [("mean", &spec.mean), ("std", &spec.std)] {
            if values.len() != 1 && values.len() != channels.count() {
                let takes = if channels.count() == 1 { "one value" } else { "one value, or one per channel" };
                return Err(PlanError(format!(
                    "{name} has {} values; channels = \"{}\" takes {takes}",
                    values.len(),
                    channels.name()
                )));
            }
        }
        // Mean and std of source channel c (red, green, blue; or luma, which takes table 0).
        let of = |values: &[f32], c: usize| values[c.min(values.len() - 1)] as f64;
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let x = v as f64 / scale as f64;
                *slot = ((x - of(&spec.mean, c)) / of(&spec.std, c)) as f32;
            }
        }
        Ok(Self {
            resize: spec.resize,
            out,
            crop: spec.crop.map(|[h, w]| (w, h)),
            lut,
            channels,
            layout: spec.layout.unwrap_or_default(),
            max_pixels,
            dct_scaling: true,
            partial: true,
        })
    }

    /// Turns DCT-domain downscaling of large JPEGs on or off (on by default).
    pub fn with_dct_scaling(mut self, on: bool) -> Self {
        self.dct_scaling = on;
        self
    }

    /// Turns partial JPEG decoding (only the region the crop reads) on or off (on by default). The
    /// result is the same either way; off exists to measure it.
    pub fn with_partial_decoding(mut self, on: bool) -> Self {
        self.partial = on;
        self
    }

    /// The shape of one image's tensor (no batch axis).
    pub fn item_shape(&self) -> Vec<usize> {
        let (w, h, c) = (self.out.0 as usize, self.out.1 as usize, self.channels.count());
        match self.layout {
            Layout::Nchw => vec![c, h, w],
            Layout::Nhwc => vec![h, w, c],
        }
    }

    /// Number of `f32` values in one image's tensor.
    pub fn item_len(&self) -> usize {
        self.out.0 as usize * self.out.1 as usize * self.channels.count()
    }

    /// Bytes of the 8-bit RGB pixels [`ImageDecoder::decode_pixels`] writes.
    pub fn pixels_len(&self) -> usize {
        self.out.0 as usize * self.out.1 as usize * 3
    }

    /// The model's input for one image: `pixels` ([`ImagePlan::pixels_len`] bytes, RGB)
    /// normalised into `out` ([`ImagePlan::item_len`] floats) in the model's channels and layout.
    pub fn normalise(&self, pixels: &[u8], out: &mut [f32]) {
        assert_eq!(pixels.len(), self.pixels_len(), "pixels of the planned size");
        assert_eq!(out.len(), self.item_len(), "the planned tensor");
        let order = match self.channels {
            Channels::Rgb => [0, 1, 2],
            Channels::Bgr => [2, 1, 0],
            Channels::Gray => {
                // One channel is the same in either layout.
                let lut = &self.lut[0];
                for (o, p) in out.iter_mut().zip(pixels.chunks_exact(3)) {
                    let luma = (19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000) >> 16;
                    *o = lut[luma as usize];
                }
                return;
            }
        };
        let plane = pixels.len() / 3;
        match self.layout {
            Layout::Nchw => {
                for (out, c) in out.chunks_exact_mut(plane).zip(order) {
                    let lut = &self.lut[c];
                    for (o, p) in out.iter_mut().zip(pixels.chunks_exact(3)) {
                        *o = lut[p[c] as usize];
                    }
                }
            }
            Layout::Nhwc => {
                for (o, p) in out.chunks_exact_mut(3).zip(pixels.chunks_exact(3)) {
                    for (o, c) in o.iter_mut().zip(order) {
                        *o = self.lut[c][p[c] as usize];
                    }
                }
            }
        }
    }

    fn geometry(&self, w: u32, h: u32) -> Geometry {
        let resized = match self.resize {
            // torchvision's Resize(int): the long side is truncated, not rounded.
            Some(Resize::ShortSide(s)) if w <= h => (s, (s as u64 * h as u64 / w as u64) as u32),
            Some(Resize::ShortSide(s)) => ((s as u64 * w as u64 / h as u64) as u32, s),
            Some(Resize::Exact([rh, rw])) => (rw, rh),
            None => self.out,
        };
        let (left, top) = match self.crop {
            // torchvision's CenterCrop: round half to even of the margin.
            Some((cw, ch)) => (
                ((resized.0 as f64 - cw as f64) / 2.0).round_ties_even(),
                ((resized.1 as f64 - ch as f64) / 2.0).round_ties_even(),
            ),
            None => (0.0, 0.0),
        };
        // Multiplied before dividing, so a box that spans the whole image is exactly its size,
        // and clamped, so one rounding up never reaches past the edge (which the resizer refuses).
        let (w, h, rw, rh) = (w as f64, h as f64, resized.0 as f64, resized.1 as f64);
        let (x, y) = (left * w / rw, top * h / rh);
        let (bw, bh) = ((self.out.0 as f64 * w / rw).min(w - x), (self.out.1 as f64 * h / rh).min(h - y));
        Geometry { resized, src_box: (x, y, bw, bh) }
    }

    /// The coarsest DCT scale, as `1/denominator`, that still leaves [`REDUCING_GAP`] times the
    /// resized size.
    fn dct_denominator(&self, w: u32, h: u32) -> usize {
        if !self.dct_scaling {
            return 1;
        }
        let (rw, rh) = self.geometry(w, h).resized;
        let (min_w, min_h) = (rw as usize * REDUCING_GAP, rh as usize * REDUCING_GAP);
        [8, 4, 2].into_iter().find(|&d| scaled(w as usize, d) >= min_w && scaled(h as usize, d) >= min_h).unwrap_or(1)
    }

    /// The part of a `w`x`h` image that resampling into the output reads, widened so the left edge
    /// falls on a multiple of `align` (the scaled iMCU width, for partial JPEG decoding).
    fn region(&self, w: usize, h: usize, align: usize) -> Region {
        let (l, t, bw, bh) = self.geometry(w as u32, h as u32).src_box;
        // The bilinear filter reaches one output pixel's worth of source pixels past the box.
        let mx = (bw / self.out.0 as f64).ceil() + 2.0;
        let my = (bh / self.out.1 as f64).ceil() + 2.0;
        let mut x0 = (l - mx).floor().max(0.0) as usize;
        x0 -= x0 % align.max(1);
        let y0 = (t - my).floor().max(0.0) as usize;
        let x1 = ((l + bw + mx).ceil() as usize).min(w);
        let y1 = ((t + bh + my).ceil() as usize).min(h);
        (x0, y0, x1 - x0, y1 - y0)
    }

    fn check_pixels(&self, width: u64, height: u64) -> Result<(), ImageError> {
        let pixels = width * height;
        if pixels > self.max_pixels {
            return Err(ImageError::TooLarge { width, height, pixels, limit: self.max_pixels });
        }
        Ok(())
    }
}

const MAX_JPEG_SCANS: u32 = 500;

/// A JPEG is decoded at a DCT scale only if that leaves at least this many times the resized
/// size, so the antialiased resize still does the last reduction (Pillow's `thumbnail` keeps the
/// same gap before its own DCT-scaled `draft`). Scaling straight down to about the resized size
/// swaps the resize's filter for the DCT's, which is sharper: over the 1,000 bench JPEGs,
/// MobileNetV2's top class then differed from Python onnxruntime + Pillow's for 3.3% of the
/// images (10.6% of those decoded at 1/2), against 1.4% with this gap or at full size.
const REDUCING_GAP: usize = 2;

/// Size of a dimension decoded at `1/denominator` scale (libjpeg-turbo's TJSCALED).
fn scaled(dim: usize, denominator: usize) -> usize {
    dim.div_ceil(denominator)
}

/// What a decoder left in its RGB buffer: `region` of a `full`-sized image.
struct Pixels {
    full: (usize, usize),
    region: Region,
}

/// What bytes ferry does not read look like, for the error: phones write HEIC, and a folder of
/// inputs collects PDFs and archives, which deserve a better answer than their first bytes.
fn unreadable(bytes: &[u8]) -> String {
    // ISO base media files (HEIF, AVIF, MP4) start with an `ftyp` box: size, "ftyp", major brand,
    // minor version, compatible brands.
    if bytes.get(4..8) == Some(b"ftyp") {
        let size = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        let brands: Vec<&[u8]> = bytes[8..size.clamp(8, bytes.len())]
            .chunks_exact(4)
            .enumerate()
            .filter(|(i, _)| *i != 1)
            .map(|(_, b)| b)
            .collect();
        let has = |names: &[&[u8; 4]]| brands.iter().any(|b| names.iter().any(|n| *b == &n[..]));
        if has(&[b"avif", b"avis"]) {
            return "an AVIF image".into();
        }
        if has(&[b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"]) {
            return "an HEIC/HEIF image, as phones write them: convert it first, e.g. with libheif's heif-convert"
                .into();
        }
        return "an MP4 or QuickTime file".into();
    }
    let named = match bytes {
        [b'%', b'P', b'D', b'F', ..] => Some("a PDF document"),
        [0x1f, 0x8b, ..] => Some("gzip-compressed data: give --compression gzip"),
        [b'P', b'K', 3, 4, ..] => Some("a ZIP archive"),
        _ if bytes.get(257..262) == Some(b"ustar") => Some("a tar archive"),
        _ => None,
    };
    if let Some(named) = named {
        return named.into();
    }
    if let Ok(f) = image::guess_format(bytes) {
        return format!("an image in {} format", format!("{f:?}").to_uppercase());
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).to_ascii_lowercase();
    if text.contains("<svg") {
        return "an SVG image, which is drawn, not decoded".into();
    }
    // Text (a JSON record, a CSV row, an earlier job's `.out`): its first characters say more
    // than its bytes.
    let head = &bytes[..bytes.len().min(64)];
    let text = match std::str::from_utf8(head) {
        Ok(t) => Some(t),
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok(),
        Err(_) => None,
    };
    if let Some(t) = text.filter(|t| !t.trim().is_empty() && t.chars().all(|c| !c.is_control() || c.is_whitespace())) {
        let start: String = t.chars().take(24).collect();
        return format!("text starting {start:?}");
    }
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("starts with bytes {}", head.join(" "))
}

/// Per-thread decoding state.
pub struct ImageDecoder {
    plan: ImagePlan,
    jpeg: Decompressor,
    resizer: Resizer,
    rgb: Vec<u8>,
    /// Resized pixels, for [`ImageDecoder::decode`].
    pixels: Vec<u8>,
}

impl std::fmt::Debug for ImageDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageDecoder").field("plan", &self.plan).finish_non_exhaustive()
    }
}

impl ImageDecoder {
    /// A decoder for `plan`.
    pub fn new(plan: ImagePlan) -> Self {
        // A progressive JPEG with thousands of tiny scans is a CPU bomb; real encoders write ~10.
        Self {
            plan,
            jpeg: Decompressor::new(MAX_JPEG_SCANS),
            resizer: Resizer::new(),
            rgb: Vec::new(),
            pixels: Vec::new(),
        }
    }

    /// Decodes `bytes` and writes the normalised tensor to `out`, replacing what it held.
    pub fn decode(&mut self, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), ImageError> {
        let mut pixels = std::mem::take(&mut self.pixels);
        let result = self.decode_pixels(bytes, &mut pixels);
        if result.is_ok() {
            // `normalise` writes every float, so the old values need no clearing.
            out.resize(self.plan.item_len(), 0.0);
            self.plan.normalise(&pixels, out);
        }
        self.pixels = pixels;
        result
    }

    /// Decodes `bytes` and writes the resized and cropped 8-bit RGB pixels to `out` (resized to
    /// [`ImagePlan::pixels_len`]), for [`ImagePlan::normalise`] to make a tensor of.
    pub fn decode_pixels(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ImageError> {
        let pixels = match bytes {
            [] => return Err(ImageError::Empty),
            [0xFF, 0xD8, 0xFF, ..] => self.decode_jpeg(bytes)?,
            [0x89, b'P', b'N', b'G', ..] => self.decode_other(bytes, image::ImageFormat::Png, "PNG")?,
            _ => match image::guess_format(bytes) {
                Ok(f @ image::ImageFormat::WebP) => self.decode_other(bytes, f, "WebP")?,
                Ok(f @ image::ImageFormat::Gif) => self.decode_other(bytes, f, "GIF")?,
                Ok(f @ image::ImageFormat::Bmp) => self.decode_other(bytes, f, "BMP")?,
                Ok(f @ image::ImageFormat::Tiff) => self.decode_other(bytes, f, "TIFF")?,
                _ => return Err(ImageError::UnknownFormat(unreadable(bytes))),
            },
        };
        self.resize(pixels, out);
        Ok(())
    }

    fn decode_jpeg(&mut self, bytes: &[u8]) -> Result<Pixels, ImageError> {
        let corrupt = |reason: String| ImageError::Corrupt { format: "JPEG", reason };
        let header = self.jpeg.header(bytes).map_err(corrupt)?;
        self.plan.check_pixels(header.width as u64, header.height as u64)?;
        if header.cmyk {
            // libjpeg-turbo cannot convert these to RGB.
            return self.decode_other(bytes, image::ImageFormat::Jpeg, "JPEG");
        }
        let d = self.plan.dct_denominator(header.width as u32, header.height as u32);
        let full = (scaled(header.width, d), scaled(header.height, d));
        let region = if self.plan.partial && header.mcu_width > 0 {
            self.plan.region(full.0, full.1, scaled(header.mcu_width, d))
        } else {
            (0, 0, full.0, full.1)
        };
        self.jpeg.decode(bytes, (1, d), region, &mut self.rgb).map_err(corrupt)?;
        Ok(Pixels { full, region })
    }

    fn decode_other(
        &mut self,
        bytes: &[u8],
        format: image::ImageFormat,
        name: &'static str,
    ) -> Result<Pixels, ImageError> {
        let corrupt = |e: image::ImageError| ImageError::Corrupt { format: name, reason: e.to_string() };
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let (w, h) = reader.into_dimensions().map_err(corrupt)?;
        self.plan.check_pixels(w as u64, h as u64)?;
        reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(self.plan.max_pixels.saturating_mul(16));
        reader.limits(limits);
        let rgb = reader.decode().map_err(corrupt)?.into_rgb8();
        self.rgb.clear();
        self.rgb.extend_from_slice(rgb.as_raw());
        let (w, h) = (w as usize, h as usize);
        Ok(Pixels { full: (w, h), region: (0, 0, w, h) })
    }

    fn resize(&mut self, pixels: Pixels, out: &mut Vec<u8>) {
        let plan = &self.plan;
        let g = plan.geometry(pixels.full.0 as u32, pixels.full.1 as u32);
        let (x0, y0, w, h) = pixels.region;
        let src =
            ImageRef::new(w as u32, h as u32, &self.rgb, PixelType::U8x3).expect("decoded buffer matches its size");
        out.resize(plan.pixels_len(), 0);
        let mut dst = Image::from_slice_u8(plan.out.0, plan.out.1, out, PixelType::U8x3)
            .expect("the output buffer holds the output size");
        let (left, top, bw, bh) = g.src_box;
        let options = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
            .crop(left - x0 as f64, top - y0 as f64, bw, bh)
            .use_alpha(false);
        self.resizer.resize(&src, &mut dst, &options).expect("source and destination are both RGB8");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imagenet() -> ImageInput {
        ImageInput {
            resize: Some(Resize::ShortSide(256)),
            crop: Some([224, 224]),
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            ..Default::default()
        }
    }

    fn plan() -> ImagePlan {
        ImagePlan::new(&imagenet(), Some((224, 224)), 1 << 28).unwrap()
    }

    /// A one-channel model gets Pillow's luma, with one mean and std; the channel count is
    /// checked against the model before any image is read.
    #[test]
    fn a_greyscale_input_gets_luma_and_its_settings_are_checked() {
        let info = |c: usize| ferry_backend::ModelInfo {
            inputs: vec![ferry_backend::IoInfo {
                name: "x".into(),
                dtype: "float".into(),
                shape: vec![None, Some(c), Some(2), Some(2)],
            }],
            outputs: vec![],
        };
        let spec = ImageInput { mean: vec![0.5], std: vec![0.25], ..ImageInput::default() };
        let plan = ImagePlan::for_model(&spec, &info(1), 1 << 28).unwrap();
        assert_eq!(plan.item_shape(), vec![1, 2, 2]);
        let pixels = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 200, 30];
        let mut out = vec![0.0; 4];
        plan.normalise(&pixels, &mut out);
        // Pillow's convert("L") of these pixels: 76, 150, 29 and 124.
        let expect = [76.0, 150.0, 29.0, 124.0].map(|l: f32| (l / 255.0 - 0.5) / 0.25);
        for (o, e) in out.iter().zip(expect) {
            assert!((o - e).abs() < 1e-6, "{out:?} against {expect:?}");
        }
        // One mean and std serve every channel of an RGB model as well.
        let rgb = ImagePlan::for_model(&spec, &info(3), 1 << 28).unwrap();
        assert_eq!(rgb.item_shape(), vec![3, 2, 2]);

        let written = ImageInput { channels: Some(Channels::Rgb), ..ImageInput::default() };
        let err = ImagePlan::for_model(&written, &info(1), 1 << 28).unwrap_err().to_string();
        assert!(err.contains("takes 1 channel; channels = \"rgb\" makes 3"), "{err}");
        let three = ImageInput { mean: vec![0.5; 3], ..ImageInput::default() };
        let err = ImagePlan::for_model(&three, &info(1), 1 << 28).unwrap_err().to_string();
        assert!(err.contains("mean has 3 values; channels = \"gray\" takes one value"), "{err}");
        let two = ImageInput { std: vec![0.5; 2], ..ImageInput::default() };
        let err = ImagePlan::for_model(&two, &info(3), 1 << 28).unwrap_err().to_string();
        assert!(err.contains("std has 2 values"), "{err}");
    }

    /// An integer input gets whole pixel values: scale 1 unless written, and settings that make
    /// fractions or values the type cannot hold are refused before any image is read.
    #[test]
    fn an_integer_input_gets_whole_pixel_values() {
        let info = |dtype: &str| ferry_backend::ModelInfo {
            inputs: vec![ferry_backend::IoInfo {
                name: "x".into(),
                dtype: dtype.into(),
                shape: vec![None, Some(2), Some(2), Some(3)],
            }],
            outputs: vec![],
        };
        let pixels = [0, 1, 2, 127, 128, 129, 200, 254, 255, 9, 99, 250];
        let run = |spec: &ImageInput, dtype: &str| {
            let plan = ImagePlan::for_model(spec, &info(dtype), 1 << 28)?;
            let mut out = vec![0.0; 12];
            plan.normalise(&pixels, &mut out);
            Ok::<_, PlanError>(out)
        };
        let bare = ImageInput::default();
        assert_eq!(run(&bare, "uint8").unwrap(), pixels.map(f32::from));
        assert_eq!(run(&bare, "float").unwrap(), pixels.map(|p| p as f32 / 255.0));
        // int8 with a zero point of 128, as quantised exports take it.
        let centred = ImageInput { mean: vec![128.0], ..ImageInput::default() };
        assert_eq!(run(&centred, "int8").unwrap(), pixels.map(|p| p as f32 - 128.0));
        let err = run(&centred, "uint8").unwrap_err().to_string();
        assert!(
            err.contains("x is uint8, which holds whole numbers from 0 to 255") && err.contains("0 into -128"),
            "{err}"
        );
        let scaled = ImageInput { scale: Some(255.0), ..ImageInput::default() };
        let err = run(&scaled, "int32").unwrap_err().to_string();
        assert!(err.contains("pixel value 1 into 0.003921"), "{err}");
    }

    /// The box a resize reads never reaches past the image, whatever the sizes: 224 · (457 / 224)
    /// is 457.00000000000006, which the resizer refused, so a bare 224 × 224 model failed one
    /// photo in eight.
    #[test]
    fn the_resampled_box_stays_inside_the_image() {
        let specs = [
            ImageInput::default(),
            ImageInput { resize: Some(Resize::Exact([300, 200])), ..ImageInput::default() },
            ImageInput { resize: Some(Resize::ShortSide(224)), crop: Some([224, 224]), ..ImageInput::default() },
            imagenet(),
        ];
        for spec in &specs {
            let plan = ImagePlan::new(
                spec,
                Some((224, 224)).filter(|_| spec.crop.is_none() && spec.resize.is_none()),
                1 << 30,
            )
            .unwrap();
            for (w, h) in (1..1500u32).step_by(7).flat_map(|w| [(w, 457), (457, w), (w, w + 1)]) {
                let (x, y, bw, bh) = plan.geometry(w, h).src_box;
                assert!(x >= 0.0 && y >= 0.0 && x + bw <= w as f64 && y + bh <= h as f64, "{spec:?} at {w}x{h}");
            }
        }
        // And the whole image decodes: a 457 × 318 JPEG through a bare 224 × 224 model.
        let rgb = image::RgbImage::from_fn(457, 318, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let mut jpeg = Vec::new();
        rgb.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        let plan = ImagePlan::new(&ImageInput::default(), Some((224, 224)), 1 << 30).unwrap();
        let mut out = Vec::new();
        ImageDecoder::new(plan).decode(&jpeg, &mut out).unwrap();
        assert_eq!(out.len(), 3 * 224 * 224);
    }

    #[test]
    fn geometry_follows_torchvision_resize_then_centre_crop() {
        // 451x300 (chelsea): short side 300 -> 256, long side int(256 * 451 / 300) = 384.
        let g = plan().geometry(451, 300);
        assert_eq!(g.resized, (384, 256));
        // Margins round((384 - 224) / 2) = 80 and 16, mapped back by 451/384 and 300/256.
        let (l, t, w, h) = g.src_box;
        assert!((l - 80.0 * 451.0 / 384.0).abs() < 1e-9);
        assert!((t - 16.0 * 300.0 / 256.0).abs() < 1e-9);
        assert!((w - 224.0 * 451.0 / 384.0).abs() < 1e-9);
        assert!((h - 224.0 * 300.0 / 256.0).abs() < 1e-9);
    }

    #[test]
    fn dct_scale_leaves_twice_the_resized_size() {
        let p = plan();
        assert_eq!(p.dct_denominator(451, 300), 1);
        // Short side 256 at 1/2 would be exactly the resized size: no.
        assert_eq!(p.dct_denominator(600, 512), 1);
        assert_eq!(p.dct_denominator(1200, 1024), 2);
        assert_eq!(p.dct_denominator(1200, 1020), 1);
        // 1/8 leaves 375 (under 512), 1/4 leaves 750.
        assert_eq!(p.dct_denominator(4000, 3000), 4);
        assert_eq!(p.dct_denominator(8192, 4096), 8);
        // The gap is on the resized size, whichever side is short.
        assert_eq!(p.dct_denominator(3000, 4000), 4);
        assert_eq!(p.clone().with_dct_scaling(false).dct_denominator(4000, 3000), 1);
    }

    #[test]
    fn the_region_covers_the_crop_and_its_filter_reach() {
        let p = plan();
        let (l, t, bw, bh) = p.geometry(640, 480).src_box;
        let (x, y, w, h) = p.region(640, 480, 16);
        assert_eq!(x % 16, 0);
        assert!((x as f64) < l - 1.0 && (y as f64) < t - 1.0, "{x} {y} vs {l} {t}");
        assert!(((x + w) as f64) > l + bw + 1.0 && ((y + h) as f64) > t + bh + 1.0);
        assert!(w * h < 640 * 480 * 3 / 4, "a 4:3 centre crop needs well under the whole image");
    }

    fn jpeg(w: u32, h: u32, quality: u8) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 + y) as u8, (y * 3) as u8, ((x ^ y) * 5) as u8]));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(&img).unwrap();
        bytes
    }

    #[test]
    fn partial_decoding_gives_the_same_tensor_as_full_decoding() {
        for (w, h) in [(640, 480), (480, 640), (333, 517), (1200, 700), (260, 256)] {
            let bytes = jpeg(w, h, 85);
            let mut full = Vec::new();
            let mut part = Vec::new();
            ImageDecoder::new(plan().with_partial_decoding(false)).decode(&bytes, &mut full).unwrap();
            ImageDecoder::new(plan()).decode(&bytes, &mut part).unwrap();
            let worst = full.iter().zip(&part).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert_eq!(worst, 0.0, "{w}x{h}: differs by up to {worst}");
        }
    }

    #[test]
    fn plan_rejects_sizes_that_do_not_fit_the_model() {
        let err = ImagePlan::new(&imagenet(), Some((299, 299)), 1 << 28).unwrap_err().to_string();
        assert!(err.contains("299"), "{err}");
        let spec = ImageInput { resize: Some(Resize::ShortSide(200)), ..imagenet() };
        assert!(ImagePlan::new(&spec, None, 1 << 28).is_err());
        assert!(ImagePlan::new(&ImageInput::default(), None, 1 << 28).is_err());
    }

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn a_flat_colour_normalises_per_channel_in_nchw_and_nhwc() {
        let bytes = png(300, 400, |_, _| [255, 0, 128]);
        let mut out = Vec::new();
        let mut d = ImageDecoder::new(plan());
        d.decode(&bytes, &mut out).unwrap();
        assert_eq!(out.len(), 3 * 224 * 224);
        let expect = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128.0 / 255.0 - 0.406) / 0.225];
        for (c, e) in expect.iter().enumerate() {
            let plane = &out[c * 224 * 224..(c + 1) * 224 * 224];
            assert!(plane.iter().all(|v| (v - e).abs() < 1e-5), "channel {c}");
        }
        let spec = ImageInput { layout: Some(Layout::Nhwc), channels: Some(Channels::Bgr), ..imagenet() };
        let mut d = ImageDecoder::new(ImagePlan::new(&spec, None, 1 << 28).unwrap());
        d.decode(&bytes, &mut out).unwrap();
        assert!((out[0] - ((128.0 / 255.0 - 0.406) / 0.225)).abs() < 1e-5, "BGR puts blue first");
        assert!((out[2] - expect[0]).abs() < 1e-5);
    }

    #[test]
    fn the_centre_crop_keeps_the_centre() {
        // A wide image whose left and right quarters are black and whose middle is white: the
        // centre crop of a 256-high resize sees only white.
        let bytes = png(800, 200, |x, _| if (200..600).contains(&x) { [255; 3] } else { [0; 3] });
        let spec = ImageInput { mean: vec![0.0; 3], std: vec![1.0; 3], ..imagenet() };
        let mut d = ImageDecoder::new(ImagePlan::new(&spec, None, 1 << 28).unwrap());
        let mut out = Vec::new();
        d.decode(&bytes, &mut out).unwrap();
        assert!(out.iter().all(|v| *v > 0.99), "min {}", out.iter().cloned().fold(f32::MAX, f32::min));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let mut d = ImageDecoder::new(plan());
        let mut out = Vec::new();
        assert_eq!(d.decode(b"", &mut out), Err(ImageError::Empty));
        let err = d.decode(b"\0\0\0\x01Bud1\0\0", &mut out).unwrap_err().to_string();
        assert!(err.ends_with("image (starts with bytes 00 00 00 01 42 75 64 31)"), "{err}");
        let err = d.decode(b"{\"predictions\": [[0.25, 0.75]]}\n", &mut out).unwrap_err().to_string();
        assert!(err.ends_with("image (text starting \"{\\\"predictions\\\": [[0.25, \")"), "{err}");
        // Cut inside a character, 64 bytes in.
        let err = d.decode("é".repeat(40).as_bytes(), &mut out).unwrap_err().to_string();
        assert!(err.ends_with(&format!("image (text starting \"{}\")", "é".repeat(24))), "{err}");
        // An iPhone photo's first box, and an AVIF's.
        let heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic\0\0\0\x08meta";
        let err = d.decode(heic, &mut out).unwrap_err().to_string();
        assert!(err.contains("(an HEIC/HEIF image, as phones write them"), "{err}");
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf\0\0\0\x08meta";
        assert!(d.decode(avif, &mut out).unwrap_err().to_string().contains("(an AVIF image)"));
        let err = d.decode(b"%PDF-1.7\n%\xe2\xe3", &mut out).unwrap_err().to_string();
        assert!(err.contains("(a PDF document)"), "{err}");
        let err = d.decode(b"<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"/>", &mut out);
        assert!(err.unwrap_err().to_string().contains("(an SVG image"));
        let mut bytes = png(64, 64, |x, y| [x as u8, y as u8, 0]);
        bytes.truncate(bytes.len() / 2);
        assert!(matches!(d.decode(&bytes, &mut out), Err(ImageError::Corrupt { format: "PNG", .. })));
        let mut small = ImageDecoder::new(ImagePlan::new(&imagenet(), None, 1000).unwrap());
        let bytes = png(64, 64, |_, _| [0; 3]);
        assert!(matches!(small.decode(&bytes, &mut out), Err(ImageError::TooLarge { pixels: 4096, .. })));
    }
}
