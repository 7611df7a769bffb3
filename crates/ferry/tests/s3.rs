//! `ferry transform` against a real S3-compatible server (s3s-fs) on 127.0.0.1.
//!
//! `.ci/run` starts the server and exports `AWS_ENDPOINT_URL` and `FERRY_TEST_S3_BUCKET`; without
//! them the test starts its own `s3s-fs` (which must be installed: see the README).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

struct Server {
    endpoint: String,
    bucket: String,
    env: Vec<(String, String)>,
    _child: Option<KillOnDrop>,
    _dir: Option<tempfile::TempDir>,
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server() -> Server {
    if let (Ok(endpoint), Ok(bucket)) = (std::env::var("AWS_ENDPOINT_URL"), std::env::var("FERRY_TEST_S3_BUCKET")) {
        let env = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"]
            .iter()
            .map(|k| {
                (k.to_string(), std::env::var(k).unwrap_or_else(|_| panic!("{k} must be set with AWS_ENDPOINT_URL")))
            })
            .collect();
        return Server { endpoint, bucket, env, _child: None, _dir: None };
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ferry-test")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("s3s-fs")
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            "ferry",
            "--secret-key",
            "ferry-secret",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("s3s-fs is not installed: cargo install s3s-fs@0.14.1 --features binary --locked");
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let env = vec![
        ("AWS_ACCESS_KEY_ID".into(), "ferry".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "ferry-secret".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_ENDPOINT_URL".into(), endpoint.clone()),
    ];
    Server { endpoint, bucket: "ferry-test".into(), env, _child: Some(KillOnDrop(child)), _dir: Some(dir) }
}

impl Server {
    fn store(&self) -> Arc<dyn ObjectStore> {
        let get = |k: &str| self.env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(&self.bucket)
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_access_key_id(get("AWS_ACCESS_KEY_ID"))
                .with_secret_access_key(get("AWS_SECRET_ACCESS_KEY"))
                .with_region(get("AWS_REGION"))
                .build()
                .unwrap(),
        )
    }

    fn transform(&self, args: &[&str]) -> std::process::Output {
        self.ferry(&[&["transform"], args].concat())
    }

    fn ferry(&self, args: &[&str]) -> std::process::Output {
        let mut c = ferry();
        c.args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        eprintln!("ferry {}\n{}", args.join(" "), stderr(&out));
        out
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// A prefix no other test run uses, in a bucket the runs share.
fn unique(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos())
}

/// Every file under `dir` put under `prefix`, at its relative path.
fn put_dir(store: &dyn ObjectStore, dir: &std::path::Path, prefix: &str) {
    block_on(async {
        for name in files(dir) {
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            store.put(&Path::parse(format!("{prefix}/{name}")).unwrap(), bytes.into()).await.unwrap();
        }
    });
}

#[test]
fn transform_reads_and_writes_s3() {
    let s = server();
    let store = s.store();
    let run = unique("run");
    block_on(async {
        for f in ["chelsea.jpg", "coffee.png", "astronaut.png", "rocket.jpg"] {
            let bytes = std::fs::read(examples().join(f)).unwrap();
            store.put(&Path::parse(format!("{run}/images été/{f}")).unwrap(), bytes.into()).await.unwrap();
        }
        let bytes = std::fs::read(examples().join("coffee.png")).unwrap();
        // A key that needs escaping in a URL; its output key is the same name plus `.out`.
        store
            .put(&Path::parse(format!("{run}/images été/nested/été #1/cup 2.png")).unwrap(), bytes.into())
            .await
            .unwrap();
    });
    // Prefixes and keys as they are written, not percent-encoded.
    let input = format!("s3://{}/{run}/images été/", s.bucket);
    let output = format!("s3://{}/{run}/out/", s.bucket);
    let model = mobilenet();
    let o = s.transform(&["--model", model.to_str().unwrap(), "--input", &input, "--output", &output, "--top-k", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let label = |key: String| -> String {
        let bytes = block_on(async { store.get(&Path::parse(key).unwrap()).await.unwrap().bytes().await.unwrap() });
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["predictions"][0]["labels"][0].as_str().unwrap().to_string()
    };
    assert_eq!(label(format!("{run}/out/chelsea.jpg.out")), "Egyptian cat");
    assert_eq!(label(format!("{run}/out/coffee.png.out")), "espresso");
    assert_eq!(label(format!("{run}/out/nested/été #1/cup 2.png.out")), "espresso");
    // Outputs are served as JSON.
    let got = block_on(store.get(&Path::parse(format!("{run}/out/chelsea.jpg.out")).unwrap())).unwrap();
    let mime = got.attributes.get(&object_store::Attribute::ContentType).map(|v| v.to_string());
    assert_eq!(mime.as_deref(), Some("application/json"));
    let listed: Vec<String> = block_on(async {
        use futures::TryStreamExt;
        let metas: Vec<_> = store.list(Some(&Path::from(format!("{run}/out")))).try_collect().await.unwrap();
        let mut keys: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        keys
    });
    let outs: Vec<&String> = listed.iter().filter(|k| k.ends_with(".out")).collect();
    assert_eq!(outs.len(), 5, "{listed:?}");
    assert!(listed.contains(&format!("{run}/out/_ferry/report.json")), "{listed:?}");

    // A rerun finds every output and does nothing.
    let o = s.transform(&["--model", model.to_str().unwrap(), "--input", &input, "--output", &output, "--top-k", "3"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("5 already done"), "{}", stderr(&o));

    // A prefix that names nothing, as a folder or as the start of a key, is a mistake to say, not
    // an empty job.
    for nothing in [format!("s3://{}/{run}/imagse/", s.bucket), format!("s3://{}/{run}/imagse", s.bucket)] {
        let o = s.transform(&["--model", model.to_str().unwrap(), "--input", &nothing, "--output", &output]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(&format!("no objects under {nothing}")), "{}", stderr(&o));
    }
}

/// A prefix that is not a folder selects what S3 and SageMaker's `S3Prefix` select: every key that
/// begins with it (one object's key selects that object), with outputs relative to its folder part.
#[test]
fn a_key_name_prefix_selects_the_keys_that_begin_with_it() {
    let s = server();
    let store = s.store();
    let run = unique("key-prefix");
    let data = tempfile::tempdir().unwrap();
    for (name, from) in [
        ("chelsea.jpg", "chelsea.jpg"),
        ("coffee.png", "coffee.png"),
        ("cups/c.png", "coffee.png"),
        ("rocket.jpg", "rocket.jpg"),
    ] {
        let to = data.path().join("in").join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(examples().join(from), to).unwrap();
    }
    std::fs::create_dir(data.path().join("in-2")).unwrap();
    std::fs::copy(examples().join("astronaut.png"), data.path().join("in-2/astronaut.png")).unwrap();
    put_dir(store.as_ref(), data.path(), &run);
    let model = mobilenet();
    let job = |input: String, out: &std::path::Path| {
        let out = out.to_str().unwrap();
        s.transform(&["--model", model.to_str().unwrap(), "--input", &input, "--output", out, "--top-k", "2"])
    };
    let whole = tempfile::tempdir().unwrap();
    assert!(job(format!("s3://{}/{run}/", s.bucket), whole.path()).status.success());

    // (prefix, where its outputs are in the job over everything, outputs); a prefix that names a
    // folder is that folder, as before.
    let all_of_in = vec!["chelsea.jpg.out", "coffee.png.out", "cups/c.png.out", "rocket.jpg.out"];
    let everything = ["in-2/astronaut.png.out", "in/chelsea.jpg.out", "in/coffee.png.out"];
    let everything = [&everything[..], &["in/cups/c.png.out", "in/rocket.jpg.out"]].concat();
    for (prefix, folder, outputs) in [
        ("in/c", "in", vec!["chelsea.jpg.out", "coffee.png.out", "cups/c.png.out"]),
        ("in/rocket.jpg", "in", vec!["rocket.jpg.out"]),
        ("in", "in", all_of_in),
        ("i", "", everything),
    ] {
        let out = tempfile::tempdir().unwrap();
        let o = job(format!("s3://{}/{run}/{prefix}", s.bucket), out.path());
        assert!(o.status.success(), "{prefix}: {}", stderr(&o));
        let mut written = files(out.path());
        written.retain(|f| f.ends_with(".out"));
        assert_eq!(written, outputs, "{prefix}");
        // The same bytes as the job over everything, at the same key below the folder part.
        for f in &written {
            let same = std::fs::read(whole.path().join(folder).join(f)).unwrap();
            assert_eq!(std::fs::read(out.path().join(f)).unwrap(), same, "{prefix}: {f}");
        }
        let o = job(format!("s3://{}/{run}/{prefix}", s.bucket), out.path());
        let n = outputs.len();
        assert!(stderr(&o).contains(&format!("{n} objects (0 written, 0 failed, {n} already done)")), "{}", stderr(&o));
    }

    // Outputs whose keys begin with the prefix too are not inputs of the rerun.
    let (input, output) = (format!("s3://{}/{run}/in/c", s.bucket), format!("s3://{}/{run}/in/c-out/", s.bucket));
    for says in ["3 objects (3 written, 0 failed, 0 already done)", "3 objects (0 written, 0 failed, 3 already done)"] {
        let o = s.transform(&["--model", model.to_str().unwrap(), "--input", &input, "--output", &output]);
        assert!(o.status.success() && stderr(&o).contains(says), "{}", stderr(&o));
    }
}

#[test]
fn missing_credentials_are_named() {
    let s = server();
    let mut c = ferry();
    for (k, v) in s.env.iter().filter(|(k, _)| k != "AWS_ACCESS_KEY_ID" && k != "AWS_SECRET_ACCESS_KEY") {
        c.env(k, v);
    }
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_SKIP_SIGNATURE",
        "AWS_PROFILE",
    ] {
        c.env_remove(k);
    }
    // Whatever this machine's ~/.aws holds.
    c.env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials").env("AWS_CONFIG_FILE", "/nonexistent/config");
    let input = format!("s3://{}/nothing-here/", s.bucket);
    let out = tempfile::tempdir().unwrap();
    let o = c
        .args(["transform", "--model", mobilenet().to_str().unwrap(), "--input", &input])
        .args(["--output", out.path().to_str().unwrap(), "--max-retries", "0"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("listing {input}")) && err.contains("no AWS credentials are set"), "{err}");
}

#[test]
fn a_missing_bucket_and_a_wrong_secret_are_said_in_words() {
    let s = server();
    let out = tempfile::tempdir().unwrap();
    let model = mobilenet();
    let input = format!("s3://{}/anything/", s.bucket);
    for (bucket, secret, says) in [
        ("no-such-bucket-here", None, "(bucket \"no-such-bucket-here\" does not exist at this endpoint)"),
        (s.bucket.as_str(), Some("not-the-secret"), "(the secret key does not belong to the access key id"),
    ] {
        let input = input.replacen(&s.bucket, bucket, 1);
        let mut c = ferry();
        c.args(["transform", "--model", model.to_str().unwrap(), "--input", &input]);
        c.args(["--output", out.path().to_str().unwrap(), "--max-retries", "0"]);
        for (k, v) in &s.env {
            c.env(k, v);
        }
        if let Some(secret) = secret {
            c.env("AWS_SECRET_ACCESS_KEY", secret);
        }
        let o = c.output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("listing {input}")) && err.contains(says), "{err}");
    }
}

/// An Indexed Job's pods, simulated: three `--shard i/3` processes at once against one bucket
/// split the objects between them, each object written once, and together write what one job
/// writes, byte for byte.
#[test]
fn shards_split_a_job_between_processes() {
    let s = server();
    let store = s.store();
    let run = unique("shards");
    let local = tempfile::tempdir().unwrap();
    make_dataset(local.path(), 36);
    let names = files(local.path());
    put_dir(store.as_ref(), local.path(), &format!("{run}/in"));
    let model = mobilenet();
    let input = format!("s3://{}/{run}/in/", s.bucket);
    let args = |output: &str| {
        let base = ["--model", model.to_str().unwrap(), "--input", &input, "--output", output, "--top-k", "3"];
        base.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let whole = format!("s3://{}/{run}/whole/", s.bucket);
    let o = s.transform(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));

    // The pods also sketch into one set, which they claim at the same moment.
    let profile = local.path().join("profile.json");
    let fit = ["sketch", "fit", "--model", model.to_str().unwrap(), "--input", local.path().to_str().unwrap()];
    let o = s.ferry(&[&fit[..], &["--output", profile.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let set = format!("s3://{}/{run}/sketches/", s.bucket);
    let sharded = format!("s3://{}/{run}/sharded/", s.bucket);
    let pods: Vec<_> = (0..3)
        .map(|i| {
            let mut c = ferry();
            c.arg("transform").args(args(&sharded)).args(["--shard", &format!("{i}/3"), "--threads", "1"]);
            c.args(["--sketch", &set, "--sketch-profile", profile.to_str().unwrap()]);
            c.envs(s.env.iter().map(|(k, v)| (k, v))).stdout(Stdio::null()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for pod in pods {
        let o = pod.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let get = |key: String| {
        block_on(async { store.get(&Path::parse(&key).unwrap()).await.unwrap().bytes().await.unwrap().to_vec() })
    };
    let mut written = 0;
    for i in 0..3 {
        let report: serde_json::Value =
            serde_json::from_slice(&get(format!("{run}/sharded/_ferry/report-{i}-of-3.json"))).unwrap();
        assert_eq!(report["shard"], format!("{i}/3"), "{report}");
        assert_eq!(report["objects_failed"], 0, "{report}");
        assert_eq!(report["objects_succeeded"], report["objects_total"], "{report}");
        let n = report["objects_total"].as_u64().unwrap();
        assert!(n > 0 && n < names.len() as u64, "shard {i} has {n} of {} objects", names.len());
        written += n;
    }
    assert_eq!(written, names.len() as u64, "each object in exactly one shard");
    for name in &names {
        let (a, b) = (get(format!("{run}/whole/{name}.out")), get(format!("{run}/sharded/{name}.out")));
        assert!(a == b, "{name}: the sharded output differs from the whole job's");
    }
    // One set: every object's sketch once, from parts each shard named for itself.
    let o = s.ferry(&["sketch", "similar", "--sketches", &set, "--to", &names[0], "-k", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), names.len() - 1, "every other object once");
    let parts: Vec<String> = block_on(async {
        use futures::TryStreamExt;
        let metas: Vec<_> = store.list(Some(&Path::from(format!("{run}/sketches")))).try_collect().await.unwrap();
        metas.into_iter().map(|m| m.location.to_string()).filter(|k| k.ends_with(".parquet")).collect()
    });
    for i in 0..3 {
        assert!(parts.iter().any(|k| k.contains(&format!("-shard{i}of3-"))), "{parts:?}");
    }
    // A pod that restarts resumes its own shard.
    let mut again = args(&sharded);
    again.extend(["--shard".into(), "1/3".into()]);
    let o = s.transform(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&get(format!("{run}/sharded/_ferry/report-1-of-3.json"))).unwrap();
    assert_eq!(report["objects_skipped"], report["objects_total"], "{report}");
}

/// A manifest in the bucket names some of the objects under a prefix; only those run.
#[test]
fn a_manifest_in_the_bucket_selects_objects() {
    let s = server();
    let store = s.store();
    let run = unique("manifest");
    let prefix = format!("s3://{}/{run}/images/", s.bucket);
    let manifest = serde_json::json!([{"prefix": prefix}, "a/chelsea.jpg", "rocket.jpg"]).to_string();
    block_on(async {
        for (key, file) in
            [("a/chelsea.jpg", "chelsea.jpg"), ("rocket.jpg", "rocket.jpg"), ("coffee.png", "coffee.png")]
        {
            let bytes = std::fs::read(examples().join(file)).unwrap();
            store.put(&Path::parse(format!("{run}/images/{key}")).unwrap(), bytes.into()).await.unwrap();
        }
        store.put(&Path::parse(format!("{run}/jobs/manifest.json")).unwrap(), manifest.into()).await.unwrap();
    });
    let out = tempfile::tempdir().unwrap();
    let input = format!("s3://{}/{run}/jobs/manifest.json", s.bucket);
    let model = mobilenet();
    let o = s.transform(&[
        "--model",
        model.to_str().unwrap(),
        "--input",
        &input,
        "--manifest",
        "--output",
        out.path().to_str().unwrap(),
        "--top-k",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(out.path()), ["_ferry/job.json", "_ferry/report.json", "a/chelsea.jpg.out", "rocket.jpg.out"]);
    assert_eq!(top_label(&out.path().join("a/chelsea.jpg.out")), "Egyptian cat");
}

/// Settings the store would only trip over while signing its first request (where it panicked)
/// are one clear message before anything is read.
#[test]
fn unusable_endpoint_and_token_are_named_up_front() {
    let out = tempfile::tempdir().unwrap();
    for (var, value, says) in [
        ("AWS_ENDPOINT_URL", "localhost:9000", "AWS_ENDPOINT_URL \"localhost:9000\" is not an http:// or https:// URL"),
        ("AWS_SESSION_TOKEN", "token\n", "AWS_SESSION_TOKEN holds a line break"),
    ] {
        let o = ferry()
            .env("AWS_ACCESS_KEY_ID", "key")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_REGION", "us-east-1")
            .env(var, value)
            .args(["transform", "--model", mobilenet().to_str().unwrap(), "--input", "s3://bucket/in/"])
            .args(["--output", out.path().to_str().unwrap(), "--max-retries", "0"])
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{var}: {err}");
        assert!(err.starts_with(&format!("error: {says}")) && !err.contains("panicked"), "{var}: {err}");
    }
}

#[test]
fn a_large_output_is_uploaded_in_parts() {
    let s = server();
    let store = s.store();
    let run = unique("big");
    let img =
        image::RgbImage::from_fn(512, 512, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 7) as u8]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    block_on(async { store.put(&Path::from(format!("{run}/in/grid.png")), png.into()).await.unwrap() });

    let model = repo().join("tests/fixtures/identity_512");
    let input = format!("s3://{}/{run}/in", s.bucket);
    let output = format!("s3://{}/{run}/out", s.bucket);
    let o = s.transform(&[
        "--model",
        model.to_str().unwrap(),
        "--input",
        &input,
        "--output",
        &output,
        "--part-size-mb",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let key = Path::from(format!("{run}/out/grid.png.out"));
    let (meta, bytes) = block_on(async {
        let meta = store.head(&key).await.unwrap();
        let bytes = store.get(&key).await.unwrap().bytes().await.unwrap();
        (meta, bytes)
    });
    assert!(bytes.len() > 5 << 20, "output is {} bytes, under one part", bytes.len());
    let etag = meta.e_tag.unwrap_or_default();
    assert!(etag.contains('-'), "a multipart upload has an ETag ending in -<parts>, got {etag}");
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let planes = &v["predictions"][0];
    for (x, y) in [(0usize, 0usize), (300, 17), (511, 511)] {
        let px = img.get_pixel(x as u32, y as u32);
        for c in 0..3 {
            let got = planes[c][y][x].as_f64().unwrap();
            assert!((got - px[c] as f64 / 255.0).abs() < 1e-6, "channel {c} at ({x}, {y}): {got}");
        }
    }
}

#[test]
fn sketches_are_fitted_written_and_queried_on_s3() {
    let s = server();
    let store = s.store();
    let run = unique("sk");
    let local = tempfile::tempdir().unwrap();
    make_variants(local.path(), 12);
    put_dir(store.as_ref(), local.path(), &format!("{run}/images"));
    let (input, output, set, small) = (
        format!("s3://{}/{run}/images", s.bucket),
        format!("s3://{}/{run}/out", s.bucket),
        format!("s3://{}/{run}/sketches", s.bucket),
        format!("s3://{}/{run}/small", s.bucket),
    );
    let model = mobilenet();
    let model = model.to_str().unwrap();
    let profile = local.path().join("profile.json");
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    // `fit` reads `--input` as `transform` does: here a key-name prefix, not a folder.
    let beginning = format!("s3://{}/{run}/imag", s.bucket);
    let o = s.ferry(&["sketch", "fit", "--model", model, "--input", &beginning, "--output", profile.to_str().unwrap()]);
    assert!(o.status.success() && stderr(&o).contains("fitted on 48 records"), "{}", stderr(&o));
    let p = profile.to_str().unwrap();
    ok(s.transform(&[
        "--model",
        model,
        "--input",
        &input,
        "--output",
        &output,
        "--top-k",
        "1",
        "--sketch",
        &set,
        "--sketch-profile",
        p,
    ]));
    let listed: Vec<String> = block_on(async {
        use futures::TryStreamExt;
        let metas: Vec<_> = store.list(Some(&Path::from(format!("{run}/sketches")))).try_collect().await.unwrap();
        metas.into_iter().map(|m| m.location.to_string()).collect()
    });
    // Part files, each put whole: no file per object.
    let parts: Vec<&String> = listed.iter().filter(|k| k.ends_with(".parquet")).collect();
    assert!(!parts.is_empty() && parts.iter().all(|k| k.starts_with(&format!("{run}/sketches/part-"))), "{listed:?}");
    assert!(listed.contains(&format!("{run}/sketches/_ferry/sketch_profile.json")));

    let all = ok(s.ferry(&["sketch", "similar", "--sketches", &set, "--to", "coffee/coffee_003.jpg", "-k", "1000"]));
    assert_eq!(all.lines().count(), 47, "every other image once");
    let hits = ok(s.ferry(&["sketch", "similar", "--sketches", &set, "--to", "coffee/coffee_003.jpg", "-k", "5"]));
    for line in hits.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["key"].as_str().unwrap().starts_with("coffee/"), "{hits}");
    }
    // Keys are relative to the job's input: the image's URL, or its name without its folder, is
    // answered with the key meant.
    for asked in [format!("{input}/coffee/coffee_003.jpg"), "coffee_003.jpg".to_string()] {
        let o = s.ferry(&["sketch", "similar", "--sketches", &set, "--to", &asked]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("did you mean coffee/coffee_003.jpg?"), "{}", stderr(&o));
    }
    let count: f64 =
        ok(s.ferry(&["sketch", "count", "--sketches", &set, "--module", "espresso"])).trim().parse().unwrap();
    let predicted = (0..12)
        .filter(|v| {
            let key = Path::from(format!("{run}/out/coffee/coffee_{v:03}.jpg.out"));
            let bytes = block_on(async { store.get(&key).await.unwrap().bytes().await.unwrap() });
            String::from_utf8_lossy(&bytes).contains("\"espresso\"")
        })
        .count() as f64;
    assert!((count - predicted).abs() <= 0.1 * predicted.max(10.0), "sketch count {count}, predicted {predicted}");
    ok(s.ferry(&["sketch", "erase", "--sketches", &set, "--keep", "512", "--output", &small]));
    let count: f64 =
        ok(s.ferry(&["sketch", "count", "--sketches", &small, "--module", "espresso"])).trim().parse().unwrap();
    assert!((count - predicted).abs() <= 0.2 * predicted.max(10.0), "after erasure {count}, predicted {predicted}");
}

#[test]
fn credentials_come_from_an_aws_cli_profile() {
    // The AWS CLI's files, as `aws configure --profile ci` writes them, and no AWS_* variable
    // but the profile's name: keys from the credentials file, region and endpoint from the config.
    let s = server();
    let get = |k: &str| s.env.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let run = unique("profile");
    let store = s.store();
    block_on(async {
        let bytes = std::fs::read(examples().join("chelsea.jpg")).unwrap();
        store.put(&Path::from(format!("{run}/in/chelsea.jpg")), bytes.into()).await.unwrap();
    });
    let aws = tempfile::tempdir().unwrap();
    let (credentials, config) = (aws.path().join("credentials"), aws.path().join("config"));
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[ci]\n\
             aws_access_key_id = {}\naws_secret_access_key = {}\n\n[assumed]\nsource_profile = ci\n",
            get("AWS_ACCESS_KEY_ID"),
            get("AWS_SECRET_ACCESS_KEY")
        ),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[profile ci]\nregion = {}\nendpoint_url = {}\n\n[profile assumed]\nrole_arn = arn:aws:iam::1:role/x\n",
            get("AWS_REGION"),
            s.endpoint
        ),
    )
    .unwrap();
    let job = |profile: &str, out: &std::path::Path| {
        let mut c = ferry();
        for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"]
        {
            c.env_remove(k);
        }
        c.env("AWS_SHARED_CREDENTIALS_FILE", &credentials).env("AWS_CONFIG_FILE", &config).env("AWS_PROFILE", profile);
        let input = format!("s3://{}/{run}/in/", s.bucket);
        c.args(["transform", "--model", mobilenet().to_str().unwrap(), "--input", &input, "--top-k", "1"])
            .args(["--output", out.to_str().unwrap(), "--max-retries", "0"])
            .output()
            .unwrap()
    };
    let out = tempfile::tempdir().unwrap();
    let o = job("ci", out.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&out.path().join("chelsea.jpg.out"));
    assert_eq!(v["predictions"][0]["labels"][0], "Egyptian cat");

    // A profile that assumes a role is not run, but said how to export; an unknown one is named.
    let o = job("assumed", out.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("aws configure export-credentials --profile assumed"), "{}", stderr(&o));
    let o = job("nobody", out.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("AWS_PROFILE=nobody"), "{}", stderr(&o));
}

/// A bucket served by `tests/s3_moto.py` (moto's S3 server) in `mode`, and the job's output
/// over `s3://<bucket>/in/` into a local folder through `model`.
/// A job over `s3://<bucket>/<prefix>` of a bucket `tests/s3_moto.py <mode>` fills.
fn moto_job(
    mode: &[&str],
    bucket: &str,
    prefix: &str,
    model: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    use std::io::BufRead;
    let mut served = Command::new("python3")
        .arg(repo().join("tests/s3_moto.py"))
        .arg(examples().join("chelsea.jpg"))
        .args(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 tests/s3_moto.py");
    let mut endpoint = String::new();
    std::io::BufReader::new(served.stdout.take().unwrap()).read_line(&mut endpoint).unwrap();
    assert!(endpoint.starts_with("http://"), "tests/s3_moto.py printed {endpoint:?} (pip install moto[server])");
    let _server = KillOnDrop(served);
    let input = format!("s3://{bucket}/{prefix}");
    ferry()
        .args(["transform", "--model", model.to_str().unwrap(), "--input", &input])
        .args(["--output", out.to_str().unwrap()])
        .env("AWS_ENDPOINT_URL", endpoint.trim())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap()
}

#[test]
fn folder_markers_are_not_inputs() {
    // An S3 console's "create folder" leaves a zero-byte object whose key ends in "/". s3s-fs keeps
    // objects as files and cannot hold such keys, so this bucket is served by moto's S3 server.
    let out = tempfile::tempdir().unwrap();
    let o = moto_job(&["markers"], "markers", "in/", &mobilenet(), out.path());
    let err = stderr(&o);
    // The two markers are not objects; the real empty object fails as one.
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("3 objects (2 written, 1 failed"), "{err}");
    assert!(err.contains("in/zero.jpg record 0: empty object"), "{err}");
    assert_eq!(files(out.path()), ["_ferry/job.json", "_ferry/report.json", "cat.jpg.out", "sub/cat.jpg.out"]);
}

#[test]
fn keys_the_store_library_cannot_name_fail_alone() {
    // One key with an empty part and one with a tab used to fail the page of the listing they
    // were on, and with it the whole job. Over 1,000 objects, so the listing has pages.
    let out = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/typed_outputs");
    let o = moto_job(&["odd-keys", "1001"], "oddkeys", "in/", &model, out.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("1004 objects (1002 written, 2 failed"), "{err}");
    assert!(err.contains("failed: in//x.jpg: its key has an empty part"), "{err}");
    assert!(err.contains("failed: in/t\\tab.jpg: its key has a control character (\\t)"), "{err}");
    let written = files(out.path());
    assert_eq!(written.len(), 2 + 1002, "the job record, the report and every other object's output");
    assert!(written.contains(&"a b/c+d.jpg.out".to_string()) && written.contains(&"many/01000.jpg.out".to_string()));
    let report = json(&out.path().join("_ferry/report.json"));
    let failed: Vec<&str> =
        report["failures"].as_array().unwrap().iter().map(|f| f["object"].as_str().unwrap()).collect();
    assert_eq!(failed, ["in//x.jpg", "in/t\tab.jpg"], "the report keeps the keys as they are");
}

#[test]
fn a_key_name_prefix_skips_markers_and_names_keys_the_store_library_cannot() {
    // `in/s` begins the marker `in/sub/` and `in/sub/cat.jpg`.
    let out = tempfile::tempdir().unwrap();
    let o = moto_job(&["markers"], "markers", "in/s", &mobilenet(), out.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(out.path()), ["_ferry/job.json", "_ferry/report.json", "sub/cat.jpg.out"]);
    // `in/t` begins only `in/t<TAB>ab.jpg`, which fails the store's own listing.
    let out = tempfile::tempdir().unwrap();
    let model = repo().join("tests/fixtures/typed_outputs");
    let o = moto_job(&["odd-keys", "3"], "oddkeys", "in/t", &model, out.path());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("1 objects (0 written, 1 failed"), "{err}");
    assert!(err.contains("failed: in/t\\tab.jpg: its key has a control character (\\t)"), "{err}");
}

#[test]
fn a_model_is_read_from_the_bucket() {
    // As SageMaker keeps it: a model.tar.gz, or the model directory's files under a prefix.
    let s = server();
    let store = s.store();
    let run = unique("model");
    let archive = tempfile::tempdir().unwrap();
    let tar = archive.path().join("model.tar.gz");
    let made = Command::new("tar")
        .args([
            "-czf",
            tar.to_str().unwrap(),
            "-C",
            mobilenet().to_str().unwrap(),
            "model.onnx",
            "ferry.toml",
            "labels.txt",
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    block_on(async {
        let put = |key: String, path: std::path::PathBuf| {
            let store = store.clone();
            async move { store.put(&Path::from(key), std::fs::read(path).unwrap().into()).await.unwrap() }
        };
        put(format!("{run}/artifact/model.tar.gz"), tar.clone()).await;
        for f in ["model.onnx", "ferry.toml", "labels.txt"] {
            put(format!("{run}/dir/{f}"), mobilenet().join(f)).await;
        }
        put(format!("{run}/images/chelsea.jpg"), examples().join("chelsea.jpg")).await;
    });
    for model in [format!("s3://{}/{run}/artifact/model.tar.gz", s.bucket), format!("s3://{}/{run}/dir/", s.bucket)] {
        let out = tempfile::tempdir().unwrap();
        let input = format!("s3://{}/{run}/images/", s.bucket);
        let o = s.transform(&[
            "--model",
            &model,
            "--input",
            &input,
            "--output",
            out.path().to_str().unwrap(),
            "--top-k",
            "1",
        ]);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let v = json(&out.path().join("chelsea.jpg.out"));
        assert_eq!(v["predictions"][0]["labels"][0], "Egyptian cat", "{model}");
    }
    let nothing = format!("s3://{}/{run}/images/", s.bucket);
    let out = tempfile::tempdir().unwrap();
    let o = s.transform(&["--model", &nothing, "--input", &nothing, "--output", out.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("{nothing} holds no model.onnx")), "{}", stderr(&o));
    // A prefix of many objects (a bucket's root, say) is not copied.
    block_on(async {
        for i in 0..65 {
            store.put(&Path::from(format!("{run}/many/{i}.txt")), vec![b'x'].into()).await.unwrap();
        }
    });
    let many = format!("s3://{}/{run}/many/", s.bucket);
    let o = s.transform(&["--model", &many, "--input", &nothing, "--output", out.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("{many} holds 65 objects")), "{}", stderr(&o));
}
