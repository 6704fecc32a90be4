//! The hardware manifest: written from a non-negative network, read back
//! with validation, and run.

mod common;

use std::path::Path;

use candle_core::{DType, Tensor};
use common::{max_abs, random_cnn, random_inputs, random_mlp};
use isonn::hardware::{DeviceMapping, Effects, GainGranularity};
use isonn::interop::manifest::{
    build_manifest, read_manifest, read_manifest_with_mapping, write_manifest, DeviceSettings, Manifest,
    MANIFEST_JSON, MANIFEST_TENSORS,
};
use isonn::model::Range;
use isonn::nonneg::{transform, AffineOp, NonnegAffine, NonnegNetwork, TransformOptions};

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
            write_manifest(dir.path(), &original, None).unwrap();
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
    let (_, tensors) = build_manifest(&original, None).unwrap();
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
    let (mut manifest, mut tensors) = build_manifest(original, None).unwrap();
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
    write_manifest(dir.path(), &original, None).unwrap();
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

/// Returns effect settings with every effect on, in the ranges that
/// `isonn hardware` accepts.
fn all_effects() -> Effects {
    Effects {
        input_bits: Some(6),
        weight_bits: Some(4),
        adc_bits: Some(8),
        extinction_db: Some(30.0),
        weight_noise: 0.002,
        detector_noise: 0.01,
        shot_noise: 0.001,
    }
}

