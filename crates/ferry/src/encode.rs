//! Model outputs to the body of a `.out` object.
//!
//! The default body is TF Serving's row-format predict response, `{"predictions": [...]}` with one
//! entry per record, so consumers of SageMaker or TF Serving output keep working. An entry is the
//! output tensor for that record (nested to its shape), an object keyed by output name when the
//! model has several outputs, `{"classes", "labels", "probabilities"}` with top-k, or
//! `{"error": "..."}` for a record that failed under `--on-error error-record`.
//!
//! Bodies are written straight into a byte buffer (floats in their shortest round-trip form), so
//! the same predictions always give the same bytes, whatever the batching.

use std::sync::Arc;

use ferry_backend::{ExactSlice, Output};
use serde::Serialize;

/// One record's outputs: its row of each output of the batch it ran in. The records of a batch
/// share the batch's outputs rather than each copying its rows out.
#[derive(Debug, Clone)]
pub struct RecordOutputs {
    batch: Arc<[Output]>,
    row: usize,
    /// Outputs this record replaced (the softmax of its scores), by output index.
    replaced: Vec<(usize, Vec<f32>)>,
}

impl RecordOutputs {
    /// Row `row` of each of `batch`'s outputs.
    pub fn new(batch: Arc<[Output]>, row: usize) -> Self {
        Self { batch, row, replaced: Vec::new() }
    }

    /// A record given as its own per-output shapes and values.
    pub fn from_rows(rows: Vec<(Vec<usize>, Vec<f32>)>) -> Self {
        let outputs: Vec<Output> = rows
            .into_iter()
            .map(|(shape, values)| Output::new(std::iter::once(1).chain(shape).collect(), values))
            .collect();
        Self::new(outputs.into(), 0)
    }

    /// Number of outputs.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the model had no outputs.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Output `j`'s per-record shape.
    pub fn shape(&self, j: usize) -> &[usize] {
        &self.batch[j].shape[1..]
    }

    /// Output `j`'s values for this record.
    pub fn values(&self, j: usize) -> &[f32] {
        match self.replaced.iter().find(|(i, _)| *i == j) {
            Some((_, v)) => v,
            None => self.batch[j].row(self.row),
        }
    }

    /// Output `j`'s values for this record as the model typed them, when they are not floats
    /// (and this record did not replace them).
    pub fn exact(&self, j: usize) -> Option<ExactSlice<'_>> {
        match self.replaced.iter().any(|(i, _)| *i == j) {
            true => None,
            false => self.batch[j].exact_row(self.row),
        }
    }

    /// Replaces output `j`'s values for this record.
    pub fn replace(&mut self, j: usize, values: Vec<f32>) {
        assert_eq!(values.len(), self.batch[j].row_len(), "a replacement of another length");
        self.replaced.retain(|(i, _)| *i != j);
        self.replaced.push((j, values));
    }

    /// Copies this record's rows out of the batch, so that keeping the record does not keep the
    /// whole batch: for records that wait for the rest of their object.
    pub fn detach(&mut self) {
        if self.batch.first().is_some_and(|o| o.shape.first() == Some(&1)) {
            return;
        }
        let outputs: Vec<Output> = (0..self.len())
            .map(|j| {
                let shape = std::iter::once(1).chain(self.shape(j).iter().copied()).collect();
                match self.batch[j].exact_row(self.row) {
                    Some(exact) => Output::exact(shape, exact.to_owned()),
                    None => Output::new(shape, self.batch[j].row(self.row).to_vec()),
                }
            })
            .collect();
        let replaced = std::mem::take(&mut self.replaced);
        *self = Self { batch: outputs.into(), row: 0, replaced };
    }
}

/// Settings for turning outputs into JSON.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// Output names, in model order.
    pub output_names: Vec<String>,
    /// Index of the output holding class scores.
    pub score_output: usize,
    /// Apply a softmax to the score output.
    pub softmax: bool,
    /// Keep only the `k` best classes.
    pub top_k: Option<usize>,
    /// Class names.
    pub labels: Option<Vec<String>>,
    /// Outputs read by ferry itself (pooled features for sketches), left out of the body.
    pub hidden: Vec<usize>,
}

