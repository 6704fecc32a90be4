//! Import of ONNX models: round trips through export, recognition of the
//! photonic activations, and malformed files.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, random_cnn, random_inputs, random_mlp};
use isonn::activation::Activation;
use isonn::interop::proto::{ModelProto, NodeProto};
use isonn::interop::{encode_model, export_network, float_tensor, import_model, read_model, write_model};
use isonn::model::{Init, Layer, Network, Range};
use rand::{Rng, SeedableRng};

fn unit() -> Vec<Range> {
    vec![Range::new(0.0, 1.0).unwrap()]
}

fn kinds(layers: &[Layer]) -> Vec<String> {
    layers
        .iter()
        .map(|l| match l {
            Layer::Residual(r) => format!("residual[{:?} | {:?}]", kinds(&r.main), kinds(&r.shortcut)),
            Layer::Activation(a) => format!("activation {a}"),
            other => other.kind().to_string(),
        })
        .collect()
}

/// Checks that `imported` has the layers and parameters of `original`,
/// exactly (both float32), and computes the same logits.
fn assert_same_network(original: &Network, imported: &Network, label: &str) {
    assert_eq!(kinds(&imported.layers), kinds(&original.layers), "{label}: layers differ");
    assert_eq!(imported.input_shape, original.input_shape, "{label}: input shapes differ");
    let (a, b) = (original.parameters(), imported.parameters());
    assert_eq!(a.len(), b.len(), "{label}: parameter counts differ");
    for ((name_a, ta), (name_b, tb)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b, "{label}: parameter names differ");
        assert_eq!(ta.dims(), tb.dims(), "{label}: {name_a} shapes differ");
        let diff = max_abs(&ta.sub(tb).unwrap());
        assert_eq!(diff, 0.0, "{label}: {name_a} differs by {diff}");
    }
    let x = random_inputs(3, original, 6, DType::F32);
    let diff = max_abs(&original.forward(&x).unwrap().sub(&imported.forward(&x).unwrap()).unwrap());
    // Same float32 parameters and the same operations in the same order.
    assert!(diff <= 1e-6, "{label}: logits differ by {diff}");
}

fn round_trip(network: &Network) -> Network {
    let bytes = encode_model(&export_network(network).unwrap());
    let model = isonn::interop::decode_model(&bytes, Path::new("rt.onnx")).unwrap();
    let ranges = if network.channel_ranges.is_empty() { vec![network.input_range] } else { network.channel_ranges.clone() };
    import_model(&model, Path::new("rt.onnx"), &ranges).unwrap().network
}

#[test]
fn mlps_and_cnns_round_trip() {
    for seed in 0..8 {
        let mlp = random_mlp(seed, DType::F32, Range::new(0.0, 1.0).unwrap());
        assert_same_network(&mlp, &round_trip(&mlp), &format!("mlp {seed}"));
        let cnn = random_cnn(seed, DType::F32, Range::new(-0.5, 1.0).unwrap());
        assert_same_network(&cnn, &round_trip(&cnn), &format!("cnn {seed}"));
    }
}

#[test]
fn resnet_with_batch_norm_round_trips() {
    for activation in [Activation::PhotonicSigmoid, Activation::PhotonicSinusoidal, Activation::ReluN { n: 4.0 }, Activation::Relu, Activation::Tanh] {
        let mut network = Network::resnet(&[3, 8, 8], 4, 5, activation.clone(), Init::Xavier, 5).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        network
            .visit_mut(&mut |_, layer| {
                if let Layer::BatchNorm(bn) = layer {
                    let c = bn.channels();
                    let draw = |rng: &mut rand::rngs::StdRng, lo: f64, hi: f64| {
                        let v: Vec<f32> = (0..c).map(|_| rng.gen_range(lo..hi) as f32).collect();
                        Tensor::from_vec(v, c, &Device::Cpu).unwrap()
                    };
                    let (w, b) = (draw(&mut rng, -1.5, 1.5), draw(&mut rng, -0.5, 0.5));
                    let (m, v) = (draw(&mut rng, -0.3, 0.3), draw(&mut rng, 0.2, 2.0));
                    *bn = isonn::model::BatchNorm::from_parts(w, b, m, v, 1e-5, 0.1);
                }
                Ok(())
            })
            .unwrap();
        network.channel_ranges = vec![Range::new(-2.0, 2.0).unwrap(), Range::new(-1.0, 2.0).unwrap(), Range::new(-2.0, 1.0).unwrap()];
        network.input_range = Range::new(-2.0, 2.0).unwrap();
        let imported = round_trip(&network);
        assert_same_network(&network, &imported, &format!("resnet {activation}"));
        assert_eq!(imported.channel_ranges, network.channel_ranges);
    }
}