/// Returns the input width `alpha` that each weight entry of `a` reads, in
/// row-major order: grouped convolutions read channel
/// `group * group_inputs + j / receptive`.
fn entry_alpha(a: &NonnegAffine) -> Vec<f64> {
    let dims = a.positive.dims();
    let (out, group_inputs) = (dims[0], dims[1]);
    let receptive: usize = dims[2..].iter().product();
    let groups = match a.op {
        AffineOp::Conv2d { groups, .. } => groups,
        _ => 1,
    };
    let mut values = Vec::new();
    for i in 0..out {
        for j in 0..group_inputs * receptive {
            let channel = (i / (out / groups)) * group_inputs + j / receptive;
            values.push(a.alpha[channel.min(a.alpha.len() - 1)]);
        }
    }
    values
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn mapping_round_trip_reproduces_weights() {
    for seed in 0..3 {
        for cnn in [false, true] {
            for granularity in [GainGranularity::PerLayer, GainGranularity::PerOutput] {
                let (_, original) = nonneg(seed, cnn);
                let settings = DeviceSettings { granularity, effects: all_effects() };
                let dir = tempfile::tempdir().unwrap();
                write_manifest(dir.path(), &original, Some(&settings)).unwrap();
                let (network, read) = read_manifest_with_mapping(dir.path()).unwrap();
                let read = read.expect("the manifest was written with a mapping");
                let case = format!("seed {seed}, cnn {cnn}, {granularity:?}");
                assert_eq!(read.effects, all_effects(), "{case}: effect settings");
                assert_eq!(read.mapping.granularity, granularity, "{case}: granularity");

                let expected = DeviceMapping::new(&original, granularity).unwrap();
                let affine: Vec<(usize, &NonnegAffine)> = network.affine_layers().collect();
                assert_eq!(read.transmissions.len(), affine.len(), "{case}: one entry per affine layer");
                for (((index, a), device), layer) in affine.iter().zip(&read.transmissions).zip(&read.mapping.layers) {
                    let want = expected.layer(*index).unwrap();
                    assert_eq!(layer.layer, *index, "{case}: layer index");
                    assert_eq!(layer.full_scale, want.full_scale, "{case}: full scale of layer {index}");
                    for (g, w) in layer.gains.iter().zip(&want.gains) {
                        // Per-output gains are stored as f32.
                        assert!((g - w).abs() <= 1e-7 * w, "{case}: layer {index} gain {g}, expected {w}");
                    }
                    let out = a.positive.dims()[0];
                    let alpha = entry_alpha(a);
                    let row = alpha.len() / out;
                    let gain = |k: usize| layer.gains[(k / row).min(layer.gains.len() - 1)];
                    // T g / alpha reproduces P and N within 1e-6 relative:
                    // three f32 roundings lie between the two sides.
                    for (name, weights, stored) in [
                        ("P", &a.positive, &device.signal),
                        ("N", &a.negative, &device.complement),
                    ] {
                        let (w, t) = (values(weights), values(stored));
                        assert!(t.iter().all(|t| (0.0..=1.0).contains(t)), "{case}: {name} transmission outside [0, 1]");
                        for k in 0..w.len() {
                            let rebuilt = t[k] * gain(k) / alpha[k];
                            assert!(
                                (rebuilt - w[k]).abs() <= 1e-6 * w[k],
                                "{case}: layer {index} {name}[{k}] = {} rebuilt as {rebuilt}",
                                w[k]
                            );
                        }
                    }
                    let (bias, offsets) = (values(&a.bias), values(&device.offsets));
                    for i in 0..out {
                        let rebuilt = offsets[i] * layer.gains[i.min(layer.gains.len() - 1)];
                        assert!((rebuilt - bias[i]).abs() <= 1e-6 * bias[i], "{case}: layer {index} bias[{i}]");
                    }
                }
            }
        }
    }
}

#[test]
fn manifest_without_settings_is_unchanged() {
    for cnn in [false, true] {
        let (_, original) = nonneg(4, cnn);
        let (plain, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_manifest(plain.path(), &original, None).unwrap();
        let settings = DeviceSettings { granularity: GainGranularity::PerOutput, effects: all_effects() };
        write_manifest(dir.path(), &original, Some(&settings)).unwrap();

        let read_json = |d: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join(MANIFEST_JSON)).unwrap()).unwrap()
        };
        let without = read_json(plain.path());
        let mut with = read_json(dir.path());
        let keys: Vec<&String> = without.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["format", "input", "layers", "output_offset", "schema_version"], "cnn {cnn}");
        assert_eq!(without["schema_version"], 1, "cnn {cnn}");
        // The mapping adds one key and changes nothing else.
        assert!(with.as_object_mut().unwrap().remove("mapping").is_some(), "cnn {cnn}: no mapping written");
        assert_eq!(with, without, "cnn {cnn}");

        let load = |d: &Path| candle_core::safetensors::load(d.join(MANIFEST_TENSORS), &candle_core::Device::Cpu).unwrap();
        let (plain_tensors, mapped_tensors) = (load(plain.path()), load(dir.path()));
        for (name, tensor) in &plain_tensors {
            let part = name.rsplit('.').next().unwrap();
            assert!(["positive", "negative", "bias", "routing"].contains(&part), "unexpected tensor {name}");
            let other = &mapped_tensors[name];
            let same = tensor.to_dtype(DType::F64).unwrap().eq(&other.to_dtype(DType::F64).unwrap()).unwrap();
            let all_equal = same.to_dtype(DType::F32).unwrap().min_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(all_equal, 1.0, "cnn {cnn}: tensor {name} changed");
        }
        let affine = original.affine_layers().count();
        assert_eq!(plain_tensors.len(), 4 * affine, "cnn {cnn}: tensors without a mapping");
        // Per output: gains, two transmissions and offsets per affine layer.
        assert_eq!(mapped_tensors.len(), 8 * affine, "cnn {cnn}: tensors with a mapping");
    }
}

