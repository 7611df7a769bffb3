//! Sketch sets on disk: Parquet files plus the profile that reads them.
//!
//! A set is a prefix holding Parquet part files (`part-<job start>-<n>.parquet`, rows: object
//! key, record index, sketch vector, seed, d) and `_ferry/sketch_profile.json`. A job writes a
//! part with one atomic put before the `.out`s of the objects in it, so a finished object always
//! has its sketches and a rerun needs no extra bookkeeping; a job killed between the two redoes
//! those objects and writes their (identical) rows again, which readers drop. The vector is a
//! Parquet `LIST<FLOAT>`, which DuckDB (`read_parquet('set/*.parquet')`), Polars and pandas read
//! as a list column; an erased set simply has shorter lists. Sets those tools filter or compact
//! come back compressed and reshaped, so the reader finds columns by name and reads the usual
//! codecs, while ferry's own parts stay uncompressed (random floats do not compress).

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, FloatType, Int32Type, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::{ListAccessor, RowAccessor};
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;

use super::profile::{SketchProfile, PROFILE_FILE};
use crate::store::{get_bytes, Location};

const SCHEMA: &str = "
message ferry_sketch {
  required binary key (STRING);
  required int64 record;
  required group sketch (LIST) {
    repeated group list {
      required float element;
    }
  }
  required int64 seed;
  required int32 d;
}";

/// One record's sketch.
#[derive(Debug, Clone, PartialEq)]
pub struct SketchRow {
    /// Input object key, relative to the job's input prefix.
    pub key: String,
    /// Record index inside the object.
    pub record: i64,
    /// The kept coordinates (all `d` of them unless the set was erased).
    pub sketch: Vec<f32>,
    /// The matrix seed.
    pub seed: u64,
    /// The full dimension.
    pub d: usize,
}

fn sketch_column() -> ColumnPath {
    ColumnPath::from(vec!["sketch".to_string(), "list".to_string(), "element".to_string()])
}

/// Rows as a Parquet file.
pub fn write_parquet(rows: &[SketchRow], profile: &SketchProfile) -> Result<Vec<u8>, String> {
    static SCHEMA_TYPE: std::sync::OnceLock<Arc<parquet::schema::types::Type>> = std::sync::OnceLock::new();
    let schema =
        SCHEMA_TYPE.get_or_init(|| Arc::new(parse_message_type(SCHEMA).expect("the sketch schema parses"))).clone();
    // Everything needed to regenerate the matrices and decode, so a part file stands alone; the
    // profile adds what turns attributes back into scores and features.
    let module_list: Vec<serde_json::Value> = profile
        .modules
        .iter()
        .zip(profile.module_specs())
        .map(|(name, spec)| serde_json::json!([name, spec.attr_dim, spec.n_slots]))
        .collect();
    let meta = serde_json::json!({
        "format": profile.format,
        "recipe": profile.recipe,
        "d": profile.d,
        "c": profile.c,
        "seed": profile.seed,
        "modules": profile.modules.len(),
        "module_list": module_list,
        "profile": format!("_ferry/{PROFILE_FILE}"),
    });
    let props = WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        // Sketch coordinates never repeat: a dictionary would hash every float before falling
        // back to plain encoding, which was most of the time spent writing a part. Their minimum
        // and maximum answer no query either.
        .set_column_dictionary_enabled(sketch_column(), false)
        .set_column_statistics_enabled(sketch_column(), EnabledStatistics::None)
        .set_key_value_metadata(Some(vec![KeyValue::new("ferry.sketch".to_string(), meta.to_string())]))
        .build();
    let mut out =
        Vec::with_capacity(rows.iter().map(|r| r.sketch.len() * 4 + r.key.len() + 32).sum::<usize>() + (64 << 10));
    let err = |e: parquet::errors::ParquetError| e.to_string();
    let mut writer = SerializedFileWriter::new(&mut out, schema, Arc::new(props)).map_err(err)?;
    let mut group = writer.next_row_group().map_err(err)?;
    let mut column = 0;
    while let Some(mut col) = group.next_column().map_err(err)? {
        match column {
            0 => {
                let keys: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.key.as_str())).collect();
                col.typed::<ByteArrayType>().write_batch(&keys, None, None).map_err(err)?;
            }
            1 => {
                let v: Vec<i64> = rows.iter().map(|r| r.record).collect();
                col.typed::<Int64Type>().write_batch(&v, None, None).map_err(err)?;
            }
            2 => {
                let mut values = Vec::new();
                let (mut def, mut rep) = (Vec::new(), Vec::new());
                for r in rows {
                    if r.sketch.is_empty() {
                        return Err(format!("{} record {}: empty sketch", r.key, r.record));
                    }
                    values.extend_from_slice(&r.sketch);
                    def.extend(std::iter::repeat_n(1i16, r.sketch.len()));
                    rep.push(0i16);
                    rep.extend(std::iter::repeat_n(1i16, r.sketch.len() - 1));
                }
                col.typed::<FloatType>().write_batch(&values, Some(&def), Some(&rep)).map_err(err)?;
            }
            3 => {
                let v: Vec<i64> = rows.iter().map(|r| r.seed as i64).collect();
                col.typed::<Int64Type>().write_batch(&v, None, None).map_err(err)?;
            }
            _ => {
                let v: Vec<i32> = rows.iter().map(|r| r.d as i32).collect();
                col.typed::<Int32Type>().write_batch(&v, None, None).map_err(err)?;
            }
        }
        col.close().map_err(err)?;
        column += 1;
    }
    group.close().map_err(err)?;
    writer.close().map_err(err)?;
    Ok(out)
}