/// Exports a small MLP and returns its model with `edit` applied.
fn edited(edit: impl FnOnce(&mut ModelProto)) -> ModelProto {
    let network = random_mlp(2, DType::F32, Range::new(0.0, 1.0).unwrap());
    let mut model = export_network(&network).unwrap();
    edit(&mut model);
    model
}

fn import_error(model: &ModelProto) -> String {
    import_model(model, Path::new("bad.onnx"), &unit()).unwrap_err().to_string()
}

#[test]
fn missing_initializer_names_node() {
    let model = edited(|m| {
        let g = m.graph.as_mut().unwrap();
        g.initializer.retain(|t| t.name.as_deref() != Some("layers.1.weight"));
    });
    let message = import_error(&model);
    assert!(message.contains("bad.onnx"), "{message}");
    assert!(message.contains("layers.1/gemm"), "{message}");
    assert!(message.contains("layers.1.weight"), "{message}");
}

#[test]
fn dimension_mismatch_names_node() {
    let model = edited(|m| {
        let g = m.graph.as_mut().unwrap();
        let weight = g.initializer.iter_mut().find(|t| t.name.as_deref() == Some("layers.1.weight")).unwrap();
        let out = weight.dims[0] as usize;
        *weight = float_tensor("layers.1.weight", &[out, 1000], &vec![0.5; out * 1000]);
    });
    let message = import_error(&model);
    assert!(message.contains("layers.1/gemm"), "{message}");
    assert!(message.contains("1000"), "{message}");
}

#[test]
fn huge_declared_tensor_is_rejected() {
    let model = edited(|m| {
        let g = m.graph.as_mut().unwrap();
        g.initializer[0].dims = vec![1 << 40, 1 << 20];
    });
    // Through the bytes, as a hostile file would arrive.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.onnx");
    write_model(&path, &model).unwrap();
    let message = import_model(&read_model(&path).unwrap(), &path, &unit()).unwrap_err().to_string();
    assert!(message.contains("declares dimensions"), "{message}");
}

#[test]
fn truncated_file_is_an_error() {
    let bytes = encode_model(&edited(|_| {}));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.onnx");
    let mut failures = 0;
    for cut in [1, 7, bytes.len() / 3, bytes.len() / 2, bytes.len() - 5] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        // A cut inside a field fails to decode; a cut between fields
        // decodes to a graph that misses nodes or tensors and fails to
        // import. Neither may panic.
        let result = read_model(&path).and_then(|m| import_model(&m, &path, &unit()));
        let message = result.unwrap_err().to_string();
        assert!(message.contains("cut.onnx"), "cut at {cut}: {message}");
        failures += 1;
    }
    assert_eq!(failures, 5);
}

#[test]
fn unsupported_op_names_node_and_list() {
    let model = edited(|m| {
        let g = m.graph.as_mut().unwrap();
        let node: &mut NodeProto = g.node.iter_mut().find(|n| n.op_type.as_deref() == Some("Gemm")).unwrap();
        node.op_type = Some("LSTM".into());
    });
    let message = import_error(&model);
    assert!(message.contains("unsupported operator LSTM"), "{message}");
    assert!(message.contains("layers.1/gemm"), "{message}");
    assert!(message.contains("Gemm, MatMul"), "{message}");
}