#[test]
fn corrupted_mappings_are_rejected() {
    let (_, original) = nonneg(1, false);
    type EditJson = Box<dyn Fn(&mut Manifest)>;
    type EditTensors = Box<dyn Fn(&mut Vec<(String, Tensor)>)>;
    fn mapping_of(m: &mut Manifest) -> &mut isonn::interop::manifest::ManifestMapping {
        m.mapping.as_mut().unwrap()
    }
    let set_tensor = |name: &'static str, value: f64| -> EditTensors {
        Box::new(move |t| {
            let entry = t.iter_mut().find(|(n, _)| n == name).unwrap();
            entry.1 = entry.1.affine(0.0, value).unwrap();
        })
    };
    let keep: fn() -> EditTensors = || Box::new(|_| {});
    let cases: Vec<(GainGranularity, &str, EditJson, EditTensors)> = vec![
        (GainGranularity::PerLayer, "mapping.layers[0].gain contains 0", Box::new(move |m| mapping_of(m).layers[0].gain = Some(0.0)), keep()),
        (GainGranularity::PerLayer, "mapping.layers[1].gain contains -2", Box::new(move |m| mapping_of(m).layers[1].gain = Some(-2.0)), keep()),
        (GainGranularity::PerOutput, "mapping.layers[0].gains contains 0", Box::new(|_| {}), set_tensor("layers.1.gains", 0.0)),
        (GainGranularity::PerLayer, "(mapping.layers[0].signal_transmission) contains 1.5", Box::new(|_| {}), set_tensor("layers.1.signal_transmission", 1.5)),
        (GainGranularity::PerLayer, "(mapping.layers[0].complement_transmission) differs", Box::new(|_| {}), set_tensor("layers.1.complement_transmission", 0.5)),
        (GainGranularity::PerLayer, "(mapping.layers[0].offsets) has", Box::new(|_| {}), set_tensor("layers.1.offsets", 1e6)),
        (GainGranularity::PerLayer, "mapping.effects.weight_bits is 0", Box::new(move |m| mapping_of(m).effects.weight_bits = Some(0)), keep()),
        (GainGranularity::PerLayer, "mapping.effects.adc_bits is 25", Box::new(move |m| mapping_of(m).effects.adc_bits = Some(25)), keep()),
        (GainGranularity::PerLayer, "mapping.effects.detector_noise is -0.1", Box::new(move |m| mapping_of(m).effects.detector_noise = -0.1), keep()),
        (GainGranularity::PerLayer, "mapping.layers[0].full_scale is -1", Box::new(move |m| mapping_of(m).layers[0].full_scale = -1.0), keep()),
        (GainGranularity::PerLayer, "mapping.layers[1].name is \"layers.1\"", Box::new(move |m| mapping_of(m).layers[1].name = "layers.1".into()), keep()),
        (GainGranularity::PerLayer, "entries; expected", Box::new(move |m| { mapping_of(m).layers.pop(); }), keep()),
        (GainGranularity::PerOutput, "a per-output mapping needs gains", Box::new(move |m| mapping_of(m).layers[0].gain = Some(1.0)), keep()),
        (GainGranularity::PerLayer, "tensor layers.1.offsets (mapping.layers[0].offsets) is missing", Box::new(|_| {}), Box::new(|t| t.retain(|(n, _)| n != "layers.1.offsets"))),
    ];
    for (granularity, expected, edit_json, edit_tensors) in cases {
        let settings = DeviceSettings { granularity, effects: all_effects() };
        let (mut manifest, mut tensors) = build_manifest(&original, Some(&settings)).unwrap();
        edit_json(&mut manifest);
        edit_tensors(&mut tensors);
        let dir = tempfile::tempdir().unwrap();
        let bytes = isonn::store::serialize_tensors(&tensors, None, Path::new("t")).unwrap();
        std::fs::write(dir.path().join(MANIFEST_TENSORS), bytes).unwrap();
        std::fs::write(dir.path().join(MANIFEST_JSON), serde_json::to_string(&manifest).unwrap()).unwrap();
        let message = read_manifest(dir.path()).unwrap_err().to_string();
        assert!(message.contains(expected), "expected {expected:?} in: {message}");
        assert!(message.contains(MANIFEST_JSON), "the error names no file: {message}");
    }
}

