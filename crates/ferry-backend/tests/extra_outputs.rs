//! Intermediate tensors exposed as outputs at load time, on both runtimes.

use std::path::PathBuf;

use ferry_backend::{load, BackendError, BackendKind, LoadOptions, Output, Tensor};

fn mobilenet() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/models/mobilenet_v2/model.onnx")
}

const STAGE: &str = "/features/features.13/Add_output_0";

fn run(kind: BackendKind) -> Vec<Output> {
    // A declared output and a repeated name add nothing.
    let extra = ["features", STAGE, STAGE].map(String::from).to_vec();
    let options = LoadOptions { kind, extra_outputs: extra, ..Default::default() };
    let model = load(&mobilenet(), &options).unwrap();
    let names: Vec<&str> = model.info().outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["logits", "features", STAGE], "{kind:?}");
    let n = 2 * 3 * 224 * 224;
    let input = Tensor { shape: vec![2, 3, 224, 224], data: (0..n).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect() };
    model.instance().unwrap().run(&input).unwrap()
}

#[test]
fn a_stage_is_exposed_and_both_runtimes_agree_on_it() {
    let (ort, tract) = (run(BackendKind::Ort), run(BackendKind::Tract));
    assert_eq!(ort[2].shape, [2, 96, 14, 14]);
    assert_eq!(tract[2].shape, ort[2].shape);
    let scale = ort[2].values().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = ort[2].values().iter().zip(tract[2].values()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(scale > 0.1 && worst <= 1e-3 * scale, "max difference {worst} against max {scale}");
    // The model's own outputs are unchanged by the extra one.
    let plain = load(&mobilenet(), &LoadOptions { kind: BackendKind::Ort, ..Default::default() }).unwrap();
    let input = Tensor {
        shape: vec![2, 3, 224, 224],
        data: (0..2 * 3 * 224 * 224).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect(),
    };
    let out = plain.instance().unwrap().run(&input).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].values(), ort[0].values());
}

#[test]
fn an_unknown_tensor_is_refused_by_name() {
    let options = LoadOptions { kind: BackendKind::Tract, extra_outputs: vec!["no_such".into()], ..Default::default() };
    match load(&mobilenet(), &options) {
        Err(BackendError::Unsupported(m)) => assert!(m.contains("no_such"), "{m}"),
        other => panic!("expected an error naming the tensor, got {other:?}"),
    }
}
