//! The hardware manifest: written from a non-negative network, read back
//! with validation, and run.

mod common;

use std::path::Path;

use candle_core::{DType, Tensor};
use common::{max_abs, random_cnn, random_inputs, random_mlp};
use isonn::interop::manifest::{build_manifest, read_manifest, write_manifest, Manifest, MANIFEST_JSON, MANIFEST_TENSORS};
use isonn::model::Range;
use isonn::nonneg::{transform, NonnegNetwork, TransformOptions};

fn nonneg(seed: u64, cnn: bool) -> (isonn::model::Network, NonnegNetwork) {
    let range = Range::new(-0.5, 1.0).unwrap();
    let network = if cnn { random_cnn(seed, DType::F32, range) } else { random_mlp(seed, DType::F32, range) };
    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    (network, nonneg)
}

#[test]
fn manifest_round_trip_gives_same_outputs() {
    for seed in 0..6 {
        for cnn in [false, true] {
            let (network, original) = nonneg(seed, cnn);
            let dir = tempfile::tempdir().unwrap();
            write_manifest(dir.path(), &original).unwrap();
            let loaded = read_manifest(dir.path()).unwrap();
            let x = random_inputs(seed, &network, 5, DType::F32);
            let diff = max_abs(&original.forward(&x).unwrap().sub(&loaded.forward(&x).unwrap()).unwrap());
            // The same float32 tensors and settings: the outputs are identical.
            assert_eq!(diff, 0.0, "seed {seed}, cnn {cnn}: outputs differ by {diff}");
        }
    }
}

#[test]
fn routing_marks_signal_and_complement() {
    let (_, original) = nonneg(3, false);
    let (_, tensors) = build_manifest(&original).unwrap();
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let positive: Vec<f32> = get("layers.1.positive").flatten_all().unwrap().to_vec1().unwrap();
    let negative: Vec<f32> = get("layers.1.negative").flatten_all().unwrap().to_vec1().unwrap();
    let routing: Vec<u8> = get("layers.1.routing").flatten_all().unwrap().to_vec1().unwrap();
    for ((p, n), r) in positive.iter().zip(&negative).zip(&routing) {
        let expected = u8::from(*p > 0.0) + 2 * u8::from(*n > 0.0);
        assert_eq!(*r, expected, "P {p}, N {n}");
    }
    assert!(routing.contains(&1), "no weight taps the signal");
    assert!(routing.contains(&2), "no weight taps the complement");
}

fn write_edited(dir: &Path, original: &NonnegNetwork, edit_json: impl FnOnce(&mut Manifest), edit_tensors: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let (mut manifest, mut tensors) = build_manifest(original).unwrap();
    edit_json(&mut manifest);
    edit_tensors(&mut tensors);
    let bytes = isonn::store::serialize_tensors(&tensors, None, Path::new("t")).unwrap();
    std::fs::write(dir.join(MANIFEST_TENSORS), bytes).unwrap();
    std::fs::write(dir.join(MANIFEST_JSON), serde_json::to_string(&manifest).unwrap()).unwrap();
}

#[test]
fn invalid_manifests_are_rejected() {
    let (_, original) = nonneg(1, false);
    let cases: Vec<(&str, Box<dyn Fn(&mut Manifest)>, Box<dyn Fn(&mut Vec<(String, Tensor)>)>)> = vec![
        ("schema_version 7", Box::new(|m| m.schema_version = 7), Box::new(|_| {})),
        ("shift -1", Box::new(|m| {
            if let isonn::interop::manifest::ManifestLayer::Linear { affine, .. } = &mut m.layers[1] {
                affine.shift = -1.0;
            }
        }), Box::new(|_| {})),
        ("layers.1.bias is missing", Box::new(|_| {}), Box::new(|t| t.retain(|(n, _)| n != "layers.1.bias"))),
        ("contains -0.5", Box::new(|_| {}), Box::new(|t| {
            let entry = t.iter_mut().find(|(n, _)| n == "layers.1.positive").unwrap();
            entry.1 = entry.1.affine(0.0, -0.5).unwrap();
        })),
        ("layers.1.routing must be u8", Box::new(|_| {}), Box::new(|t| {
            let entry = t.iter_mut().find(|(n, _)| n == "layers.1.routing").unwrap();
            entry.1 = entry.1.zeros_like().unwrap();
        })),
    ];
    for (expected, edit_json, edit_tensors) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_edited(dir.path(), &original, |m| edit_json(m), |t| edit_tensors(t));
        let message = read_manifest(dir.path()).unwrap_err().to_string();
        assert!(message.contains(expected), "expected {expected:?} in: {message}");
    }
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &original).unwrap();
    let text = std::fs::read_to_string(dir.path().join(MANIFEST_JSON)).unwrap();
    std::fs::write(dir.path().join(MANIFEST_JSON), text.replacen("\"output_offset\"", "\"surprise\": 1, \"output_offset\"", 1)).unwrap();
    let message = read_manifest(dir.path()).unwrap_err().to_string();
    assert!(message.contains("unknown field"), "{message}");
}

#[test]
fn export_manifest_command_needs_nonneg_model() {
    let dir = tempfile::tempdir().unwrap();
    let (network, original) = nonneg(2, true);
    let regular_dir = dir.path().join("regular");
    let nonneg_dir = dir.path().join("nonneg");
    isonn::store::save(&regular_dir, &isonn::store::Model::Regular(network), &serde_json::json!({})).unwrap();
    isonn::store::save(&nonneg_dir, &isonn::store::Model::Nonneg(original), &serde_json::json!({})).unwrap();
    let out = dir.path().join("manifest");
    common::isonn()
        .args(["export", nonneg_dir.to_str().unwrap(), "--format", "manifest", "--out", out.to_str().unwrap()])
        .assert()
        .success();
    read_manifest(&out).unwrap();
    let run = common::isonn()
        .args(["export", regular_dir.to_str().unwrap(), "--format", "manifest", "--out", out.to_str().unwrap()])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(stderr.contains("isonn transform"), "{stderr}");
}