#[test]
fn plain_sigmoid_is_rejected_with_reason() {
    let model = edited(|m| {
        let g = m.graph.as_mut().unwrap();
        // Replace the first activation's formula by a lone Sigmoid on the
        // Gemm output, keeping its output name.
        let gemm = g.node.iter().position(|n| n.op_type.as_deref() == Some("Gemm")).unwrap();
        let gemm_out = g.node[gemm].output[0].clone();
        let next_gemm = g.node.iter().skip(gemm + 1).position(|n| n.op_type.as_deref() == Some("Gemm")).unwrap() + gemm + 1;
        let activation_out = g.node[next_gemm].input[0].clone();
        g.node.drain(gemm + 1..next_gemm);
        g.node.insert(
            gemm + 1,
            NodeProto {
                input: vec![gemm_out],
                output: vec![activation_out],
                name: Some("/act/Sigmoid".into()),
                op_type: Some("Sigmoid".into()),
                ..Default::default()
            },
        );
    });
    let message = import_error(&model);
    assert!(message.contains("/act/Sigmoid"), "{message}");
    assert!(message.contains("matches none of isonn's activations"), "{message}");
}

#[test]
fn import_command_writes_model_for_transform() {
    let dir = tempfile::tempdir().unwrap();
    let network = random_cnn(4, DType::F32, Range::new(0.0, 1.0).unwrap());
    let onnx = dir.path().join("cnn.onnx");
    write_model(&onnx, &export_network(&network).unwrap()).unwrap();
    let out = dir.path().join("imported");
    common::isonn()
        .args(["import", onnx.to_str().unwrap(), "--out", out.to_str().unwrap(), "--input-range", "0,1"])
        .assert()
        .success();
    let (model, _) = isonn::store::load(&out).unwrap();
    let isonn::store::Model::Regular(imported) = model else { panic!("import wrote a non-negative model") };
    assert_same_network(&network, &imported, "cnn via the command");
    common::isonn()
        .args(["transform", out.to_str().unwrap(), "--out", dir.path().join("nonneg").to_str().unwrap()])
        .assert()
        .success();
    let bad = common::isonn()
        .args(["import", onnx.to_str().unwrap(), "--out", out.to_str().unwrap(), "--input-range", "1,0"])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&bad.get_output().stderr).to_string();
    assert!(stderr.contains("lo <= hi"), "{stderr}");
}

#[test]
fn import_calibrates_relu_on_npy_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut network = random_mlp(6, DType::F32, Range::new(0.0, 1.0).unwrap());
    for layer in &mut network.layers {
        if let Layer::Activation(a) = layer {
            *a = Activation::Relu;
        }
    }
    let onnx = dir.path().join("relu.onnx");
    write_model(&onnx, &export_network(&network).unwrap()).unwrap();
    let x = random_inputs(6, &network, 64, DType::F32);
    let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let inputs = dir.path().join("calibration.npy");
    isonn::interop::npy::write_npy_f32(&inputs, x.dims(), &values).unwrap();
    let out = dir.path().join("bounded");
    common::isonn()
        .args(["import", onnx.to_str().unwrap(), "--out", out.to_str().unwrap(), "--input-range", "0,1"])
        .args(["--calibrate", inputs.to_str().unwrap()])
        .assert()
        .success();
    assert!(out.join("bound.json").is_file(), "no bound.json beside the bounded model");
    let (model, _) = isonn::store::load(&out).unwrap();
    let isonn::store::Model::Regular(bounded) = model else { panic!("import wrote a non-negative model") };
    let relu_n = bounded.layers.iter().filter(|l| matches!(l, Layer::Activation(Activation::ReluN { .. }))).count();
    let relu = network.layers.iter().filter(|l| matches!(l, Layer::Activation(Activation::Relu))).count();
    assert_eq!(relu_n, relu, "every ReLU becomes ReLU-N");
    // The bound is the largest pre-activation on these inputs, so on them
    // the bounded network computes what the ReLU network computes.
    let diff = max_abs(&network.forward(&x).unwrap().sub(&bounded.forward(&x).unwrap()).unwrap());
    assert!(diff <= 1e-5, "bounded logits differ by {diff} on the calibration inputs");
    common::isonn()
        .args(["transform", out.to_str().unwrap(), "--out", dir.path().join("nonneg").to_str().unwrap()])
        .assert()
        .success();
}

