//! SageMaker's manifest files: a job's inputs named one by one instead of listed.
//!
//! `S3DataType=ManifestFile` gives a JSON array whose first element names a prefix and whose
//! others are keys relative to it:
//!
//! ```json
//! [{"prefix": "s3://bucket/images/"}, "cats/1.jpg", "dogs/7.jpg"]
//! ```
//!
//! A manifest selects objects from a bucket too large to list, or a subset of one, without
//! copying them. Outputs are placed by the key relative to the prefix, as a listed input's are.
//! Parsing does no I/O.

use serde_json::Value;

/// The inputs a manifest names.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The prefix every entry is relative to, as written (`s3://bucket/prefix/` or a folder).
    pub prefix: String,
    /// Relative keys, each once, in the manifest's order.
    pub keys: Vec<String>,
}

impl Manifest {
    /// The location to open and the keys relative to it. SageMaker appends each entry to the
    /// prefix as a string, so a prefix that does not end in `/` is a folder plus the start of
    /// every key in it (`s3://b/images/cat` and `1.jpg` give `images/cat1.jpg`). `is_dir` says
    /// whether a local prefix is a folder, which is then taken whole.
    pub fn split(&self, is_dir: impl Fn(&str) -> bool) -> (String, Vec<String>) {
        let p = self.prefix.as_str();
        let bucket_only = ["s3://", "s3a://"].iter().any(|s| p.strip_prefix(s).is_some_and(|rest| !rest.contains('/')));
        let (folder, stem) = if p.ends_with('/') {
            (p.to_string(), "")
        } else if bucket_only || (!p.contains("://") && is_dir(p)) {
            (format!("{p}/"), "")
        } else {
            match p.rsplit_once('/') {
                Some((head, tail)) => (format!("{head}/"), tail),
                None => ("./".to_string(), p),
            }
        };
        (folder, self.keys.iter().map(|k| format!("{stem}{k}")).collect())
    }
}

/// Reads a manifest's bytes; the error names the entry that is wrong.
pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    let value: Value = serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| {
        format!("not JSON: {e} (a manifest is [{{\"prefix\": \"s3://bucket/prefix/\"}}, \"key\", ...])")
    })?;
    let Value::Array(entries) = value else {
        return Err("not a JSON array (a manifest is [{\"prefix\": \"s3://bucket/prefix/\"}, \"key\", ...])".into());
    };
    let prefix = match entries.first() {
        Some(Value::Object(o)) => match o.get("prefix") {
            Some(Value::String(p)) if !p.is_empty() => p.clone(),
            _ => return Err("entry 0 must be {\"prefix\": \"...\"}, a non-empty string".into()),
        },
        _ => return Err("entry 0 must be {\"prefix\": \"...\"}: the prefix the other entries are relative to".into()),
    };
    let mut seen = std::collections::HashSet::new();
    let mut keys = Vec::with_capacity(entries.len().saturating_sub(1));
    for (i, entry) in entries.iter().enumerate().skip(1) {
        let Value::String(key) = entry else {
            return Err(format!("entry {i} is {entry}, not a key (a string)"));
        };
        // Written once: two writers of one `.out` would race.
        if seen.insert(key.as_str()) {
            keys.push(key.clone());
        }
    }
    Ok(Manifest { prefix, keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_appended_to_the_prefix_as_strings() {
        let m = |prefix: &str| Manifest { prefix: prefix.into(), keys: vec!["1.jpg".into(), "a/2.jpg".into()] };
        let split = |prefix: &str, dir: bool| m(prefix).split(|_| dir);
        assert_eq!(split("s3://b/images/", false), ("s3://b/images/".into(), vec!["1.jpg".into(), "a/2.jpg".into()]));
        assert_eq!(
            split("s3://b/images/cat", false),
            ("s3://b/images/".into(), vec!["cat1.jpg".into(), "cata/2.jpg".into()])
        );
        assert_eq!(split("s3://b", false).0, "s3://b/");
        assert_eq!(split("/data/images", true).0, "/data/images/", "a local folder is taken whole");
        assert_eq!(split("/data/images/cat", false).1[0], "cat1.jpg");
        assert_eq!(split("cat", false), ("./".into(), vec!["cat1.jpg".into(), "cata/2.jpg".into()]));
    }

    #[test]
    fn a_manifest_is_a_prefix_and_relative_keys() {
        let m =
            parse(br#"[{"prefix": "s3://b/images/"}, "cats/1.jpg", "d\u00e9j\u00e0 vu.png", "cats/1.jpg"]"#).unwrap();
        assert_eq!(m.prefix, "s3://b/images/");
        assert_eq!(m.keys, ["cats/1.jpg", "déjà vu.png"], "each key once");
        assert_eq!(parse(b"[{\"prefix\": \"/data/\"}]").unwrap().keys, Vec::<String>::new());
        for (bad, says) in [
            (&b"{\"prefix\": \"s3://b/\"}"[..], "not a JSON array"),
            (b"[\"a.jpg\"]", "entry 0 must be {\"prefix\""),
            (b"[{\"prefix\": \"\"}]", "a non-empty string"),
            (b"[{\"prefix\": \"s3://b/\"}, \"a.jpg\", 7]", "entry 2 is 7, not a key"),
            (b"[{\"prefix\": \"s3://b/\"}, \"a.jpg\"", "not JSON"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }
}