impl Encoder {
    /// The body for one object from its records' outcomes, in record order.
    pub fn body(&self, records: &mut [Result<RecordOutputs, String>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + records.len() * 64);
        out.extend_from_slice(b"{\"predictions\":[");
        for (i, record) in records.iter_mut().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match record {
                Ok(outputs) => self.write_record(&mut out, outputs),
                Err(reason) => {
                    out.extend_from_slice(b"{\"error\":");
                    serde_json::to_writer(&mut out, reason).expect("writing to a Vec cannot fail");
                    out.push(b'}');
                }
            }
        }
        out.extend_from_slice(b"]}\n");
        out
    }

    /// Writes one record; with `softmax`, replaces its scores by their softmax first, which
    /// the sketch recipes then read.
    fn write_record(&self, out: &mut Vec<u8>, outputs: &mut RecordOutputs) {
        if self.softmax && self.score_output < outputs.len() {
            let mut scores = outputs.values(self.score_output).to_vec();
            softmax(&mut scores);
            outputs.replace(self.score_output, scores);
        }
        if let Some(k) = self.top_k {
            let scores = outputs.values(self.score_output);
            let top = TopK::new(scores, k, self.labels.as_deref(), self.softmax);
            serde_json::to_writer(out, &top).expect("writing to a Vec cannot fail");
            return;
        }
        let shown: Vec<usize> = (0..outputs.len()).filter(|i| !self.hidden.contains(i)).collect();
        if let [only] = shown.as_slice() {
            write_output(out, outputs, *only);
            return;
        }
        out.push(b'{');
        for (n, &i) in shown.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, &self.output_names[i]).expect("writing to a Vec cannot fail");
            out.push(b':');
            write_output(out, outputs, i);
        }
        out.push(b'}');
    }
}

/// Output `j` of a record, nested to its shape: floats in their shortest form, integers as
/// integers, booleans and strings as JSON's.
fn write_output(out: &mut Vec<u8>, outputs: &RecordOutputs, j: usize) {
    let shape = outputs.shape(j);
    match outputs.exact(j) {
        None => write_nested(out, shape, outputs.values(j), &mut |out, v| write_f32(out, *v)),
        Some(ExactSlice::Int(v)) => {
            write_nested(out, shape, v, &mut |out, v| out.extend_from_slice(v.to_string().as_bytes()))
        }
        Some(ExactSlice::Bool(v)) => {
            write_nested(out, shape, v, &mut |out, v| out.extend_from_slice(if *v { b"true" } else { b"false" }))
        }
        Some(ExactSlice::Text(v)) => write_nested(out, shape, v, &mut |out, v| {
            serde_json::to_writer(out, v).expect("writing to a Vec cannot fail")
        }),
    }
}

/// Numerically stable softmax in place.
pub fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in values.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in values.iter_mut() {
        *v *= inv;
    }
}

#[derive(Serialize)]
struct TopK<'a> {
    classes: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    probabilities: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scores: Option<Vec<f32>>,
}

impl<'a> TopK<'a> {
    fn new(scores: &[f32], k: usize, labels: Option<&'a [String]>, probabilities: bool) -> Self {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        // Highest first; ties and NaNs resolved by index so the order is always the same. The
        // comparison is a total order, so selecting the first k and sorting only them gives the
        // same list as sorting everything.
        let cmp = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
        if k < order.len() {
            order.select_nth_unstable_by(k, cmp);
            order.truncate(k);
        }
        order.sort_by(cmp);
        let values: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
        let labels = labels.map(|l| order.iter().map(|&i| l.get(i).map_or("", String::as_str)).collect());
        let (probabilities, scores) = if probabilities { (Some(values), None) } else { (None, Some(values)) };
        Self { classes: order, labels, probabilities, scores }
    }
}

fn write_nested<T>(out: &mut Vec<u8>, shape: &[usize], values: &[T], cell: &mut impl FnMut(&mut Vec<u8>, &T)) {
    match shape {
        [] => cell(out, &values[0]),
        [n, rest @ ..] => {
            let step = rest.iter().product::<usize>();
            out.push(b'[');
            for i in 0..*n {
                if i > 0 {
                    out.push(b',');
                }
                if rest.is_empty() {
                    cell(out, &values[i]);
                } else {
                    write_nested(out, rest, &values[i * step..(i + 1) * step], cell);
                }
            }
            out.push(b']');
        }
    }
}