/// The dynamo exporter's file of the padded fixture, edited: two Pad
/// nodes (`node_pad` before a Conv, `node_pad_1` before an AveragePool)
/// share the pads initializer `val_0`.
fn edited_pad_fixture(edit: impl FnOnce(&mut ModelProto)) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/cnn_pad_nodes.dynamo.onnx");
    let mut model = read_model(&path).unwrap();
    edit(&mut model);
    import_error(&model)
}

fn set_pads(model: &mut ModelProto, pads: &[i64]) {
    let g = model.graph.as_mut().unwrap();
    let tensor = g.initializer.iter_mut().find(|t| t.name.as_deref() == Some("val_0")).unwrap();
    *tensor = isonn::interop::int64_tensor("val_0", pads);
}

#[test]
fn asymmetric_pad_names_node_and_pads() {
    let message = edited_pad_fixture(|m| set_pads(m, &[0, 0, 1, 0, 0, 0, 1, 0]));
    assert!(message.contains("node_pad (Pad)"), "{message}");
    assert!(message.contains("[0, 0, 1, 0, 0, 0, 1, 0]"), "{message}");
    assert!(message.contains("differ between sides"), "{message}");
    let channel = edited_pad_fixture(|m| set_pads(m, &[0, 1, 1, 1, 0, 0, 1, 1]));
    assert!(channel.contains("channel axis"), "{channel}");
}

#[test]
fn pad_before_max_pool_is_rejected() {
    let message = edited_pad_fixture(|m| {
        let g = m.graph.as_mut().unwrap();
        let pool = g.node.iter_mut().find(|n| n.op_type.as_deref() == Some("AveragePool")).unwrap();
        pool.op_type = Some("MaxPool".into());
        pool.attribute.retain(|a| a.name.as_deref() != Some("count_include_pad"));
    });
    assert!(message.contains("node_avg_pool2d (MaxPool)"), "{message}");
    assert!(message.contains("Pad node node_pad_1"), "{message}");
    assert!(message.contains("-infinity"), "{message}");
}

#[test]
fn reflect_pad_is_rejected() {
    let message = edited_pad_fixture(|m| {
        let g = m.graph.as_mut().unwrap();
        let pad = g.node.iter_mut().find(|n| n.op_type.as_deref() == Some("Pad")).unwrap();
        pad.attribute[0].s = Some(b"reflect".to_vec());
    });
    assert!(message.contains("node_pad (Pad)"), "{message}");
    assert!(message.contains("mode reflect is not supported"), "{message}");
}

#[test]
fn pad_read_by_activation_is_rejected() {
    // The Conv after the first Pad becomes a Relu, which reads the padded
    // image where only a convolution or pool can take the padding over.
    let message = edited_pad_fixture(|m| {
        let g = m.graph.as_mut().unwrap();
        let conv = g.node.iter_mut().find(|n| n.name.as_deref() == Some("node_conv2d")).unwrap();
        conv.op_type = Some("Relu".into());
        conv.input.truncate(1);
        conv.attribute.clear();
    });
    assert!(message.contains("node_conv2d (Relu)"), "{message}");
    assert!(message.contains("reads the output of Pad node node_pad"), "{message}");
}

#[test]
fn reshape_that_regroups_names_target() {
    let message = edited_pad_fixture(|m| {
        let g = m.graph.as_mut().unwrap();
        let shape = g.initializer.iter_mut().find(|t| t.name.as_deref() == Some("val_9")).unwrap();
        *shape = isonn::interop::int64_tensor("val_9", &[1, 6, 9]);
    });
    assert!(message.contains("node_view (Reshape)"), "{message}");
    assert!(message.contains("Reshape to [1, 6, 9]"), "{message}");
    assert!(message.contains("[batch, 6, 3, 3]"), "{message}");
}
