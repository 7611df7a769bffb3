//! Many ONNX Runtime sessions of one model: from three on they share one optimised graph and its
//! weights, and must compute exactly what a lone session does. Outputs are read where ONNX
//! Runtime left them, and must stay valid after their session is gone.

use std::path::PathBuf;

use ferry_backend::{load, BackendKind, LoadOptions, Tensor};

fn mobilenet() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/models/mobilenet_v2/model.onnx")
}

const STAGE: &str = "/features/features.6/Add_output_0";

fn options(instances: usize) -> LoadOptions {
    LoadOptions { kind: BackendKind::Ort, extra_outputs: vec![STAGE.to_string()], instances, ..Default::default() }
}

fn input() -> Tensor {
    let n = 3 * 3 * 224 * 224;
    Tensor { shape: vec![3, 3, 224, 224], data: (0..n).map(|i| ((i * 7 % 101) as f32 / 50.0) - 1.0).collect() }
}

#[test]
fn sessions_sharing_one_optimised_graph_compute_what_a_lone_session_does() {
    let alone = load(&mobilenet(), &options(1)).unwrap();
    let expected = alone.instance().unwrap().run(&input()).unwrap();
    assert_eq!(expected.len(), 3);
    assert_eq!(expected[2].shape, [3, 32, 28, 28]);

    let shared = load(&mobilenet(), &options(4)).unwrap();
    assert_eq!(shared.info(), alone.info());
    // The four built while loading, and one more built on demand.
    let mut instances: Vec<_> = (0..5).map(|_| shared.instance().unwrap()).collect();
    // Sessions read their weights from bytes the model loaded; they must stay valid without it.
    drop(shared);
    for (i, instance) in instances.iter_mut().enumerate() {
        let got = instance.run(&input()).unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.shape, e.shape, "instance {i}");
            assert!(g.values() == e.values(), "instance {i} differs from a lone session");
        }
    }
}

#[test]
fn outputs_outlive_their_session() {
    for instances in [1, 3] {
        let model = load(&mobilenet(), &options(instances)).unwrap();
        let mut instance = model.instance().unwrap();
        let outputs = instance.run(&input()).unwrap();
        let copies: Vec<Vec<f32>> = outputs.iter().map(|o| o.values().to_vec()).collect();
        drop(instance);
        drop(model);
        // Other sessions allocate and compute in the meantime, as the next job's would.
        let other = load(&mobilenet(), &options(instances)).unwrap();
        let mut again = other.instance().unwrap();
        for _ in 0..2 {
            again.run(&Tensor { shape: vec![4, 3, 224, 224], data: vec![0.5; 4 * 3 * 224 * 224] }).unwrap();
        }
        for (o, c) in outputs.iter().zip(&copies) {
            assert!(
                o.values() == c.as_slice(),
                "{instances} sessions: an output changed after its session was dropped"
            );
        }
    }
}