fn write_f32(out: &mut Vec<u8>, v: f32) {
    if v.is_finite() {
        out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder() -> Encoder {
        Encoder {
            output_names: vec!["logits".into()],
            score_output: 0,
            softmax: false,
            top_k: None,
            labels: None,
            hidden: Vec::new(),
        }
    }

    fn rec(rows: Vec<(Vec<usize>, Vec<f32>)>) -> Result<RecordOutputs, String> {
        Ok(RecordOutputs::from_rows(rows))
    }

    fn json(bytes: Vec<u8>) -> serde_json::Value {
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn full_scores_nest_to_the_output_shape() {
        let mut records = vec![rec(vec![(vec![2, 2], vec![1.0, 2.5, -3.0, 0.1])]), rec(vec![(vec![], vec![7.0])])];
        let v = json(encoder().body(&mut records));
        assert_eq!(v, serde_json::json!({"predictions": [[[1.0, 2.5], [-3.0, 0.1]], 7.0]}));
    }

    #[test]
    fn top_k_with_labels_and_softmax() {
        let e = Encoder {
            softmax: true,
            top_k: Some(2),
            labels: Some(vec!["a".into(), "b".into(), "c".into()]),
            ..encoder()
        };
        let mut records = vec![rec(vec![(vec![3], vec![1.0, 3.0, 2.0])]), Err("bad JPEG".to_string())];
        let v = json(e.body(&mut records));
        let p = &v["predictions"][0];
        assert_eq!(p["classes"], serde_json::json!([1, 2]));
        assert_eq!(p["labels"], serde_json::json!(["b", "c"]));
        let probs: Vec<f64> = p["probabilities"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let z = 1f64.exp() + 3f64.exp() + 2f64.exp();
        assert!((probs[0] - 3f64.exp() / z).abs() < 1e-6 && (probs[1] - 2f64.exp() / z).abs() < 1e-6);
        assert_eq!(v["predictions"][1], serde_json::json!({"error": "bad JPEG"}));
    }

    #[test]
    fn several_outputs_are_keyed_by_name_and_non_finite_is_null() {
        let e = Encoder { output_names: vec!["a".into(), "b".into()], ..encoder() };
        let mut records = vec![rec(vec![(vec![1], vec![f32::NAN]), (vec![2], vec![0.5, 1e-7])])];
        let v = json(e.body(&mut records));
        assert_eq!(v, serde_json::json!({"predictions": [{"a": [null], "b": [0.5, 1e-7]}]}));
    }

    #[test]
    fn integers_booleans_and_strings_are_written_as_they_are_even_after_detaching() {
        use ferry_backend::Exact;
        let e = Encoder { output_names: vec!["id".into(), "mask".into(), "name".into(), "p".into()], ..encoder() };
        // A batch of two records; the second one's rows.
        let batch: Arc<[Output]> = vec![
            Output::exact(vec![2, 1], Exact::Int(vec![3, i64::MAX])),
            Output::exact(vec![2, 2], Exact::Bool(vec![true, false, false, true])),
            Output::exact(vec![2], Exact::Text(vec!["cat".into(), "say \"hi\"".into()])),
            Output::new(vec![2, 1], vec![0.25f32, 0.5]),
        ]
        .into();
        let expected = serde_json::json!({"predictions": [{"id": [i64::MAX], "mask": [false, true], "name": "say \"hi\"", "p": [0.5]}]});
        let mut record = RecordOutputs::new(batch.clone(), 1);
        assert_eq!(json(e.body(&mut [Ok(record.clone())])), expected);
        record.detach();
        assert_eq!(json(e.body(&mut [Ok(record)])), expected, "detached");
        // What reads numbers reads them as floats.
        assert_eq!(RecordOutputs::new(batch, 0).values(1), [1.0, 0.0]);
    }

    #[test]
    fn hidden_outputs_are_left_out() {
        let e = Encoder { output_names: vec!["logits".into(), "features".into()], hidden: vec![1], ..encoder() };
        let mut records = vec![rec(vec![(vec![2], vec![0.5, 2.0]), (vec![3], vec![1.0, 2.0, 3.0])])];
        assert_eq!(json(e.body(&mut records)), serde_json::json!({"predictions": [[0.5, 2.0]]}));
        let e = Encoder { output_names: vec!["a".into(), "b".into(), "f".into()], hidden: vec![2], ..encoder() };
        let mut records = vec![rec(vec![(vec![], vec![1.0]), (vec![], vec![2.0]), (vec![], vec![3.0])])];
        assert_eq!(json(e.body(&mut records)), serde_json::json!({"predictions": [{"a": 1.0, "b": 2.0}]}));
    }

    #[test]
    fn records_of_a_batch_read_their_own_rows_and_keep_their_own_softmax() {
        let batch: Arc<[Output]> = vec![
            Output::new(vec![2, 3], vec![1.0, 3.0, 2.0, 0.0, 0.0, 5.0]),
            Output::new(vec![2, 2, 1], vec![10.0, 11.0, 20.0, 21.0]),
        ]
        .into();
        let e = Encoder { output_names: vec!["s".into(), "f".into()], softmax: true, hidden: vec![1], ..encoder() };
        let mut records = vec![Ok(RecordOutputs::new(batch.clone(), 0)), Ok(RecordOutputs::new(batch.clone(), 1))];
        let mut waiting = RecordOutputs::new(batch.clone(), 1);
        waiting.detach();
        let body = json(e.body(&mut records));
        let check = |got: &serde_json::Value, row: &[f32]| {
            let mut p = row.to_vec();
            softmax(&mut p);
            let got: Vec<f32> = got.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(got, p);
        };
        check(&body["predictions"][0], &[1.0, 3.0, 2.0]);
        check(&body["predictions"][1], &[0.0, 0.0, 5.0]);
        let second = records[1].as_ref().unwrap();
        assert_eq!((second.shape(1), second.values(1)), (&[2, 1][..], &[20.0, 21.0][..]));
        assert_eq!(batch[0].row(1), [0.0, 0.0, 5.0], "the batch itself is unchanged");
        let alone = json(e.body(&mut [Ok(waiting)]));
        assert_eq!(alone["predictions"][0], body["predictions"][1], "a detached record encodes the same");
    }

    #[test]
    fn ties_in_top_k_keep_index_order() {
        let top = TopK::new(&[0.5, 0.5, 0.9, 0.5], 3, None, false);
        assert_eq!(top.classes, vec![2, 0, 1]);
    }
}
