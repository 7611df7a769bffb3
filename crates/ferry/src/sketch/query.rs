//! Queries over a sketch set: similarity, counts and statistics of a class over any subset,
//! decoding one record's object tree, and erasure to a smaller set.
//!
//! Counts and statistics work on the sum of the subset's sketches (the sketch is linear), unrolled
//! into the image's top-class slot. That sum is coherent, so its modules leak into each other's
//! correlation scores; the estimate is a joint least-squares fit over the classes the greedy
//! aggregate decoder finds plus the one asked about.

use ferry_sketch::{BlockEstimate, DecodeOptions, Sketch, Sketcher};
use serde::Serialize;

use super::profile::IMAGE_MODULE;
use super::store::{claim, write_parquet, SketchRow, SketchSet};
use crate::store::Location;

/// A loaded set ready for queries.
#[derive(Debug)]
pub struct Queries {
    /// The set.
    pub set: SketchSet,
    sketcher: Sketcher,
}

/// One similar record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Similar {
    /// Object key.
    pub key: String,
    /// Record index.
    pub record: i64,
    /// Cosine similarity with the query.
    pub cosine: f32,
}

/// A class's count and statistics over a subset.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassStats {
    /// The class asked about.
    pub module: String,
    /// Records in the subset.
    pub records: usize,
    /// Estimated number of records whose top class it is.
    pub count: f32,
    /// Estimated mean score of that class where it is the top class.
    pub mean_score: Option<f32>,
    /// Estimated mean attribute vector of those class objects.
    pub mean_attributes: Option<Vec<f32>>,
}

/// One object of a decoded record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecodedObject {
    /// Slots from the image down.
    pub path: Vec<u16>,
    /// Index of the parent object in the list.
    pub parent: Option<usize>,
    /// Module name.
    pub module: String,
    /// Effective weight (1 for the image and the top class, the probability in the bag slot).
    pub weight: f32,
    /// For a class object, the score carried in its attributes.
    pub score: Option<f32>,
    /// Attributes.
    pub attributes: Vec<f32>,
}

impl Queries {
    /// Prepares a loaded set.
    pub fn new(set: SketchSet) -> Result<Queries, String> {
        let sketcher = set.profile.sketcher().map_err(|e| e.to_string())?;
        Ok(Queries { set, sketcher })
    }

    fn sketch(row: &SketchRow) -> Sketch {
        Sketch { data: row.sketch.clone(), full_dim: row.d }
    }

    /// The row of a key (and record; the first record when `None`).
    pub fn find(&self, key: &str, record: Option<i64>) -> Result<&SketchRow, String> {
        self.set.rows.iter().find(|r| r.key == key && record.is_none_or(|i| r.record == i)).ok_or_else(|| {
            let missing = match record {
                Some(i) => format!("no sketch for {key} record {i}"),
                None => format!("no sketch for {key}"),
            };
            match self.keys_like(key).as_slice() {
                [] => missing,
                like => format!("{missing}; keys are relative to the job's input, did you mean {}?", like.join(", ")),
            }
        })
    }

    /// Up to five keys `key` may have meant: the same but for case, what is left of it once a
    /// leading `./`, the input's folder or its URL is taken off, or a key in a folder that ends
    /// with it.
    fn keys_like(&self, key: &str) -> Vec<String> {
        let mut like: Vec<String> = Vec::new();
        for r in &self.set.rows {
            let k = r.key.as_str();
            let tail = |long: &str, short: &str| long.strip_suffix(short).is_some_and(|head| head.ends_with('/'));
            if (tail(key, k) || tail(k, key) || k.eq_ignore_ascii_case(key)) && !like.iter().any(|l| l == k) {
                like.push(k.to_string());
            }
            if like.len() == 5 {
                break;
            }
        }
        like
    }

    /// The `k` records most similar to one, by cosine, best first; the record itself excluded.
    pub fn similar(&self, key: &str, record: Option<i64>, k: usize) -> Result<Vec<Similar>, String> {
        let q = self.find(key, record)?;
        let qs = Self::sketch(q);
        let mut all: Vec<Similar> = self
            .set
            .rows
            .iter()
            .filter(|r| !(r.key == q.key && r.record == q.record))
            .map(|r| Similar { key: r.key.clone(), record: r.record, cosine: qs.cosine_to(&r.sketch) })
            .collect();
        all.sort_by(|a, b| b.cosine.total_cmp(&a.cosine).then(a.key.cmp(&b.key)));
        all.truncate(k);
        Ok(all)
    }

