//! Helpers shared by the end-to-end tests: running the real binary, making image variants from
//! the shipped photos, reading outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub fn mobilenet() -> PathBuf {
    repo().join("examples/models/mobilenet_v2")
}

pub fn examples() -> PathBuf {
    repo().join("examples/images")
}

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("FERRY_PROGRESS", "off");
    c
}

/// Runs `ferry transform` with `args` and returns its output.
pub fn transform(args: &[&str]) -> Output {
    let out = ferry().arg("transform").args(args).output().unwrap();
    eprintln!("ferry {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir`, relative, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Copies the shipped photos into `dir` and adds `n` JPEG variants made from them (crops, flips,
/// rescales, re-encodes at several qualities), some large enough for DCT-scaled decoding.
pub fn make_dataset(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let sources: Vec<image::RgbImage> = ["chelsea.jpg", "coffee.png", "astronaut.png", "rocket.jpg"]
        .iter()
        .map(|f| image::open(examples().join(f)).unwrap().into_rgb8())
        .collect();
    for i in 0..n {
        let src = &sources[i % sources.len()];
        let (w, h) = src.dimensions();
        let (cw, ch) = (w * (70 + (i as u32 * 7) % 30) / 100, h * (70 + (i as u32 * 11) % 30) / 100);
        let (x, y) = ((w - cw) * (i as u32 % 3) / 2, (h - ch) * (i as u32 % 2));
        let mut img = image::imageops::crop_imm(src, x, y, cw, ch).to_image();
        if i % 2 == 1 {
            img = image::imageops::flip_horizontal(&img);
        }
        if i % 5 == 0 {
            img = image::imageops::resize(&img, cw * 2, ch * 2, image::imageops::FilterType::Triangle);
        }
        let quality = 60 + (i as u8 * 13) % 40;
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(&img).unwrap();
        let sub = dir.join(format!("set{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("v{i:04}.jpg")), bytes).unwrap();
    }
}

/// Top-1 label of a top-k `.out`.
pub fn top_label(out: &Path) -> String {
    json(out)["predictions"][0]["labels"][0].as_str().unwrap().to_string()
}

/// `per_source` JPEG variants of each shipped photo in `dir/<photo>/<photo>_NNN.jpg`: random
/// crops of 55–100% of each side, flips, brightness changes and qualities 55–95.
pub fn make_variants(dir: &Path, per_source: usize) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as u32
    };
    for file in ["chelsea.jpg", "coffee.png", "astronaut.png", "rocket.jpg"] {
        let src = image::open(examples().join(file)).unwrap().into_rgb8();
        let name = file.split('.').next().unwrap();
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let (w, h) = src.dimensions();
        for v in 0..per_source {
            let (cw, ch) = (w * (55 + next(46)) / 100, h * (55 + next(46)) / 100);
            let (x, y) = (next(w - cw + 1), next(h - ch + 1));
            let mut img = image::imageops::crop_imm(&src, x, y, cw, ch).to_image();
            if next(2) == 1 {
                img = image::imageops::flip_horizontal(&img);
            }
            img = image::imageops::brighten(&img, next(41) as i32 - 20);
            let mut bytes = Vec::new();
            let quality = 55 + next(41) as u8;
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(&img).unwrap();
            std::fs::write(sub.join(format!("{name}_{v:03}.jpg")), bytes).unwrap();
        }
    }
}

/// Runs `ferry sketch <args>`; panics with its stderr unless it succeeds, returns stdout.
pub fn sketch(args: &[&str]) -> String {
    let out = ferry().arg("sketch").args(args).output().unwrap();
    assert!(out.status.success(), "ferry sketch {}: {}", args.join(" "), stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}
