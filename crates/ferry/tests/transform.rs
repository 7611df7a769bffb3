//! `ferry transform` end to end on the shipped model and photos, through the real binary.

mod common;

use std::process::Command;

use common::*;

/// The example model over the example photos into `out`, with `extra` arguments.
fn example_job(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    examples_through(&mobilenet(), out, extra)
}

/// A transform of the example photos through `model`.
fn examples_through(model: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    job_through(model, &examples(), out, extra)
}

/// A transform of `input` through `model` into `out`, with `extra` arguments.
fn job_through(
    model: &std::path::Path,
    input: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec!["--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()];
    args.extend(["--output", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    transform(&args)
}

#[test]
fn the_example_photos_are_classified_correctly() {
    let out = tempfile::tempdir().unwrap();
    let o = example_job(out.path(), &["--top-k", "5", "--backend", "ort"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        files(out.path()),
        [
            "_ferry/job.json",
            "_ferry/report.json",
            "astronaut.png.out",
            "chelsea.jpg.out",
            "coffee.png.out",
            "rocket.jpg.out"
        ]
    );
    assert_eq!(top_label(&out.path().join("chelsea.jpg.out")), "Egyptian cat");
    assert_eq!(top_label(&out.path().join("coffee.png.out")), "espresso");
    let p = json(&out.path().join("coffee.png.out"));
    let probs = p["predictions"][0]["probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), 5);
    assert!(probs[0].as_f64().unwrap() > 0.9, "{p}");
    assert!(probs.windows(2).all(|w| w[0].as_f64() >= w[1].as_f64()), "sorted: {p}");
    let report = json(&out.path().join("_ferry/report.json"));
    assert_eq!(report["objects_succeeded"], 4);
    assert_eq!(report["records"], 4);
    assert!(report["runtime"].as_str().unwrap().contains("onnxruntime"));
}

#[test]
fn a_report_that_cannot_be_written_leaves_the_summary_and_the_outputs() {
    let out = tempfile::tempdir().unwrap();
    let blocker = tempfile::NamedTempFile::new().unwrap();
    // The report's folder would have to be a file that exists.
    let report = blocker.path().join("report.json");
    let o = example_job(out.path(), &["--top-k", "1", "--report", report.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("4 objects (4 written, 0 failed"), "the summary is still shown: {err}");
    let line = err.lines().find(|l| l.starts_with("error: writing the job report")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(report.to_str().unwrap()), "{line}");
    assert_eq!(
        files(out.path()),
        ["_ferry/job.json", "astronaut.png.out", "chelsea.jpg.out", "coffee.png.out", "rocket.jpg.out"]
    );
}

/// Without `--max-batch-size`, a model call takes at most 2 records (see `DEFAULT_MAX_BATCH_SIZE`):
/// one model thread that may wait two seconds to fill a batch runs the four photos in two calls.
#[test]
fn batches_default_to_two_records() {
    let out = tempfile::tempdir().unwrap();
    let o = example_job(out.path(), &["--threads", "1", "--batch-wait-ms", "2000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = json(&out.path().join("_ferry/report.json"));
    assert_eq!(report["records"], 4, "{report}");
    assert_eq!(report["batches"], 2, "{report}");
}

/// Full probability vectors, keyed by input file name.
fn probabilities(backend: &str, extra: &[&str]) -> std::collections::BTreeMap<String, Vec<f64>> {
    let out = tempfile::tempdir().unwrap();
    let (model, input) = (mobilenet(), examples());
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.path().to_str().unwrap(),
        "--backend",
        backend,
    ];
    args.extend_from_slice(extra);
    let o = transform(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    files(out.path())
        .into_iter()
        .filter_map(|f| f.strip_suffix(".out").map(str::to_string))
        .map(|name| {
            let v = json(&out.path().join(format!("{name}.out")));
            let row = v["predictions"][0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            (name, row)
        })
        .collect()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

#[test]
fn onnxruntime_and_tract_agree_within_1e4() {
    let ort = probabilities("ort", &[]);
    let tract = probabilities("tract", &[]);
    assert_eq!(ort.len(), 4);
    assert_eq!(ort.keys().collect::<Vec<_>>(), tract.keys().collect::<Vec<_>>());
    for (name, a) in &ort {
        let b = &tract[name];
        assert_eq!(a.len(), 1000);
        let peak = a.iter().cloned().fold(0.0, f64::max);
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst / peak < 1e-4, "{name}: max difference {worst} against peak {peak}");
        assert_eq!(argmax(a), argmax(b), "{name}");
    }
}

#[test]
fn matches_python_onnxruntime_with_pillow() {
    let dump = tempfile::NamedTempFile::new().unwrap();
    let peer = Command::new("python3")
        .arg(repo().join("bench/peer.py"))
        .args(["--model", mobilenet().to_str().unwrap(), "--input", examples().to_str().unwrap()])
        .args(["--threads", "1", "--dump", dump.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(peer.status.success(), "bench/peer.py: {}", String::from_utf8_lossy(&peer.stderr));
    let theirs: std::collections::BTreeMap<String, Vec<f64>> =
        serde_json::from_slice(&std::fs::read(dump.path()).unwrap()).unwrap();
    // Full-size decoding, as Pillow does: the only difference left is the resampling code.
    let ours = probabilities("ort", &["--no-dct-scaling"]);
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (name, a) in &ours {
        let b = &theirs[name];
        assert_eq!(argmax(a), argmax(b), "{name}: top-1 differs");
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst < 0.02, "{name}: probabilities differ by up to {worst}");
    }
}

/// Pre-processed pixels, read from an identity model's `.out`, in units of one 8-bit level.
fn levels(out: &std::path::Path) -> Vec<f32> {
    fn flatten(v: &serde_json::Value, px: &mut Vec<f32>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| flatten(x, px)),
            x => px.push(x.as_f64().unwrap() as f32 * 255.0),
        }
    }
    let mut px = Vec::new();
    flatten(&json(out)["predictions"][0], &mut px);
    px
}

/// Runs tests/pillow_variants.py into `dir` for `config` (a ferry.toml): the images in
/// `dir/images`, Pillow's tensors in `dir/pillow`.
fn pillow_variants(dir: &std::path::Path, config: &std::path::Path) -> Vec<String> {
    let made = Command::new("python3").arg(repo().join("tests/pillow_variants.py")).arg(dir).arg(config).output();
    let made = made.unwrap();
    assert!(made.status.success(), "tests/pillow_variants.py: {}", String::from_utf8_lossy(&made.stderr));
    files(&dir.join("images"))
}

/// How far `ours` (in levels) is from Pillow's tensor for `name` in `dir/pillow`: the largest and
/// the mean difference, in levels.
fn from_pillow(dir: &std::path::Path, name: &str, ours: &[f32]) -> (f32, f32) {
    let bytes = std::fs::read(dir.join("pillow").join(format!("{name}.f32"))).unwrap();
    let theirs: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) * 255.0).collect();
    assert_eq!(theirs.len(), ours.len(), "{name}");
    let diffs: Vec<f32> = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).collect();
    (diffs.iter().copied().fold(0.0, f32::max), diffs.iter().sum::<f32>() / diffs.len() as f32)
}

#[test]
fn preprocessing_matches_pillow_across_encodings_from_another_writer() {
    // Pillow writes the files (progressive, every chroma subsampling, greyscale, CMYK, restart
    // markers, palette and alpha PNGs, 16-bit, tiny, strip-shaped and large images; WebP, GIF,
    // BMP and TIFF) and pre-processes them; ferry must give the same pixels through an identity
    // model.
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/identity_224");
    let names = pillow_variants(dir.path(), &model.join("ferry.toml"));
    let images = dir.path().join("images");
    assert_eq!(names.len(), 26, "{names:?}");

    // Decoding at full size, as Pillow does, two resamplers rounding to 8 bits differ by at most
    // one level (CMYK goes through two CMYK-to-RGB conversions as well, each rounding once
    // more, and a JPEG-compressed TIFF is decoded by another JPEG decoder than libjpeg). By
    // default the large JPEG is decoded at 1/2 scale, which must stay close.
    for (mode, flag, within) in [("full size", Some("--no-dct-scaling"), 1.0), ("default", None, 2.0)] {
        let out = dir.path().join(mode);
        let mut args = vec!["--model", model.to_str().unwrap(), "--input", images.to_str().unwrap()];
        args.extend(["--output", out.to_str().unwrap()]);
        args.extend(flag);
        let o = transform(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        for name in &names {
            let ours = levels(&out.join(format!("{name}.out")));
            assert_eq!(ours.len(), 3 * 224 * 224, "{name}");
            if name == "greyscale_16bit.png" {
                // Pillow's conversion of 16-bit greyscale to RGB clips instead of scaling, so the
                // reference is ferry's own result for the same image at 8 bits (each level × 257).
                assert_eq!(ours, levels(&out.join("greyscale_8bit.png.out")), "{name}");
                continue;
            }
            let (worst, mean) = from_pillow(dir.path(), name, &ours);
            let allowed = if name == "cmyk.jpg" || name == "jpeg.tiff" { 2.0 } else { within } + 1e-3;
            assert!(worst <= allowed, "{mode} {name}: pixels differ from Pillow's by up to {worst} levels");
            assert!(mean < 0.3, "{mode} {name}: pixels differ from Pillow's by {mean} levels on average");
        }
    }
}

#[test]
fn models_with_a_fixed_batch_size_get_exactly_that_many_rows() {
    // An export without a dynamic batch axis declares 1; some declare more. A call must have
    // exactly that many rows whatever --max-batch-size says: more records wait for the next
    // call, fewer are padded, and the padding never reaches an output.
    let job = |fixture: &str, backend: &str, out: &std::path::Path| {
        let model = repo().join("tests/fixtures").join(fixture);
        let calls = ["--threads", "1", "--max-batch-size", "2", "--batch-wait-ms", "2000"];
        let o = examples_through(&model, out, &[&["--backend", backend], &calls[..]].concat());
        assert!(o.status.success(), "{fixture} on {backend}: {}", stderr(&o));
        json(&out.join("_ferry/report.json"))
    };
    let dynamic = tempfile::tempdir().unwrap();
    job("identity_224", "ort", dynamic.path());
    let names = ["astronaut.png.out", "chelsea.jpg.out", "coffee.png.out", "rocket.jpg.out"];
    for backend in ["ort", "tract"] {
        for (fixture, batches) in [("identity_224_batch1", 4), ("identity_224_batch3", 2)] {
            let out = tempfile::tempdir().unwrap();
            let report = job(fixture, backend, out.path());
            assert_eq!(report["batches"], batches, "{fixture} on {backend}: {report}");
            assert_eq!(report["records"], 4, "{fixture} on {backend}: {report}");
            for name in names {
                let (a, b) = (std::fs::read(dynamic.path().join(name)), std::fs::read(out.path().join(name)));
                assert!(a.unwrap() == b.unwrap(), "{fixture} on {backend}: {name} differs from the dynamic model's");
            }
        }
    }
}

#[test]
fn a_bare_channels_last_model_is_fed_channels_last() {
    // No ferry.toml says so: [N, 224, 224, 3] is read from the model, as TensorFlow exports
    // declare it. The same pixels as a channels-first model's, transposed.
    let job = |model: std::path::PathBuf, out: &std::path::Path| {
        let input = examples();
        let args = ["--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()];
        let o = transform(&[&args[..], &["--output", out.to_str().unwrap()]].concat());
        assert!(o.status.success(), "{}: {}", model.display(), stderr(&o));
    };
    let (first, last) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    job(repo().join("tests/fixtures/identity_224/model.onnx"), first.path());
    job(repo().join("tests/fixtures/identity_nhwc_224"), last.path());
    for name in ["astronaut.png.out", "chelsea.jpg.out"] {
        let (a, b) = (json(&first.path().join(name)), json(&last.path().join(name)));
        let (chw, hwc) = (&a["predictions"][0], &b["predictions"][0]);
        assert_eq!(hwc.as_array().unwrap().len(), 224);
        assert_eq!(hwc[0][0].as_array().unwrap().len(), 3);
        for (y, x, c) in (0..224).flat_map(|y| (0..224).flat_map(move |x| (0..3).map(move |c| (y, x, c)))) {
            assert_eq!(chw[c][y][x], hwc[y][x][c], "{name} at ({y}, {x}) channel {c}");
        }
    }
}

#[test]
fn integer_and_half_precision_models_are_fed_their_own_types() {
    // A uint8 input, as TensorFlow exports of image models declare it, takes the pixels as they
    // are (no ferry.toml); a float16 input takes the float pixels rounded to half precision. Each
    // output comes back in its own type: the uint8 one as JSON integers.
    let through = |fixture: &str, backend: &str, out: &std::path::Path| {
        let o = examples_through(&repo().join("tests/fixtures").join(fixture), out, &["--backend", backend]);
        assert!(o.status.success(), "{fixture} on {backend}: {}", stderr(&o));
    };
    let (nhwc, nchw) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    through("identity_nhwc_224", "ort", nhwc.path());
    through("identity_224", "ort", nchw.path());
    let flat = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        let mut stack = vec![v.clone()];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Array(items) => stack.extend(items.into_iter().rev()),
                other => all.push(other),
            }
        }
        all
    };
    for backend in ["ort", "tract"] {
        let (bytes, halves) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        through("identity_uint8_224", backend, bytes.path());
        through("identity_fp16_224", backend, halves.path());
        for name in ["astronaut.png.out", "chelsea.jpg.out", "coffee.png.out", "rocket.jpg.out"] {
            let pixels = flat(&json(&bytes.path().join(name))["predictions"][0]);
            let floats = flat(&json(&nhwc.path().join(name))["predictions"][0]);
            assert_eq!(pixels.len(), 224 * 224 * 3, "{backend} {name}");
            for (p, f) in pixels.iter().zip(&floats) {
                let p = p.as_u64().unwrap_or_else(|| panic!("{backend} {name}: {p} is not a whole pixel value"));
                assert_eq!(p as f64, (f.as_f64().unwrap() * 255.0).round(), "{backend} {name}");
            }
            let half = flat(&json(&halves.path().join(name))["predictions"][0]);
            let full = flat(&json(&nchw.path().join(name))["predictions"][0]);
            assert_eq!(half.len(), full.len(), "{backend} {name}");
            let worst = half.iter().zip(&full).map(|(h, f)| (h.as_f64().unwrap() - f.as_f64().unwrap()).abs());
            // float16 has an 11-bit significand: values in [0, 1] are within 2^-12 of their floats.
            assert!(worst.fold(0.0, f64::max) <= 2f64.powi(-12), "{backend} {name}");
        }
    }
}

#[test]
fn an_integer_model_refuses_settings_that_make_fractions() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("tests/fixtures/identity_uint8_224/model.onnx"), dir.path().join("model.onnx")).unwrap();
    std::fs::write(dir.path().join("ferry.toml"), "[input]\nmean = [0.485, 0.456, 0.406]\n").unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = examples_through(dir.path(), out.path(), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("input pixels is uint8, which holds whole numbers from 0 to 255"), "{err}");
    assert!(files(out.path()).is_empty(), "refused before any object: {:?}", files(out.path()));
}

#[test]
fn a_manifest_names_the_inputs() {
    // SageMaker's ManifestFile: a prefix and keys relative to it, not everything under it.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let prefix = examples();
    let entries = serde_json::json!([
        {"prefix": prefix.to_str().unwrap()},
        "chelsea.jpg", "coffee.png", "chelsea.jpg", "missing.jpg", "../README.md"
    ]);
    std::fs::write(&manifest, entries.to_string()).unwrap();
    let model = mobilenet();
    let job = |out: &std::path::Path| {
        let args = ["--input", manifest.to_str().unwrap(), "--manifest", "--output", out.to_str().unwrap()];
        transform(&[&["--model", model.to_str().unwrap(), "--top-k", "1"], &args[..]].concat())
    };
    let out = dir.path().join("out");
    let o = job(&out);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("4 objects (2 written, 2 failed"), "each listed key once: {err}");
    assert!(err.contains("failed: missing.jpg") && err.contains("failed: ../README.md: key part \"..\""), "{err}");
    assert_eq!(files(&out), ["_ferry/job.json", "_ferry/report.json", "chelsea.jpg.out", "coffee.png.out"]);
    assert_eq!(top_label(&out.join("chelsea.jpg.out")), "Egyptian cat");

    // Entries are appended to the prefix as strings, as SageMaker does.
    let stem = serde_json::json!([{"prefix": prefix.join("co").to_str().unwrap()}, "ffee.png"]);
    std::fs::write(&manifest, stem.to_string()).unwrap();
    let out = dir.path().join("out-stem");
    let o = job(&out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(&out), ["_ferry/job.json", "_ferry/report.json", "coffee.png.out"]);

    std::fs::write(&manifest, "[\"chelsea.jpg\"]").unwrap();
    let o = job(&out);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("manifest.json: entry 0 must be {\"prefix\""), "{err}");
}