    /// Count and statistics of a class over the records whose key starts with `prefix`.
    pub fn class_stats(&self, module: &str, prefix: &str) -> Result<ClassStats, String> {
        let ids = self.set.profile.modules_named(module);
        if ids.is_empty() || ids.contains(&IMAGE_MODULE) {
            let near = self.set.profile.modules_like(module, 5);
            let hint = if near.is_empty() { String::new() } else { format!("; did you mean {}?", near.join(", ")) };
            return Err(format!(
                "{module:?} is not a module of this sketch set (a label from the model's labels.txt or class:N; \
                 for the stages recipe, <stage>:cNN){hint}"
            ));
        }
        let rows: Vec<&SketchRow> = self.set.rows.iter().filter(|r| r.key.starts_with(prefix)).collect();
        if rows.is_empty() {
            return Ok(ClassStats {
                module: module.into(),
                records: 0,
                count: 0.0,
                mean_score: None,
                mean_attributes: None,
            });
        }
        if !self.set.profile.stages.is_empty() {
            return self.decoded_stats(module, &ids, &rows);
        }
        let kept = rows.iter().map(|r| r.sketch.len()).min().expect("not empty");
        let mut total = Sketch { data: vec![0.0; kept], full_dim: self.set.profile.d };
        for r in &rows {
            total += r.sketch.as_slice();
        }
        let sk = &self.sketcher;
        let view = sk.view(&total).map_err(|e| e.to_string())?;
        let slot = sk.unroll(&view, IMAGE_MODULE, 0).map_err(|e| e.to_string())?;
        let k = self.set.profile.class_dim + 1;
        // Leave room in the joint fit for the modules asked about.
        let room = (kept / (2 * k)).saturating_sub(ids.len());
        let mut modules: Vec<u32> = sk.decode_aggregate(&slot, room).into_iter().map(|e| e.module).collect();
        for id in &ids {
            if !modules.contains(id) {
                modules.push(*id);
            }
        }
        let est: Vec<BlockEstimate> = sk.joint(&slot, &modules).map_err(|e| e.to_string())?;
        let mine: Vec<&BlockEstimate> = est.iter().filter(|e| ids.contains(&e.module)).collect();
        let count: f32 = mine.iter().map(|e| e.weight).sum();
        let (mean_score, mean_attributes) = if count >= 0.5 {
            let mut sum = vec![0.0f32; k - 1];
            for e in &mine {
                sum.iter_mut().zip(&e.attr_sum).for_each(|(s, v)| *s += v);
            }
            let mean: Vec<f32> = sum.iter().map(|v| v / count).collect();
            (Some(self.set.profile.score_of(&mean)), Some(mean))
        } else {
            (None, None)
        };
        Ok(ClassStats { module: module.into(), records: rows.len(), count, mean_score, mean_attributes })
    }

    /// Counts by decoding each record: for the stages recipe, whose objects sit at many paths
    /// below modules that differ from record to record, so sums of sketches do not line up.
    fn decoded_stats(&self, module: &str, ids: &[u32], rows: &[&SketchRow]) -> Result<ClassStats, String> {
        let opts = DecodeOptions { max_depth: self.set.profile.depth(), max_per_slot: 1, refine: false };
        let mut count = 0usize;
        let mut sum: Vec<f32> = Vec::new();
        // In chunks: a batch decodes faster, and a chunk bounds the residuals held at once.
        for chunk in rows.chunks(256) {
            let sketches: Vec<Sketch> = chunk.iter().map(|r| Self::sketch(r)).collect();
            for x in self.sketcher.decode_batch(&sketches, opts).map_err(|e| e.to_string())?.into_iter().flatten() {
                if ids.contains(&x.module) {
                    count += 1;
                    sum.resize(x.attr.len(), 0.0);
                    sum.iter_mut().zip(&x.attr).for_each(|(s, v)| *s += v);
                }
            }
        }
        let mean = (count > 0).then(|| sum.iter().map(|v| v / count as f32).collect());
        Ok(ClassStats {
            module: module.into(),
            records: rows.len(),
            count: count as f32,
            mean_score: None,
            mean_attributes: mean,
        })
    }

    /// The object tree of one record.
    pub fn decode(&self, key: &str, record: Option<i64>) -> Result<Vec<DecodedObject>, String> {
        let row = self.find(key, record)?;
        let p = &self.set.profile;
        let per_slot = if p.stages.is_empty() { p.top_classes.max(1) } else { 1 };
        let opts = DecodeOptions { max_depth: p.depth(), max_per_slot: per_slot, refine: true };
        let found = self.sketcher.decode(&Self::sketch(row), opts).map_err(|e| e.to_string())?;
        Ok(found
            .into_iter()
            .map(|x| DecodedObject {
                score: (x.module != IMAGE_MODULE && p.stages.is_empty()).then(|| p.score_of(&x.attr)),
                module: self.set.profile.modules[x.module as usize].clone(),
                path: x.path,
                parent: x.parent,
                weight: x.weight,
                attributes: x.attr,
            })
            .collect())
    }
}

/// Records per part of an erased copy.
const ERASED_PART_RECORDS: usize = 4096;

/// Writes a copy of a set keeping the first `keep` coordinates of every sketch, in parts of
/// about as many records as a job writes per part. Returns the number of parts.
pub async fn erase(set: &SketchSet, keep: usize, output: &str, max_retries: usize) -> Result<usize, String> {
    if keep == 0 || keep > set.profile.d {
        return Err(format!("--keep must be between 1 and d = {}", set.profile.d));
    }
    let out = Location::open(output, true, max_retries).map_err(|e| e.to_string())?;
    claim(&out, &set.profile).await?;
    let mut written = 0;
    for chunk in set.rows.chunks(ERASED_PART_RECORDS) {
        let rows: Vec<SketchRow> = chunk
            .iter()
            .map(|r| SketchRow { sketch: r.sketch[..keep.min(r.sketch.len())].to_vec(), ..r.clone() })
            .collect();
        let path = out.prefix.clone().join(format!("part-erased-{written:05}.parquet").as_str());
        let body = write_parquet(&rows, &set.profile)?;
        out.write_whole(&path, body).await.map_err(|e| format!("{path}: {e}"))?;
        written += 1;
    }
    Ok(written)
}