/// The rows of one Parquet file, its columns found by name, so that a set another tool rewrote
/// (columns reordered, `seed` and `d` dropped, records as 32-bit integers) still reads; rows
/// without `seed` or `d` take `seed` and `d`, the profile's.
pub fn read_parquet(bytes: Bytes, seed: u64, d: usize) -> Result<Vec<SketchRow>, String> {
    let reader = SerializedFileReader::new(bytes).map_err(|e| e.to_string())?;
    let names: Vec<String> =
        reader.metadata().file_metadata().schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    let find = |name: &str| names.iter().position(|n| n == name);
    let need = |name: &str| find(name).ok_or_else(|| format!("no column {name:?} (the file has {names:?})"));
    let (key_at, record_at, sketch_at) = (need("key")?, need("record")?, need("sketch")?);
    let (seed_at, d_at) = (find("seed"), find("d"));
    let err = |what: &str, e: parquet::errors::ParquetError| format!("column {what}: {e}");
    let integer = |row: &parquet::record::Row, i: usize, what: &str| {
        row.get_long(i).or_else(|_| row.get_int(i).map(i64::from)).map_err(|e| err(what, e))
    };
    let mut rows = Vec::new();
    for row in reader.get_row_iter(None).map_err(|e| e.to_string())? {
        let row = row.map_err(|e| e.to_string())?;
        let list = row.get_list(sketch_at).map_err(|e| err("sketch", e))?;
        let sketch = (0..list.len())
            .map(|i| list.get_float(i).or_else(|_| list.get_double(i).map(|v| v as f32)))
            .collect::<Result<Vec<f32>, _>>()
            .map_err(|e| err("sketch", e))?;
        rows.push(SketchRow {
            key: row.get_string(key_at).map_err(|e| err("key", e))?.clone(),
            record: integer(&row, record_at, "record")?,
            sketch,
            seed: seed_at.map_or(Ok(seed), |i| integer(&row, i, "seed").map(|v| v as u64))?,
            d: d_at.map_or(Ok(d), |i| integer(&row, i, "d").map(|v| v as usize))?,
        });
    }
    Ok(rows)
}

/// The key of a set's profile.
pub fn profile_key(set: &Location) -> Path {
    set.prefix.clone().join(crate::store::JOB_DIR).join(PROFILE_FILE)
}