#[test]
fn gzipped_inputs_are_decompressed_within_the_payload_limit() {
    use std::io::Write;
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for name in ["chelsea.jpg", "coffee.png"] {
        std::fs::write(input.join(format!("{name}.gz")), gz(&std::fs::read(examples().join(name)).unwrap())).unwrap();
    }
    // A few kilobytes that inflate to 8 MiB, over a 2 MiB limit; and a file that is not gzip.
    std::fs::write(input.join("bomb.jpg.gz"), gz(&vec![0; 8 << 20])).unwrap();
    std::fs::copy(examples().join("rocket.jpg"), input.join("plain.jpg")).unwrap();
    let (zipped, plain) = (dir.path().join("zipped"), dir.path().join("plain"));
    let o = job_through(&mobilenet(), &input, &zipped, &["--compression", "Gzip", "--max-payload-mb", "2"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("4 objects (2 written, 2 failed"), "{err}");
    assert!(err.contains("bomb.jpg.gz record 0: decompresses to more than the payload limit of 2 MiB"), "{err}");
    assert!(err.contains("plain.jpg record 0: not gzip data (--compression gzip)"), "{err}");
    let o = example_job(&plain, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["chelsea.jpg", "coffee.png"] {
        let (a, b) =
            (std::fs::read(plain.join(format!("{name}.out"))), std::fs::read(zipped.join(format!("{name}.gz.out"))));
        assert!(a.unwrap() == b.unwrap(), "{name}: the gzipped input gives other outputs");
    }
}

#[test]
fn a_bare_greyscale_model_gets_pillows_luma() {
    // [N, 1, 224, 224], and no ferry.toml line says greyscale: the channel count is read from
    // the model. Pillow converts to "L" before resizing, ferry after, so each rounding may fall
    // differently: within two levels, and a fraction of a level on average.
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/identity_grey_224");
    let config = dir.path().join("pillow.toml");
    let toml = std::fs::read_to_string(model.join("ferry.toml")).unwrap();
    std::fs::write(&config, format!("{toml}channels = \"gray\"\n")).unwrap();
    let names = pillow_variants(dir.path(), &config);
    let (images, out) = (dir.path().join("images"), dir.path().join("out"));
    let o = job_through(&model, &images, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in names {
        let ours = levels(&out.join(format!("{name}.out")));
        assert_eq!(ours.len(), 224 * 224, "{name}: one channel");
        if name == "greyscale_16bit.png" {
            // Pillow clips 16-bit greyscale (see the RGB test above).
            assert_eq!(ours, levels(&out.join("greyscale_8bit.png.out")), "{name}");
            continue;
        }
        let (worst, mean) = from_pillow(dir.path(), &name, &ours);
        assert!(worst <= 2.0 + 1e-3, "{name}: luma differs from Pillow's by up to {worst} levels");
        assert!(mean < 0.3, "{name}: luma differs from Pillow's by {mean} levels on average");
    }
}

#[test]
fn outputs_that_are_not_floats_are_written_as_they_are() {
    // Class ids from an ArgMax (int64), a mask (bool), a uint8, a double and a string: every
    // record used to fail with "Cannot extract Tensor<f32> from Tensor<i64>".
    let model = repo().join("tests/fixtures/typed_outputs");
    let mut seen = Vec::new();
    for backend in ["ort", "tract"] {
        let out = tempfile::tempdir().unwrap();
        let o = examples_through(&model, out.path(), &["--backend", backend]);
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        for name in ["astronaut.png.out", "chelsea.jpg.out", "coffee.png.out", "rocket.jpg.out"] {
            let p = json(&out.path().join(name))["predictions"][0].clone();
            let means: Vec<f64> = p["means"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let best = (0..3).max_by(|&a, &b| means[a].total_cmp(&means[b]).then(b.cmp(&a))).unwrap();
            assert_eq!(p["label"], serde_json::json!([best]), "{backend} {name}: {p}");
            assert_eq!(p["name"], serde_json::json!([best.to_string()]), "{backend} {name}: {p}");
            for c in 0..3 {
                assert_eq!(p["bright"][c], serde_json::json!(means[c] > 0.5), "{backend} {name}: {p}");
                let level = p["level"][c].as_u64().unwrap_or_else(|| panic!("{backend} {name}: {p}"));
                assert!((level as f64 - means[c] * 255.0).abs() <= 1.0, "{backend} {name}: {p}");
                assert!((p["double"][c].as_f64().unwrap() - means[c]).abs() < 1e-6, "{backend} {name}: {p}");
            }
            seen.push((p["label"].clone(), p["bright"].clone(), p["level"].clone()));
        }
    }
    assert_eq!(seen[..4], seen[4..], "the two runtimes write the same integers and booleans");
}

#[test]
fn a_model_archive_is_unpacked_and_its_escapes_refused() {
    // SageMaker's model.tar.gz, written by Python's tarfile: the files at the top, or in a
    // folder; and one with an entry that would land outside the folder it is unpacked into.
    let dir = tempfile::tempdir().unwrap();
    let escape = format!("ferry-escaped-{}.txt", std::process::id());
    let script = r#"
import io, os, sys, tarfile
model, out, escape = sys.argv[1], sys.argv[2], sys.argv[3]
names = ["model.onnx", "ferry.toml", "labels.txt"]
with tarfile.open(os.path.join(out, "flat.tar.gz"), "w:gz") as t:
    for f in names:
        t.add(os.path.join(model, f), arcname=f)
with tarfile.open(os.path.join(out, "nested.tgz"), "w:gz") as t:
    t.add(model, arcname="mobilenet_v2")
with tarfile.open(os.path.join(out, "escaping.tar.gz"), "w:gz") as t:
    entry = tarfile.TarInfo("../" + escape)
    entry.size = 1
    t.addfile(entry, io.BytesIO(b"x"))
    for f in names:
        t.add(os.path.join(model, f), arcname=f)
"#;
    let made = Command::new("python3")
        .args(["-c", script, mobilenet().to_str().unwrap(), dir.path().to_str().unwrap(), &escape])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    for archive in ["flat.tar.gz", "nested.tgz", "escaping.tar.gz"] {
        let out = tempfile::tempdir().unwrap();
        let o = examples_through(&dir.path().join(archive), out.path(), &["--top-k", "1"]);
        assert!(o.status.success(), "{archive}: {}", stderr(&o));
        assert_eq!(top_label(&out.path().join("chelsea.jpg.out")), "Egyptian cat", "{archive}");
    }
    assert!(!std::env::temp_dir().join(&escape).exists(), "an entry was unpacked outside its folder");
    // Unpacked into a temporary folder, which goes with the job.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("ferry-model-"))
        .filter(|e| e.path().join("mobilenet_v2").exists() || e.path().join("model.onnx").exists())
        .collect();
    assert!(left.is_empty(), "temporary model folders left behind: {left:?}");
}

#[test]
fn labels_that_do_not_match_the_classes_are_warned_about() {
    let model = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "ferry.toml"] {
        std::fs::copy(mobilenet().join(f), model.path().join(f)).unwrap();
    }
    let labels = std::fs::read_to_string(mobilenet().join("labels.txt")).unwrap();
    let short: Vec<&str> = labels.lines().skip(1).collect();
    std::fs::write(model.path().join("labels.txt"), short.join("\n")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (m, i) = (model.path().to_str().unwrap(), examples());
    let o = transform(&["--model", m, "--input", i.to_str().unwrap(), "--output", out.path().to_str().unwrap()]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("labels.txt has 999 names but output \"logits\" has 1000 classes"), "{err}");
    let out = tempfile::tempdir().unwrap();
    let o = example_job(out.path(), &[]);
    assert!(!stderr(&o).contains("labels.txt has"), "the shipped model's labels fit: {}", stderr(&o));
}

#[test]
fn bad_inputs_fail_alone_and_are_named() {
    let input = tempfile::tempdir().unwrap();
    let good = std::fs::read(examples().join("chelsea.jpg")).unwrap();
    std::fs::write(input.path().join("good.jpg"), &good).unwrap();
    std::fs::write(input.path().join("truncated.jpg"), &good[..good.len() / 3]).unwrap();
    let mut garbled = good.clone();
    let mid = garbled.len() / 2;
    for b in &mut garbled[mid..] {
        *b = 0xFF;
    }
    std::fs::write(input.path().join("corrupt.jpg"), &garbled).unwrap();
    std::fs::write(input.path().join("empty.jpg"), b"").unwrap();
    std::fs::write(input.path().join("notes.txt"), b"not an image at all").unwrap();
    std::fs::write(input.path().join("bomb.jpg"), jpeg_claiming(50_000, 50_000)).unwrap();
    // One byte over the payload limit given below: refused unread.
    std::fs::write(input.path().join("clip.mp4"), vec![0u8; (1 << 20) + 1]).unwrap();

    let out = tempfile::tempdir().unwrap();
    let args = |out: &str| {
        vec![
            "--model".to_string(),
            mobilenet().to_str().unwrap().to_string(),
            "--input".into(),
            input.path().to_str().unwrap().into(),
            "--output".into(),
            out.to_string(),
            "--top-k".into(),
            "1".into(),
            "--max-payload-mb".into(),
            "1".into(),
        ]
    };
    let a = args(out.path().to_str().unwrap());
    let o = transform(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    for (name, reason) in [
        ("truncated.jpg", "invalid JPEG"),
        ("corrupt.jpg", "invalid JPEG"),
        ("empty.jpg", "empty object"),
        ("notes.txt", "not a JPEG, PNG, WebP, GIF, BMP or TIFF image"),
        ("bomb.jpg", "50000x50000"),
        ("clip.mp4", "object is 1048577 bytes, over the payload limit of 1 MiB (--max-payload-mb)"),
    ] {
        let line = err.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name} not reported: {err}"));
        assert!(line.contains(reason) && line.contains("record 0"), "{line}");
    }
    assert_eq!(files(out.path()), ["_ferry/job.json", "_ferry/report.json", "good.jpg.out"]);
    let report = json(&out.path().join("_ferry/report.json"));
    assert_eq!(report["objects_failed"], 6);
    assert_eq!(report["objects_succeeded"], 1);
    assert_eq!(report["failures"].as_array().unwrap().len(), 6);

    // error-record: every object gets its .out, with the error in place of the prediction.
    let out2 = tempfile::tempdir().unwrap();
    let mut a = args(out2.path().to_str().unwrap());
    a.extend(["--on-error".into(), "error-record".into()]);
    let o = transform(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(out2.path()).len(), 9);
    let bomb = json(&out2.path().join("bomb.jpg.out"));
    assert!(bomb["predictions"][0]["error"].as_str().unwrap().contains("over the limit"), "{bomb}");
    let clip = json(&out2.path().join("clip.mp4.out"));
    assert!(clip["predictions"][0]["error"].as_str().unwrap().contains("payload limit"), "{clip}");
    assert_eq!(top_label(&out2.path().join("good.jpg.out")), "Egyptian cat");
}

#[test]
fn files_whose_names_are_not_keys_fail_alone() {
    use std::os::unix::ffi::OsStrExt;
    let input = tempfile::tempdir().unwrap();
    let good = std::fs::read(examples().join("chelsea.jpg")).unwrap();
    // Enough good files that some come after the bad ones in the folder's order, whatever it is.
    let names: Vec<String> = (0..8).map(|i| format!("cat {i}.jpg")).collect();
    for n in &names {
        std::fs::write(input.path().join(n), &good).unwrap();
    }
    std::fs::write(input.path().join("tab\there.jpg"), &good).unwrap();
    std::fs::write(input.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg")), &good).unwrap();

    let out = tempfile::tempdir().unwrap();
    let (i, o) = (input.path().to_str().unwrap(), out.path().to_str().unwrap());
    let run = transform(&["--model", mobilenet().to_str().unwrap(), "--input", i, "--output", o, "--top-k", "1"]);
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.lines().any(|l| l.contains("tab\there.jpg") && l.contains("cannot be an object key")), "{err}");
    assert!(err.lines().any(|l| l.contains("caf\u{fffd}.jpg") && l.contains("not UTF-8")), "{err}");
    let mut expected: Vec<String> = names.iter().map(|n| format!("{n}.out")).collect();
    expected.extend(["_ferry/job.json".into(), "_ferry/report.json".into()]);
    expected.sort();
    assert_eq!(files(out.path()), expected);
    let report = json(&out.path().join("_ferry/report.json"));
    assert_eq!((report["objects_total"].as_u64(), report["objects_failed"].as_u64()), (Some(10), Some(2)), "{report}");
}

/// A valid JPEG whose frame header claims `w`x`h`: decoding it for real would need
/// w*h*3 bytes.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([200, 100, 50]));
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&img).unwrap();
    let sof = bytes.windows(2).position(|m| m == [0xFF, 0xC0]).expect("baseline SOF0");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

#[test]
fn a_model_that_does_not_load_is_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.onnx"), b"this is not a protobuf").unwrap();
    let out = tempfile::tempdir().unwrap();
    for backend in ["ort", "tract"] {
        let o = examples_through(dir.path(), out.path(), &["--backend", backend]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("model.onnx") && err.contains("could not be loaded"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn preprocessing_that_does_not_fit_the_model_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(mobilenet().join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    std::fs::write(dir.path().join("ferry.toml"), "[input]\nresize = 160\ncrop = [128, 128]\n").unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = examples_through(dir.path(), out.path(), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("128x128") && err.contains("224x224"), "{err}");
}

/// A model with dynamic height and width needs a size from ferry.toml: a bare file is told how
/// to give one, and a folder that gives one runs.
#[test]
fn a_dynamic_size_comes_from_ferry_toml() {
    let fixture = repo().join("tests/fixtures/dynamic_hw/model.onnx");
    let out = tempfile::tempdir().unwrap();
    let o = examples_through(&fixture, out.path(), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("input size is dynamic") && err.contains("is a bare .onnx file: make a folder"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&fixture, dir.path().join("model.onnx")).unwrap();
    std::fs::write(dir.path().join("ferry.toml"), "[input]\nresize = 64\ncrop = [48, 32]\n").unwrap();
    let o = examples_through(dir.path(), out.path(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let means = json(&out.path().join("chelsea.jpg.out"))["predictions"][0].clone();
    assert_eq!(means.as_array().map(Vec::len), Some(3), "{means}");
}

#[test]
fn an_unreachable_store_is_one_clear_message() {
    let out = tempfile::tempdir().unwrap();
    let o = ferry()
        .args(["transform", "--model", mobilenet().to_str().unwrap(), "--input", "s3://nowhere/images/"])
        .args(["--output", out.path().to_str().unwrap(), "--max-retries", "1"])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("listing s3://nowhere/images/"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_rerun_with_another_model_or_settings_does_not_keep_the_old_outputs() {
    // A rerun skips objects whose .out exists: after a change of model or settings that would
    // silently keep the old outputs of every object the first run finished.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["model.onnx", "ferry.toml", "labels.txt"] {
        std::fs::copy(mobilenet().join(f), model.join(f)).unwrap();
    }
    let out = tmp.path().join("out");
    let job = |extra: &[&str]| {
        let k = if extra.contains(&"--top-k") { &[][..] } else { &["--top-k", "3"][..] };
        job_through(&model, &examples(), &out, &[k, extra].concat())
    };
    let read = |name: &str| std::fs::read(out.join(name)).unwrap();
    assert!(job(&[]).status.success());
    let first = read("coffee.png.out");
    assert!(stderr(&job(&[])).contains("4 already done"));

    let o = job(&["--top-k", "1"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("holds outputs of another job (--top-k was 3, now 1)") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(read("coffee.png.out"), first, "nothing was written");

    // A fixed ferry.toml is another model.
    let toml = std::fs::read_to_string(model.join("ferry.toml")).unwrap().replace("resize = 256", "resize = 240");
    std::fs::write(model.join("ferry.toml"), toml).unwrap();
    let o = job(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("(the model's files differ)"), "{}", stderr(&o));

    // --overwrite writes every object again, as a job into an empty output would.
    let o = job(&["--overwrite"]);
    assert!(stderr(&o).contains("4 objects (4 written, 0 failed, 0 already done)"), "{}", stderr(&o));
    let fresh = tmp.path().join("fresh");
    assert!(job_through(&model, &examples(), &fresh, &["--top-k", "3"]).status.success());
    for f in ["astronaut.png.out", "chelsea.jpg.out", "coffee.png.out", "rocket.jpg.out"] {
        assert_eq!(read(f), std::fs::read(fresh.join(f)).unwrap(), "{f}");
    }
    assert_ne!(read("coffee.png.out"), first);
    // And the next rerun with these settings resumes as usual.
    assert!(stderr(&job(&[])).contains("4 already done"));
}

#[test]
fn one_file_is_a_job_of_one_object() {
    let (whole, one) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert!(example_job(whole.path(), &["--top-k", "3"]).status.success());
    let o = job_through(&mobilenet(), &examples().join("coffee.png"), one.path(), &["--top-k", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(one.path()), ["_ferry/job.json", "_ferry/report.json", "coffee.png.out"]);
    let read = |dir: &std::path::Path| std::fs::read(dir.join("coffee.png.out")).unwrap();
    assert_eq!(read(one.path()), read(whole.path()));
    let o = job_through(&mobilenet(), &examples().join("coffee.png"), one.path(), &["--top-k", "3"]);
    assert!(stderr(&o).contains("1 objects (0 written, 0 failed, 1 already done)"), "{}", stderr(&o));
}

#[test]
fn an_input_folder_without_objects_is_an_error() {
    // A mistyped or not yet filled prefix: saying so beats a job that succeeds having done nothing.
    let (input, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (i, o) = (input.path().to_str().unwrap(), out.path().to_str().unwrap());
    let o = transform(&["--model", mobilenet().to_str().unwrap(), "--input", i, "--output", o]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("no objects under {i}")), "{}", stderr(&o));
}

#[test]
fn a_killed_job_resumes_to_byte_identical_outputs() {
    let data = tempfile::tempdir().unwrap();
    make_dataset(data.path(), 120);
    let model = mobilenet();
    let base = |out: &std::path::Path| {
        let mut c = ferry();
        c.args(["transform", "--model", model.to_str().unwrap(), "--input", data.path().to_str().unwrap()]).args([
            "--output",
            out.to_str().unwrap(),
            "--backend",
            "ort",
        ]);
        c
    };
    let reference = tempfile::tempdir().unwrap();
    let o = base(reference.path()).args(["--max-batch-size", "4"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let resumed = tempfile::tempdir().unwrap();
    let mut child = base(resumed.path()).args(["--max-batch-size", "3"]).spawn().unwrap();
    // Kill -9 once some, but not all, outputs exist.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let n = files(resumed.path()).iter().filter(|f| f.ends_with(".out")).count();
        if n >= 20 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial: Vec<String> = files(resumed.path()).into_iter().filter(|f| f.ends_with(".out")).collect();
    assert!(partial.len() >= 20 && partial.len() < 120, "killed with {} outputs", partial.len());
    for f in &partial {
        // Whatever is visible is complete.
        assert_eq!(
            std::fs::read(resumed.path().join(f)).unwrap(),
            std::fs::read(reference.path().join(f)).unwrap(),
            "{f}"
        );
    }

    // The rerun flushes its files to disk; that changes no byte of them.
    let o = base(resumed.path()).arg("--fsync").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Nothing a killed write left behind outlives the rerun, hidden or not.
    assert_eq!(files(resumed.path()), files(reference.path()));
    let report = json(&resumed.path().join("_ferry/report.json"));
    assert_eq!(report["objects_skipped"].as_u64().unwrap() as usize, partial.len());
    let outs = |d: &std::path::Path| -> Vec<String> { files(d).into_iter().filter(|f| f.ends_with(".out")).collect() };
    assert_eq!(outs(reference.path()).len(), 120);
    assert_eq!(outs(resumed.path()), outs(reference.path()));
    for f in outs(reference.path()) {
        assert_eq!(
            std::fs::read(resumed.path().join(&f)).unwrap(),
            std::fs::read(reference.path().join(&f)).unwrap(),
            "{f}"
        );
    }
}

/// SIGTERM, as Kubernetes stops a pod: no new objects, those in flight written, the report says
/// how many were left, and the exit status is 128 + 15. A rerun finishes the rest.
#[test]
fn sigterm_finishes_what_is_in_flight_and_reports_the_rest() {
    let data = tempfile::tempdir().unwrap();
    make_dataset(data.path(), 200);
    let out = tempfile::tempdir().unwrap();
    let model = mobilenet();
    let args = ["--model", model.to_str().unwrap(), "--input", data.path().to_str().unwrap()];
    let args = [&args[..], &["--output", out.path().to_str().unwrap(), "--threads", "1"]].concat();
    let child = ferry().arg("transform").args(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while files(out.path()).iter().filter(|f| f.ends_with(".out")).count() < 10 && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(143), "{err}");
    let report = json(&out.path().join("_ferry/report.json"));
    let (written, left) =
        (report["objects_succeeded"].as_u64().unwrap(), report["objects_not_started"].as_u64().unwrap());
    assert!(written >= 10 && left > 0, "{report}");
    assert_eq!(report["objects_failed"], 0, "{report}");
    assert_eq!(written + left, report["objects_total"].as_u64().unwrap(), "{report}");
    assert!(err.contains(&format!("stopped by SIGTERM: {left} objects not started")), "{err}");
    let outs = files(out.path()).into_iter().filter(|f| f.ends_with(".out")).count() as u64;
    assert_eq!(outs, written, "every object started was written, and nothing else");
    assert!(files(out.path()).iter().all(|f| !f.contains("ferry-partial")));

    let o = transform(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = json(&out.path().join("_ferry/report.json"));
    assert_eq!(report["objects_skipped"].as_u64().unwrap(), written, "{report}");
    assert!(report.get("objects_not_started").is_none(), "{report}");
}

#[test]
fn outputs_inside_the_input_folder_are_not_taken_for_inputs() {
    let data = tempfile::tempdir().unwrap();
    // Names are kept as they are, not percent-encoded.
    let name = "chat été #1.jpg";
    std::fs::copy(examples().join("chelsea.jpg"), data.path().join(name)).unwrap();
    let (model, input) = (mobilenet(), data.path().to_str().unwrap().to_string());
    let run_twice = |out: &str| {
        for _ in 0..2 {
            let o =
                transform(&["--model", model.to_str().unwrap(), "--input", &input, "--output", out, "--top-k", "1"]);
            assert!(o.status.success(), "{}", stderr(&o));
        }
    };
    let out = data.path().join("predictions");
    run_twice(out.to_str().unwrap());
    assert_eq!(files(&out), ["_ferry/job.json".to_string(), "_ferry/report.json".to_string(), format!("{name}.out")]);
    assert_eq!(json(&out.join("_ferry/report.json"))["objects_total"], 1);

    // Outputs written next to their inputs, with what a write killed before its rename leaves.
    std::fs::write(data.path().join(format!(".{name}.out.ferry-partial")), b"{\"predictions\"").unwrap();
    run_twice(&input);
    let report = json(&data.path().join("_ferry/report.json"));
    assert_eq!(report["objects_total"], 1, "{report}");
    assert_eq!(report["objects_skipped"], 1, "{report}");
    assert_eq!(top_label(&data.path().join(format!("{name}.out"))), "Egyptian cat");
}
