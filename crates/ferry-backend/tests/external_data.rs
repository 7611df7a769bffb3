//! Models whose weights lie in a file beside the model (ONNX external data, as PyTorch's exporter
//! writes large models): loaded from memory, each runtime must still find them next to the model,
//! wherever the process runs from.

use std::path::PathBuf;

use ferry_backend::{load, BackendKind, LoadOptions, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name).join("model.onnx")
}

fn input() -> Tensor {
    let n = 2 * 3 * 224 * 224;
    Tensor { shape: vec![2, 3, 224, 224], data: (0..n).map(|i| (i * 7 % 101) as f32 / 100.0).collect() }
}

#[test]
fn weights_beside_the_model_are_found_by_both_runtimes() {
    assert!(fixture("conv_external").with_file_name("model.onnx.data").is_file());
    // One session, and from three on the sessions that share one optimised graph; with a tensor
    // exposed as an extra output, which rewrites the model's bytes.
    for kind in [BackendKind::Ort, BackendKind::Tract] {
        for (instances, extra) in [(1, vec![]), (3, vec![]), (1, vec!["pooled".to_string()])] {
            let options = LoadOptions { kind, instances, extra_outputs: extra.clone(), ..Default::default() };
            let run = |name: &str| {
                let model = load(&fixture(name), &options).unwrap_or_else(|e| panic!("{name} on {kind:?}: {e}"));
                model.instance().unwrap().run(&input()).unwrap()
            };
            let (inline, external) = (run("conv_inline"), run("conv_external"));
            assert_eq!(external.len(), 1 + extra.len());
            assert_eq!(external[0].shape, [2, 8]);
            for (a, b) in inline.iter().zip(&external) {
                assert!(a.values() == b.values(), "{kind:?}, {instances} instances, {extra:?}: the weights differ");
            }
            assert!(external[0].values().iter().any(|v| v.abs() > 0.01), "the weights were read, not zeros");
        }
    }
}
