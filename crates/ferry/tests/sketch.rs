//! Sketches end to end: fit a profile, write sketches during a real transform of photo variants,
//! and answer questions from the sketch set alone.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::*;

const PER_SOURCE: usize = 50;

/// Top-1 label and probability of every input, from the job's own `.out` files.
fn predictions(out: &Path) -> BTreeMap<String, (String, f64)> {
    files(out)
        .into_iter()
        .filter_map(|f| f.strip_suffix(".out").map(|k| (k.to_string(), f.clone())))
        .map(|(key, f)| {
            let v = json(&out.join(&f));
            let p = &v["predictions"][0];
            (key, (p["labels"][0].as_str().unwrap().to_string(), p["probabilities"][0].as_f64().unwrap()))
        })
        .collect()
}

/// `ferry transform --top-k 1` with sketches written to `set`.
fn sketch_job(
    model: &str,
    input: &Path,
    output: &Path,
    set: &Path,
    profile: &Path,
    extra: &[&str],
) -> std::process::Output {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (input, output, set, profile) = (s(input), s(output), s(set), s(profile));
    let mut args = vec!["--model", model, "--input", &input, "--output", &output, "--top-k", "1"];
    args.extend(["--sketch", set.as_str(), "--sketch-profile", profile.as_str()]);
    args.extend(extra);
    transform(&args)
}

/// `ferry sketch fit` (classifier recipe) on the first `limit` images; returns the profile's path.
fn fit_classifier(model: &str, images: &Path, limit: usize, dir: &Path) -> std::path::PathBuf {
    let profile = dir.join("profile.json");
    let out = ferry()
        .args(["sketch", "fit", "--model", model, "--input", images.to_str().unwrap()])
        .args(["--limit", &limit.to_string(), "--output", profile.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    profile
}

/// A fresh folder holding `images/`, `per_source` variants of each example photo.
fn photo_variants(per_source: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    make_variants(&images, per_source);
    (tmp, images)
}

fn source(key: &str) -> &str {
    key.split('/').next().unwrap()
}

fn similar(set: &Path, key: &str, k: usize) -> Vec<(String, f64)> {
    sketch(&["similar", "--sketches", set.to_str().unwrap(), "--to", key, "-k", &k.to_string()])
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["key"].as_str().unwrap().to_string(), v["cosine"].as_f64().unwrap())
        })
        .collect()
}

fn count(set: &Path, module: &str) -> f64 {
    sketch(&["count", "--sketches", set.to_str().unwrap(), "--module", module]).trim().parse().unwrap()
}