#[test]
fn export_command_writes_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let (_, original) = nonneg(5, false);
    let model = dir.path().join("nonneg");
    isonn::store::save(&model, &isonn::store::Model::Nonneg(original), &serde_json::json!({})).unwrap();
    let export = |out: &Path, options: &[&str]| {
        let mut command = common::isonn();
        command.arg("export").arg(&model).args(["--format", "manifest", "--out"]).arg(out).args(options);
        command.assert()
    };

    let out = dir.path().join("quantised");
    export(&out, &["--weight-bits", "4", "--detector-noise", "0.01"]).success();
    let (_, read) = read_manifest_with_mapping(&out).unwrap();
    let read = read.expect("--weight-bits and --detector-noise add the mapping");
    let expected = Effects { weight_bits: Some(4), detector_noise: 0.01, ..Effects::default() };
    assert_eq!(read.effects, expected);
    assert_eq!(read.mapping.granularity, GainGranularity::PerLayer);

    let out = dir.path().join("per-output");
    export(&out, &["--gain", "per-output"]).success();
    let (_, read) = read_manifest_with_mapping(&out).unwrap();
    let read = read.expect("--gain adds the mapping");
    assert_eq!(read.effects, Effects::default());
    assert_eq!(read.mapping.granularity, GainGranularity::PerOutput);

    let out = dir.path().join("plain");
    export(&out, &[]).success();
    assert!(read_manifest_with_mapping(&out).unwrap().1.is_none(), "a mapping without options");

    let rejected = export(&dir.path().join("bad"), &["--weight-bits", "0"]).failure();
    let stderr = String::from_utf8_lossy(&rejected.get_output().stderr).to_string();
    assert!(stderr.contains("--weight-bits"), "{stderr}");
    let onnx = common::isonn()
        .arg("export")
        .arg(&model)
        .args(["--out"])
        .arg(dir.path().join("model.onnx"))
        .args(["--weight-bits", "4"])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&onnx.get_output().stderr).to_string();
    assert!(stderr.contains("--format manifest"), "{stderr}");
}

/// Writes the manifest of `original`, checks its schema version, reads it
/// back and checks that the network read computes the same outputs, bit
/// for bit (the same float32 tensors and settings).
fn assert_round_trip(label: &str, network: &isonn::model::Network, original: &NonnegNetwork, version: u64) {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), original, None).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(MANIFEST_JSON)).unwrap()).unwrap();
    assert_eq!(json["schema_version"], version, "{label}: schema_version");
    let loaded = read_manifest(dir.path()).unwrap();
    let x = random_inputs(11, network, 5, DType::F32);
    let diff = max_abs(&original.forward(&x).unwrap().sub(&loaded.forward(&x).unwrap()).unwrap());
    assert_eq!(diff, 0.0, "{label}: outputs differ by {diff}");
}

/// A ResNet-style network (residual blocks, one with a projection
/// shortcut, batch normalisation folded by the transformation), Elman
/// networks with several activations and a conv1d network.
#[test]
fn residual_elman_conv1d_round_trip() {
    use isonn::activation::Activation;
    use isonn::model::{Init, Network};

    for (seed, activation) in [(1, Activation::ReluN { n: 2.0 }), (2, Activation::PhotonicSigmoid)] {
        let network = Network::resnet(&[3, 8, 8], 4, 5, activation, Init::Xavier, seed).unwrap();
        let original = transform(&network, &TransformOptions::default()).unwrap();
        assert!(!original.is_chain(), "resnet {seed}: no residual block");
        assert_round_trip(&format!("resnet {seed}"), &network, &original, 2);
    }
    for (seed, activation) in [(3, Activation::Tanh), (4, Activation::PhotonicSinusoidal), (5, Activation::GeluN { n: 1.5 })] {
        let network = Network::elman(&[2, 4, 3], 5, 3, activation, Init::Xavier, seed).unwrap();
        let original = transform(&network, &TransformOptions::default()).unwrap();
        assert_round_trip(&format!("elman {seed}"), &network, &original, 2);
    }
    // A padded, strided 1-D convolution over two rows.
    let conv1d = isonn::model::Conv1d::zeros(2, 4, 3, 2, 1, 1, 2).unwrap();
    let layers = vec![
        isonn::model::Layer::Conv1d(conv1d),
        isonn::model::Layer::Activation(Activation::PhotonicSigmoid),
        isonn::model::Layer::Flatten,
        isonn::model::Layer::Linear(isonn::model::Linear::zeros(4 * 2 * 4, 3).unwrap()),
    ];
    let mut network = Network::new(&[2, 2, 8], Range::new(-0.5, 1.0).unwrap(), layers);
    Init::Xavier.apply(&mut network, 9).unwrap();
    let original = transform(&network, &TransformOptions::default()).unwrap();
    assert_round_trip("conv1d", &network, &original, 2);
    // A plain chain is still written as version 1, which older readers read.
    let (network, original) = nonneg(4, true);
    assert_round_trip("cnn", &network, &original, 1);
}