/// Makes `profile` the profile of the set at `set`, or finds it there already. A set that holds
/// another profile (a refit, another seed or format) is refused: its rows can only be read with
/// the profile they were made with.
///
/// Shards of one job claim a set at the same moment. In a folder, one may find the file while
/// another is still writing it, or lose the race to rename it into place; both are retried for a
/// second before they count as errors.
pub async fn claim(set: &Location, profile: &SketchProfile) -> Result<(), String> {
    let key = profile_key(set);
    let body = serde_json::to_vec_pretty(profile).expect("the profile serialises");
    let mut last = String::new();
    for _ in 0..20 {
        match get_bytes(set.store.as_ref(), &key).await {
            Ok(old) => match SketchProfile::from_json(&old) {
                Ok(old) if &old == profile => return Ok(()),
                Ok(_) => {
                    return Err(format!(
                        "sketch set {} was made with another sketch profile; write these sketches to a new set",
                        set.url
                    ))
                }
                Err(e) => last = format!("the sketch profile of {} is unreadable: {e}", set.url),
            },
            Err(object_store::Error::NotFound { .. }) => match set.write_whole(&key, body.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("writing the sketch profile to {}: {e}", set.url),
            },
            Err(e) => return Err(format!("reading the sketch profile of {}: {e}", set.url)),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(last)
}

/// A loaded sketch set.
#[derive(Debug, Clone)]
pub struct SketchSet {
    /// How the sketches were made.
    pub profile: SketchProfile,
    /// Every record's sketch, ordered by key and record, each once.
    pub rows: Vec<SketchRow>,
}

impl SketchSet {
    /// Reads every `.parquet` under a set's prefix and its profile.
    pub async fn load(url: &str, max_retries: usize) -> Result<SketchSet, String> {
        let set = Location::open(url, false, max_retries).map_err(|e| e.to_string())?;
        let pkey = profile_key(&set);
        let text = get_bytes(set.store.as_ref(), &pkey).await.map_err(|e| {
            format!("{url}: no sketch profile at {pkey} ({e}{}); is this a sketch set?", set.hint(&e.to_string()))
        })?;
        let profile = SketchProfile::from_json(&text).map_err(|e| format!("{pkey}: {e}"))?;
        let (keys, unlisted) = set.list().await.map_err(|e| e.to_string())?;
        if let Some((name, reason)) = unlisted.iter().find(|(name, _)| name.ends_with(".parquet")) {
            return Err(format!("{url}: part {name} cannot be read: {reason}"));
        }
        let keys: Vec<Path> = keys.into_iter().filter(|p| p.as_ref().ends_with(".parquet")).collect();
        let store = set.store.clone();
        let (seed, d) = (profile.seed, profile.d);
        let mut rows: Vec<SketchRow> = futures::stream::iter(keys)
            .map(|key| {
                let store = store.clone();
                async move {
                    let bytes = get_bytes(store.as_ref(), &key).await.map_err(|e| format!("{key}: {e}"))?;
                    read_parquet(bytes, seed, d).map_err(|e| format!("{key}: {e}"))
                }
            })
            .buffer_unordered(32)
            .try_concat()
            .await?;
        rows.sort_by(|a, b| a.key.cmp(&b.key).then(a.record.cmp(&b.record)));
        rows.dedup_by(|a, b| a.key == b.key && a.record == b.record);
        if let Some(r) = rows.iter().find(|r| r.d != profile.d || r.seed != profile.seed) {
            return Err(format!(
                "{} record {} was made with d = {}, seed = {}; the set's profile says d = {}, seed = {}",
                r.key, r.record, r.d, r.seed, profile.d, profile.seed
            ));
        }
        Ok(SketchSet { profile, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards of one job claim a folder's set at once, again and again: none fails.
    #[test]
    fn concurrent_claims_of_one_profile_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let profile = tiny_profile();
        for round in 0..30 {
            let url = dir.path().join(format!("set{round}")).to_str().unwrap().to_string();
            let claims: Vec<_> = (0..4)
                .map(|_| {
                    let (url, profile) = (url.clone(), profile.clone());
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                        rt.block_on(async { claim(&Location::open(&url, true, 0).unwrap(), &profile).await })
                    })
                })
                .collect();
            for c in claims {
                c.join().unwrap().unwrap();
            }
        }
    }

    fn tiny_profile() -> SketchProfile {
        SketchProfile {
            format: 1,
            recipe: "classifier".into(),
            d: 4,
            seed: 9,
            c: 1.0,
            features_output: "f".into(),
            scores_output: "s".into(),
            top_classes: 1,
            image_dim: 1,
            class_dim: 2,
            score_scale: 0.7,
            pca_mean: vec![0.0],
            pca_components: vec![vec![1.0]],
            pca_variances: vec![1.0],
            image_norm: 1.0,
            class_norm: 1.0,
            stages: Vec::new(),
            modules: vec!["image".into(), "a".into()],
            calibration_records: 1,
        }
    }

    #[test]
    fn rows_round_trip_through_parquet() {
        let profile = tiny_profile();
        let rows = vec![
            SketchRow { key: "a/b.jpg".into(), record: 0, sketch: vec![1.0, -2.5, 3.0, 0.0], seed: 9, d: 4 },
            SketchRow { key: "a/b.jpg".into(), record: 1, sketch: vec![0.5, 0.25], seed: 9, d: 4 },
        ];
        let bytes = write_parquet(&rows, &profile).unwrap();
        assert_eq!(read_parquet(Bytes::from(bytes), 0, 0).unwrap(), rows);
    }
}