#[test]
fn sketches_answer_similarity_and_counts_without_the_model() {
    let (tmp, images) = photo_variants(PER_SOURCE);
    let model = mobilenet();
    let model = model.to_str().unwrap();
    // Calibrate on a subset, as a user would on a sample of their data.
    let profile = fit_classifier(model, &images, 120, tmp.path());
    let p = json(&profile);
    assert_eq!(p["calibration_records"], 120);
    assert_eq!(p["modules"].as_array().unwrap().len(), 1001);

    let (outputs, set) = (tmp.path().join("out"), tmp.path().join("sketches"));
    let run = sketch_job(model, &images, &outputs, &set, &profile, &[]);
    assert!(run.status.success());
    let preds = predictions(&outputs);
    assert_eq!(preds.len(), 4 * PER_SOURCE);
    // Parquet part files, not a file per object, and the profile that reads them.
    let written = files(&set);
    let parts: Vec<&String> = written.iter().filter(|f| f.ends_with(".parquet")).collect();
    assert!(!parts.is_empty() && parts.len() < 10, "{written:?}");
    // part-<job start, ms>-<random, 8 hex digits>-<n>.parquet: one job's parts share the first two.
    let fields: Vec<Vec<&str>> = parts.iter().map(|f| f.trim_end_matches(".parquet").split('-').collect()).collect();
    for f in &fields {
        assert!(f.len() == 4 && f[0] == "part" && f[1].len() == 13 && f[2].len() == 8 && f[3].len() == 5, "{f:?}");
        assert!(f[1..].iter().all(|x| x.chars().all(|c| c.is_ascii_hexdigit())), "{f:?}");
        assert_eq!(f[1..3], fields[0][1..3], "{written:?}");
    }
    assert!(written.contains(&"_ferry/sketch_profile.json".to_string()));
    // The features output feeds the sketch and stays out of the predictions.
    let first = json(&outputs.join(format!("{}.out", preds.keys().next().unwrap())));
    assert!(first["predictions"][0].get("features").is_none());
    let report = json(&outputs.join("_ferry/report.json"));
    assert!(report["stage_seconds"]["sketch"].as_f64().unwrap() > 0.0);

    // Similarity: an image's own variants come first.
    for key in
        ["chelsea/chelsea_003.jpg", "coffee/coffee_010.jpg", "astronaut/astronaut_020.jpg", "rocket/rocket_030.jpg"]
    {
        let hits = similar(&set, key, 10);
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|(k, _)| source(k) == source(key)), "{key}: {hits:?}");
        assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1));
    }

    // Counts: every class predicted for at least 20 images, within 10% of the predictions.
    let mut by_class: BTreeMap<&str, usize> = BTreeMap::new();
    for (label, _) in preds.values() {
        *by_class.entry(label.as_str()).or_default() += 1;
    }
    let frequent: Vec<(&str, usize)> = by_class.iter().filter(|(_, n)| **n >= 20).map(|(l, n)| (*l, *n)).collect();
    assert!(frequent.len() >= 2, "classes predicted: {by_class:?}");
    for &(label, n) in &frequent {
        let c = count(&set, label);
        assert!((c - n as f64).abs() <= 0.1 * n as f64, "{label}: sketch count {c}, predicted {n}");
    }
    let absent = "goldfish";
    assert!(!by_class.contains_key(absent));
    assert!(count(&set, absent).abs() < 1.0);

    // Statistics of a subset: the mean top-1 probability of the most frequent class under its prefix.
    let (label, _) = frequent.iter().max_by_key(|(_, n)| *n).unwrap();
    let prefix = preds.iter().find(|(_, (l, _))| l == label).map(|(k, _)| source(k).to_string()).unwrap();
    let probs: Vec<f64> =
        preds.iter().filter(|(k, (l, _))| l == label && k.starts_with(&prefix)).map(|(_, (_, p))| *p).collect();
    let stats: serde_json::Value = serde_json::from_str(&sketch(&[
        "stats",
        "--sketches",
        set.to_str().unwrap(),
        "--module",
        label,
        "--prefix",
        &prefix,
    ]))
    .unwrap();
    assert_eq!(stats["records"], PER_SOURCE);
    let n = probs.len() as f64;
    assert!((stats["count"].as_f64().unwrap() - n).abs() <= 0.1 * n, "{stats}");
    let mean = probs.iter().sum::<f64>() / n;
    assert!((stats["mean_score"].as_f64().unwrap() - mean).abs() < 0.05, "{stats} vs mean probability {mean}");

    // Decoding one record recovers the image and its top class with its score.
    let (key, (label, prob)) = preds.iter().nth(7).unwrap();
    let tree: serde_json::Value =
        serde_json::from_str(&sketch(&["decode", "--sketches", set.to_str().unwrap(), key])).unwrap();
    let objects = tree["objects"].as_array().unwrap();
    assert_eq!(objects[0]["module"], "image");
    let top = objects.iter().find(|o| o["path"] == serde_json::json!([0])).expect("a top class");
    assert_eq!(top["module"].as_str().unwrap(), label);
    assert!((top["score"].as_f64().unwrap() - prob).abs() < 0.1, "{top} vs {prob}");

    // Erasure: a quarter of the coordinates still answers, less precisely.
    let small = tmp.path().join("small");
    let out = ferry()
        .args([
            "sketch",
            "erase",
            "--sketches",
            set.to_str().unwrap(),
            "--keep",
            "256",
            "--output",
            small.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for &(label, n) in &frequent {
        let c = count(&small, label);
        assert!((c - n as f64).abs() <= 0.2 * n as f64, "{label} after erasure: {c} vs {n}");
    }
    let hits = similar(&small, "coffee/coffee_010.jpg", 5);
    assert!(hits.iter().all(|(k, _)| source(k) == "coffee"), "{hits:?}");

    // Parquet as other tools read it: pyarrow (pandas' Parquet engine) reads the set folder as one
    // table (it skips `_ferry/`), with the columns, one row per image and full-length vectors. The
    // last part is written early, so it holds less than half of the job.
    let script = "import pyarrow.parquet as pq, sys\n\
         t = pq.read_table(sys.argv[1])\n\
         assert t.column_names == ['key', 'record', 'sketch', 'seed', 'd'], t.column_names\n\
         keys = t.column('key').to_pylist()\n\
         assert len(keys) == len(set(keys)) == int(sys.argv[2]), len(keys)\n\
         assert set(t.column('record').to_pylist()) == {0}\n\
         assert all(len(v) == 1024 for v in t.column('sketch').to_pylist())\n\
         import json, glob\n\
         meta = json.loads(pq.read_schema(glob.glob(sys.argv[1] + '/part-*.parquet')[0]).metadata[b'ferry.sketch'])\n\
         assert (meta['d'], meta['c'], meta['modules']) == (1024, 1.0, 1001), meta\n\
         ml = meta['module_list']\n\
         p = json.load(open(sys.argv[3]))\n\
         assert ml == [['image', p['image_dim'], 2]] + [[n, p['class_dim'], 0] for n in p['modules'][1:]], ml[:2]\n\
         rows = [pq.read_metadata(f).num_rows for f in sorted(glob.glob(sys.argv[1] + '/part-*.parquet'))]\n\
         assert len(rows) >= 2 and 2 * rows[-1] < len(keys), rows\n\
         print('ok')";
    let py = Command::new("python3")
        .args(["-c", script, set.to_str().unwrap(), &(4 * PER_SOURCE).to_string(), profile.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(py.status.success(), "pyarrow: {}", String::from_utf8_lossy(&py.stderr));

    // DuckDB's and Polars' own Parquet readers (neither is pyarrow) read the parts as they are,
    // and DuckDB's cosine over the vectors ranks neighbours as `ferry sketch similar` does.
    let script = "import duckdb, polars as pl, sys\n\
         parts = sys.argv[1] + '/*.parquet'\n\
         df = pl.read_parquet(parts)\n\
         assert df.columns == ['key', 'record', 'sketch', 'seed', 'd'], df.columns\n\
         assert df.height == df['key'].n_unique() == int(sys.argv[2]), df.height\n\
         assert df['sketch'].list.len().min() == df['sketch'].list.len().max() == 1024\n\
         q = \"select b.key from read_parquet(?) a, read_parquet(?) b where a.key = ? and b.key <> a.key \\\n\
         \x20    order by list_cosine_similarity(a.sketch, b.sketch) desc limit 5\"\n\
         for (k,) in duckdb.execute(q, [parts, parts, sys.argv[3]]).fetchall():\n\
         \x20   print(k)";
    let py = Command::new("python3")
        .args(["-c", script, set.to_str().unwrap(), &(4 * PER_SOURCE).to_string(), "coffee/coffee_010.jpg"])
        .output()
        .unwrap();
    assert!(py.status.success(), "duckdb, polars: {}", String::from_utf8_lossy(&py.stderr));
    let theirs: Vec<String> = String::from_utf8(py.stdout).unwrap().lines().map(str::to_string).collect();
    let ours: Vec<String> = similar(&set, "coffee/coffee_010.jpg", 5).into_iter().map(|(k, _)| k).collect();
    assert_eq!(theirs, ours, "DuckDB's nearest sketches");

    // A set rewritten by another writer (pyarrow's default snappy, zstd as Polars writes, gzip, lz4;
    // small row groups, dictionary pages; and a projection that reorders the columns, drops seed
    // and d and narrows the record index) answers the same questions.
    let script = "import pyarrow as pa, pyarrow.parquet as pq, shutil, sys, os\n\
         t = pq.read_table(sys.argv[1])\n\
         narrow = pa.table({'sketch': t.column('sketch'), 'record': t.column('record').cast(pa.int32()), 'key': t.column('key')})\n\
         for name, table, codec in [('snappy', t, 'snappy'), ('zstd', t, 'zstd'), ('gzip', t, 'gzip'), ('lz4', t, 'lz4'), ('projected', narrow, 'zstd')]:\n\
         \x20   d = os.path.join(sys.argv[2], name)\n\
         \x20   os.makedirs(os.path.join(d, '_ferry'))\n\
         \x20   shutil.copy(os.path.join(sys.argv[1], '_ferry', 'sketch_profile.json'), os.path.join(d, '_ferry'))\n\
         \x20   pq.write_table(table, os.path.join(d, 'all.parquet'), compression=codec, row_group_size=50)\n\
         print('ok')";
    let rewritten = tmp.path().join("rewritten");
    let py = Command::new("python3")
        .args(["-c", script, set.to_str().unwrap(), rewritten.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(py.status.success(), "pyarrow: {}", String::from_utf8_lossy(&py.stderr));
    let (label, n) = frequent[0];
    let theirs = count(&set, label);
    let near: Vec<String> = similar(&set, "coffee/coffee_010.jpg", 5).into_iter().map(|(k, _)| k).collect();
    for codec in ["snappy", "zstd", "gzip", "lz4", "projected"] {
        let other = rewritten.join(codec);
        let c = count(&other, label);
        assert!((c - theirs).abs() < 1e-3, "{codec}: {label} counted {c}, {theirs} in ferry's own set ({n} predicted)");
        let hits: Vec<String> = similar(&other, "coffee/coffee_010.jpg", 5).into_iter().map(|(k, _)| k).collect();
        assert_eq!(hits, near, "{codec}");
    }

    // Sketches do not depend on batching: a second run at another batch size writes the same vectors.
    let (outputs2, set2) = (tmp.path().join("out2"), tmp.path().join("sketches2"));
    let run = sketch_job(model, &images.join("rocket"), &outputs2, &set2, &profile, &["--max-batch-size", "3"]);
    assert!(run.status.success());
    // Keys differ (the second job's input prefix is one level down), vectors must not.
    let script = "import pyarrow.parquet as pq, sys\n\
         a = dict(zip(*[c.to_pylist() for c in pq.read_table(sys.argv[1], columns=['key', 'sketch']).columns]))\n\
         b = pq.read_table(sys.argv[2], columns=['key', 'sketch'])\n\
         assert b.num_rows == int(sys.argv[3]), b.num_rows\n\
         for k, v in zip(*[c.to_pylist() for c in b.columns]):\n\
         \x20   assert a['rocket/' + k] == v, k\n\
         print('ok')";
    let py = Command::new("python3")
        .args(["-c", script, set.to_str().unwrap(), set2.to_str().unwrap(), &PER_SOURCE.to_string()])
        .output()
        .unwrap();
    assert!(py.status.success(), "pyarrow: {}", String::from_utf8_lossy(&py.stderr));
}

#[test]
fn a_killed_sketch_job_resumes_with_every_finished_object_sketched() {
    let (tmp, images) = photo_variants(40);
    let model = mobilenet();
    let model = model.to_str().unwrap();
    let profile = fit_classifier(model, &images, 60, tmp.path());
    let (outputs, set) = (tmp.path().join("out"), tmp.path().join("sketches"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut job = ferry();
    job.args(["transform", "--model", model, "--input", &s(&images), "--output", &s(&outputs), "--top-k", "1"]).args([
        "--sketch",
        &s(&set),
        "--sketch-profile",
        &s(&profile),
        "--sketch-part-records",
        "20",
    ]);
    let mut child = job.spawn().unwrap();
    // Kill -9 once some outputs exist, so that at least one part does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // Counted while the job writes: folders appear and temporary files vanish under the walk.
    fn outs_under(dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        entries
            .flatten()
            .map(|e| e.path())
            .map(|p| if p.is_dir() { outs_under(&p) } else { usize::from(p.extension().is_some_and(|x| x == "out")) })
            .sum()
    }
    let outs = || outs_under(&outputs);
    while outs() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = outs();
    assert!(partial > 0 && partial < 160, "killed with {partial} outputs");
    // Every finished object already has its sketch.
    let script = "import pyarrow.parquet as pq, sys, os\n\
         keys = set(pq.read_table(sys.argv[1], columns=['key']).column('key').to_pylist())\n\
         outs = [os.path.relpath(os.path.join(d, f), sys.argv[2])[:-4] for d, _, fs in os.walk(sys.argv[2]) for f in fs if f.endswith('.out')]\n\
         missing = [k for k in outs if k not in keys]\n\
         assert not missing, missing\n\
         print(len(outs))";
    let py = Command::new("python3").args(["-c", script, &s(&set), &s(&outputs)]).output().unwrap();
    assert!(py.status.success(), "pyarrow: {}", String::from_utf8_lossy(&py.stderr));

    let out = job.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(outs(), 160);
    // What the killed job left is hidden from other readers, and the rerun leaves no more.
    let visible = |d: &Path| -> Vec<String> {
        files(d).into_iter().filter(|f| !f.rsplit('/').next().unwrap().starts_with('.')).collect()
    };
    assert_eq!(files(&outputs), visible(&outputs));
    assert_eq!(files(&outputs).len(), 162, "{:?}", files(&outputs));
    for f in visible(&set) {
        assert!(f.starts_with("_ferry/") || (f.starts_with("part-") && f.ends_with(".parquet")), "{f}");
    }
    // Each record once in the set, whatever the kill left behind: every other image is similar to
    // this one exactly once.
    let hits: Vec<String> = similar(&set, "coffee/coffee_001.jpg", 1000).into_iter().map(|(k, _)| k).collect();
    let distinct: std::collections::BTreeSet<&String> = hits.iter().collect();
    assert_eq!((hits.len(), distinct.len()), (159, 159));

    // Rows of another profile would be read with this one's matrices: such a job is refused.
    let mut other = json(&profile);
    other["seed"] = serde_json::json!(other["seed"].as_u64().unwrap() + 1);
    let other_path = tmp.path().join("other.json");
    std::fs::write(&other_path, other.to_string()).unwrap();
    let before = files(&set);
    let out = sketch_job(model, &examples(), &tmp.path().join("out2"), &set, &other_path, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("another sketch profile"), "{}", stderr(&out));
    assert_eq!(files(&set), before);
    assert_eq!(json(&set.join("_ferry/sketch_profile.json")), json(&profile));
    // The same for an erased copy written into a set of another profile.
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir_all(theirs.join("_ferry")).unwrap();
    std::fs::write(theirs.join("_ferry/sketch_profile.json"), other.to_string()).unwrap();
    let out =
        ferry().args(["sketch", "erase", "--sketches", &s(&set), "--keep", "64", "--output", &s(&theirs)]).output();
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("another sketch profile"), "{}", stderr(&out));
    assert_eq!(files(&theirs), ["_ferry/sketch_profile.json"]);
}

#[test]
fn a_sketch_job_without_a_profile_is_one_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let model = mobilenet();
    let out = transform(&[
        "--model",
        model.to_str().unwrap(),
        "--input",
        examples().to_str().unwrap(),
        "--output",
        tmp.path().join("out").to_str().unwrap(),
        "--sketch",
        tmp.path().join("sk").to_str().unwrap(),
        "--sketch-profile",
        tmp.path().join("missing.json").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("no sketch profile") && err.contains("ferry sketch fit"), "{err}");
    assert!(!tmp.path().join("out").join("chelsea.jpg.out").exists());

    let out = ferry()
        .args(["sketch", "count", "--sketches", tmp.path().to_str().unwrap(), "--module", "espresso"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is this a sketch set?"), "{}", stderr(&out));
}

/// MobileNetV2's stages at strides 32, 16 and 8.
const STAGES: [&str; 3] = [
    "/features/features.18/features.18.2/Clip_output_0",
    "/features/features.13/Add_output_0",
    "/features/features.6/Add_output_0",
];

#[test]
fn the_stages_recipe_sketches_intermediate_objects_from_the_same_pass() {
    let (tmp, images) = photo_variants(25);
    let profile = tmp.path().join("stages.json");
    let model = mobilenet();
    let model = model.to_str().unwrap();
    let mut fit = ferry();
    fit.args(["sketch", "fit", "--model", model, "--input", images.to_str().unwrap(), "--recipe", "stages"])
        .args(["--output", profile.to_str().unwrap()]);
    for s in STAGES {
        fit.args(["--stage", s]);
    }
    let out = fit.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let p = json(&profile);
    assert_eq!(p["recipe"], "stages");
    assert_eq!(p["d"], 4096);
    assert_eq!(p["modules"].as_array().unwrap().len(), 1 + 3 * 64);

    let (outputs, set) = (tmp.path().join("out"), tmp.path().join("sketches"));
    let run = sketch_job(model, &images, &outputs, &set, &profile, &[]);
    assert!(run.status.success());
    // The stage tensors are read for the sketch, not written.
    let body = json(&outputs.join("coffee/coffee_003.jpg.out"));
    assert_eq!(body["predictions"][0]["labels"][0], "espresso");
    assert_eq!(body["predictions"][0].as_object().unwrap().len(), 3);

    // Paths only match where both images have the same codeword at the same place in the tree, so
    // stage objects make similarity stricter than the classifier recipe's; the nearest images are
    // still the same photo's variants. Each cosine also carries the random matrices' noise, about
    // 1/√d (0.016 at d = 4096), which is as large as the gaps between the third to fifth nearest:
    // over nine seeds, the two nearest were always variants, and at least four of the five nearest.
    for key in
        ["chelsea/chelsea_003.jpg", "coffee/coffee_010.jpg", "rocket/rocket_020.jpg", "astronaut/astronaut_011.jpg"]
    {
        let hits = similar(&set, key, 5);
        eprintln!("{key}: {hits:?}");
        let same: Vec<bool> = hits.iter().map(|(k, _)| source(k) == source(key)).collect();
        assert!(same[..2] == [true, true] && same.iter().filter(|&&s| s).count() >= 4, "{key}: {hits:?}");
    }
    let tree: serde_json::Value =
        serde_json::from_str(&sketch(&["decode", "--sketches", set.to_str().unwrap(), "astronaut/astronaut_004.jpg"]))
            .unwrap();
    let objects = tree["objects"].as_array().unwrap();
    assert_eq!(objects[0]["module"], "image");
    let first: Vec<&serde_json::Value> = objects.iter().filter(|o| o["path"].as_array().unwrap().len() == 1).collect();
    assert!(!first.is_empty(), "{tree}");
    for o in &first {
        assert!(o["module"].as_str().unwrap().starts_with("s1:c"), "{o}");
        let a = o["attributes"].as_array().unwrap();
        // Position, as a fraction of the image from its centre, normalised with the attributes.
        assert!(a[0].as_f64().unwrap().abs() <= 0.5 && a[1].as_f64().unwrap().abs() <= 0.5, "{o}");
    }
    let module = first[0]["module"].as_str().unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&sketch(&["stats", "--sketches", set.to_str().unwrap(), "--module", module])).unwrap();
    assert_eq!(stats["records"], 100);
    assert!(stats["count"].as_f64().unwrap() >= 1.0, "{stats}");
}

/// A model exported without a features output: `ferry.toml` names the pooled tensor inside the
/// graph, which ferry exposes for sketching and otherwise leaves alone. The example model computes
/// its declared `features` output as an `Identity` of `/Flatten_output_0`, so both ways must give
/// the same profile, predictions and sketches.
#[test]
fn features_the_graph_does_not_declare_are_read_from_inside_it() {
    let (tmp, images) = photo_variants(5);
    let stock = mobilenet();
    let inner = tmp.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    for f in ["model.onnx", "labels.txt"] {
        std::fs::copy(stock.join(f), inner.join(f)).unwrap();
    }
    let toml = std::fs::read_to_string(stock.join("ferry.toml")).unwrap();
    assert!(toml.contains("features = \"features\""));
    std::fs::write(
        inner.join("ferry.toml"),
        toml.replace("features = \"features\"", "features = \"/Flatten_output_0\""),
    )
    .unwrap();

    let (stock, inner) = (stock.to_str().unwrap(), inner.to_str().unwrap());
    let fitted = |model: &str, name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        fit_classifier(model, &images, 20, &dir)
    };
    let (p_stock, p_inner) = (fitted(stock, "fit-stock"), fitted(inner, "fit-inner"));
    let (mut a, mut b) = (json(&p_stock), json(&p_inner));
    assert_eq!(
        (a["features_output"].as_str(), b["features_output"].as_str()),
        (Some("features"), Some("/Flatten_output_0"))
    );
    a["features_output"] = serde_json::Value::Null;
    b["features_output"] = serde_json::Value::Null;
    assert!(a == b, "the same features give the same profile");

    // Without sketches the inner tensor is not an output at all; with them it stays out of the
    // predictions. Either way the `.out`s are the stock model's, byte for byte.
    let plain = tmp.path().join("plain");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    assert!(transform(&["--model", inner, "--input", &s(&images), "--output", &s(&plain), "--top-k", "1"])
        .status
        .success());
    let run = |model: &str, profile: &Path, name: &str| {
        let (out, set) = (tmp.path().join(format!("out-{name}")), tmp.path().join(format!("set-{name}")));
        assert!(sketch_job(model, &images, &out, &set, profile, &[]).status.success());
        (out, set)
    };
    let (out_stock, set_stock) = run(stock, &p_stock, "stock");
    let (out_inner, set_inner) = run(inner, &p_inner, "inner");
    let outs: Vec<String> = files(&out_stock).into_iter().filter(|f| f.ends_with(".out")).collect();
    assert_eq!(outs.len(), 20);
    for f in &outs {
        let expected = std::fs::read(out_stock.join(f)).unwrap();
        assert_eq!(std::fs::read(plain.join(f)).unwrap(), expected, "{f}");
        assert_eq!(std::fs::read(out_inner.join(f)).unwrap(), expected, "{f}");
    }
    for key in ["chelsea/chelsea_001.jpg", "coffee/coffee_002.jpg", "rocket/rocket_004.jpg"] {
        let decode = |set: &Path| sketch(&["decode", "--sketches", set.to_str().unwrap(), key]);
        let got = decode(&set_inner);
        assert!(got.contains("\"objects\""), "{got}");
        assert_eq!(got, decode(&set_stock), "{key}");
    }
}