#[test]
fn version_1_rejects_residual_and_elman() {
    use isonn::activation::Activation;
    use isonn::model::{Init, Network};

    let network = Network::elman(&[1, 3, 4], 4, 2, Activation::Tanh, Init::Xavier, 6).unwrap();
    let original = transform(&network, &TransformOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_edited(dir.path(), &original, |m| m.schema_version = 1, |_| {});
    let message = read_manifest(dir.path()).unwrap_err().to_string();
    assert!(message.contains("layers[0]"), "{message}");
    assert!(message.contains("needs schema_version 2"), "{message}");
}

#[test]
fn invalid_elman_manifests_are_rejected() {
    use isonn::activation::Activation;
    use isonn::interop::manifest::ManifestLayer;
    use isonn::model::{Init, Network};

    let network = Network::elman(&[1, 3, 4], 4, 2, Activation::Tanh, Init::Xavier, 7).unwrap();
    let original = transform(&network, &TransformOptions::default()).unwrap();
    let cases: Vec<(&str, Box<dyn Fn(&mut Manifest)>)> = vec![
        ("do not fit 5 features", Box::new(|m| {
            if let ManifestLayer::Elman { features, .. } = &mut m.layers[0] {
                *features = 5;
            }
        })),
        ("do not fit 4 features and 5 state values", Box::new(|m| {
            if let ManifestLayer::Elman { hidden, .. } = &mut m.layers[0] {
                *hidden = 5;
            }
        })),
        ("gelu-n bound -1 must be a finite number > 0", Box::new(|m| {
            if let ManifestLayer::Elman { state, .. } = &mut m.layers[0] {
                state.activation = Activation::GeluN { n: -1.0 };
            }
        })),
    ];
    for (expected, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_edited(dir.path(), &original, |m| edit(m), |_| {});
        let message = read_manifest(dir.path()).unwrap_err().to_string();
        assert!(message.contains(expected), "expected {expected:?} in: {message}");
        assert!(message.contains("layers[0]"), "{message}");
    }
}

#[test]
fn residual_manifest_names_nested_tensors() {
    use isonn::activation::Activation;
    use isonn::model::{Init, Network};

    let network = Network::resnet(&[3, 8, 8], 4, 5, Activation::ReluN { n: 2.0 }, Init::Xavier, 8).unwrap();
    let original = transform(&network, &TransformOptions::default()).unwrap();
    let (_, tensors) = build_manifest(&original, None).unwrap();
    let nested = tensors.iter().filter(|(n, _)| n.contains(".main.") && n.ends_with(".positive")).count();
    assert!(nested >= 2, "only {nested} affine layers inside residual blocks");
    // Without one nested tensor, the error names the layer path and tensor.
    let missing = tensors.iter().find(|(n, _)| n.contains(".main.") && n.ends_with(".bias")).unwrap().0.clone();
    let dir = tempfile::tempdir().unwrap();
    write_edited(dir.path(), &original, |_| {}, |t| t.retain(|(n, _)| *n != missing));
    let message = read_manifest(dir.path()).unwrap_err().to_string();
    assert!(message.contains(&format!("tensor {missing} is missing")), "{message}");
    assert!(message.contains("main[0]"), "{message}");
    // The mapping section covers chains only.
    let settings = DeviceSettings { granularity: GainGranularity::PerLayer, effects: Effects::default() };
    assert!(build_manifest(&original, Some(&settings)).is_err(), "a mapping of a residual network was built");
}
