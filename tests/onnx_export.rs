//! Export to ONNX, checked by onnx.checker and ONNX Runtime: every exported
//! model, regular and non-negative, must compute isonn's logits.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, ort, random_cnn, random_inputs, random_mlp};
use isonn::activation::Activation;
use isonn::interop::{decode_tensor, export_network, export_nonneg, proto::ModelProto, write_model};
use isonn::model::{BatchNorm, Init, Layer, Linear, Network, Pool, Range};
use isonn::nonneg::{transform, TransformOptions};
use rand::{Rng, SeedableRng};

/// Largest difference between ONNX Runtime's and isonn's logits, relative
/// to the largest isonn logit (at least 1). Both run in float32; the
/// differences come from the order of summation and from ONNX Runtime's
/// sigmoid and sine approximations. The largest measured was 1.5e-6 here
/// and 4.1e-6 on the PyTorch fixtures (onnxruntime 1.31.1, x86-64).
const TOLERANCE: f64 = 1e-5;

fn relative_difference(isonn: &Tensor, runtime: &Tensor) -> f64 {
    let isonn = isonn.to_dtype(DType::F64).unwrap();
    let runtime = runtime.to_dtype(DType::F64).unwrap();
    assert_eq!(isonn.dims(), runtime.dims(), "output shapes differ");
    max_abs(&isonn.sub(&runtime).unwrap()) / max_abs(&isonn).max(1.0)
}

/// Exports `network` and its transformation, runs both with ONNX Runtime
/// on `inputs` and returns the two relative differences.
fn check_both(dir: &std::path::Path, label: &str, network: &Network, inputs: &Tensor) -> (f64, f64) {
    let regular_path = dir.join(format!("{label}-regular.onnx"));
    write_model(&regular_path, &export_network(network).unwrap()).unwrap();
    let regular = relative_difference(&network.forward(inputs).unwrap(), &ort::run(&regular_path, inputs));

    let nonneg = transform(network, &TransformOptions::default()).unwrap();
    let onnx = export_nonneg(&nonneg).unwrap();
    check_nonneg_layout(&onnx, label);
    let nonneg_path = dir.join(format!("{label}-nonneg.onnx"));
    write_model(&nonneg_path, &onnx).unwrap();
    let physical = relative_difference(&nonneg.forward(inputs).unwrap(), &ort::run(&nonneg_path, inputs));
    eprintln!("{label}: regular {regular:.2e}, non-negative {physical:.2e}");
    (regular, physical)
}

/// Checks that every weight and bias initializer is >= 0 and that the
/// modulator, complement and shift nodes are present.
fn check_nonneg_layout(model: &ModelProto, label: &str) {
    let graph = model.graph.as_ref().unwrap();
    let mut parameters = 0;
    for tensor in &graph.initializer {
        let name = tensor.name.clone().unwrap();
        if [".positive", ".negative", ".bias"].iter().any(|s| name.ends_with(s)) {
            parameters += 1;
            let values = decode_tensor(tensor).unwrap().values;
            let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
            assert!(min >= 0.0, "{label}: initializer {name} has value {min} < 0");
        }
    }
    assert!(parameters >= 3, "{label}: only {parameters} weight and bias initializers");
    let names: Vec<&str> = graph.node.iter().map(|n| n.name.as_deref().unwrap()).collect();
    assert!(names.contains(&"input/modulator"), "{label}: no input/modulator node");
    assert!(names.iter().any(|n| n.ends_with("/complement")), "{label}: no complement node");
    assert!(names.iter().any(|n| n.ends_with("/signal_weights")), "{label}: no signal_weights node");
    let ops: HashMap<&str, usize> = graph.node.iter().fold(HashMap::new(), |mut m, n| {
        *m.entry(n.op_type.as_deref().unwrap()).or_default() += 1;
        m
    });
    assert!(!ops.contains_key("BatchNormalization"), "{label}: a signed BatchNormalization remains");
}

#[test]
fn random_mlps_match_onnx_runtime() {
    if !ort::available("random_mlps_match_onnx_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (seed, range) in [(1, (0.0, 1.0)), (2, (-1.0, 2.0)), (3, (0.0, 1.0)), (4, (-0.5, 0.5)), (5, (0.0, 1.0))] {
        let range = Range::new(range.0, range.1).unwrap();
        let network = random_mlp(seed, DType::F32, range);
        let inputs = random_inputs(seed, &network, 9, DType::F32);
        let (regular, nonneg) = check_both(dir.path(), &format!("mlp{seed}"), &network, &inputs);
        assert!(regular <= TOLERANCE, "mlp {seed}: regular export differs by {regular}");
        assert!(nonneg <= TOLERANCE, "mlp {seed}: non-negative export differs by {nonneg}");
    }
}

#[test]
fn random_cnns_match_onnx_runtime() {
    if !ort::available("random_cnns_match_onnx_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..6 {
        let lo = if seed % 2 == 0 { 0.0 } else { -0.4 };
        let network = random_cnn(seed, DType::F32, Range::new(lo, 1.0).unwrap());
        let inputs = random_inputs(seed, &network, 5, DType::F32);
        let (regular, nonneg) = check_both(dir.path(), &format!("cnn{seed}"), &network, &inputs);
        assert!(regular <= TOLERANCE, "cnn {seed}: regular export differs by {regular}");
        assert!(nonneg <= TOLERANCE, "cnn {seed}: non-negative export differs by {nonneg}");
    }
}

/// Gives every batch normalisation random statistics, scales of both signs
/// and offsets, so that folding it changes the weights.
fn randomise_batch_norms(network: &mut Network, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    network
        .visit_mut(&mut |_, layer| {
            if let Layer::BatchNorm(bn) = layer {
                let c = bn.channels();
                let mut draw = |lo: f64, hi: f64| {
                    let v: Vec<f32> = (0..c).map(|_| rng.gen_range(lo..hi) as f32).collect();
                    Tensor::from_vec(v, c, &Device::Cpu).unwrap()
                };
                let (weight, bias, mean, var) = (draw(-1.5, 1.5), draw(-0.5, 0.5), draw(-0.3, 0.3), draw(0.2, 2.0));
                *bn = BatchNorm::from_parts(weight, bias, mean, var, 1e-5, 0.1);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn resnet_with_normalised_inputs_matches_onnx_runtime() {
    if !ort::available("resnet_with_normalised_inputs_matches_onnx_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (seed, activation) in [(7, Activation::PhotonicSinusoidal), (8, Activation::PhotonicSigmoid), (9, Activation::ReluN { n: 2.0 })] {
        let mut network = Network::resnet(&[3, 8, 8], 4, 5, activation, Init::Xavier, seed).unwrap();
        randomise_batch_norms(&mut network, seed);
        // Standardised colour inputs: each channel has its own negative range.
        network.input_range = Range::new(-2.5, 2.8).unwrap();
        network.channel_ranges = vec![
            Range::new(-2.4, 2.6).unwrap(),
            Range::new(-2.5, 2.7).unwrap(),
            Range::new(-2.2, 2.8).unwrap(),
        ];
        let inputs = random_inputs(seed, &network, 4, DType::F32);
        let (regular, nonneg) = check_both(dir.path(), &format!("resnet{seed}"), &network, &inputs);
        assert!(regular <= TOLERANCE, "resnet {seed}: regular export differs by {regular}");
        assert!(nonneg <= TOLERANCE, "resnet {seed}: non-negative export differs by {nonneg}");
    }
}

#[test]
fn pools_dropout_and_tanh_match_onnx_runtime() {
    if !ort::available("pools_dropout_and_tanh_match_onnx_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut padded = Pool::new(3, 2);
    padded.padding = 1;
    let conv = isonn::model::Conv2d::zeros(2, 4, 3, 1, 1, 1, 1).unwrap();
    let mut network = Network::new(
        &[2, 8, 8],
        Range::new(0.0, 1.0).unwrap(),
        vec![
            Layer::Conv2d(conv),
            Layer::Activation(Activation::Tanh),
            Layer::AvgPool2d(padded),
            Layer::MaxPool2d(padded),
            Layer::AdaptiveAvgPool2d([1, 1]),
            Layer::Dropout(0.25),
            Layer::Flatten,
            Layer::Linear(Linear::zeros(4, 3).unwrap()),
        ],
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    common::randomise(&mut network, &mut rng, DType::F32);
    network.output_shape().unwrap();
    let inputs = random_inputs(11, &network, 6, DType::F32);
    let (regular, nonneg) = check_both(dir.path(), "pools", &network, &inputs);
    assert!(regular <= TOLERANCE, "regular export differs by {regular}");
    assert!(nonneg <= TOLERANCE, "non-negative export differs by {nonneg}");
}

#[test]
fn elman_export_names_the_layer() {
    let network = Network::elman(&[1, 4, 4], 3, 2, Activation::PhotonicSigmoid, Init::Xavier, 1).unwrap();
    let message = export_network(&network).unwrap_err().to_string();
    assert!(message.contains("layers.0"), "{message}");
    assert!(message.contains("Elman"), "{message}");
}

#[test]
fn export_command_writes_both_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let network = random_mlp(21, DType::F32, Range::new(0.0, 1.0).unwrap());
    let regular_dir = dir.path().join("regular");
    let nonneg_dir = dir.path().join("nonneg");
    let provenance = serde_json::json!({});
    isonn::store::save(&regular_dir, &isonn::store::Model::Regular(network.clone()), &provenance).unwrap();
    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    isonn::store::save(&nonneg_dir, &isonn::store::Model::Nonneg(nonneg.clone()), &provenance).unwrap();
    for (model_dir, kind) in [(&regular_dir, "regular"), (&nonneg_dir, "nonneg")] {
        let out = dir.path().join(format!("{kind}.onnx"));
        common::isonn()
            .args(["export", model_dir.to_str().unwrap(), "--format", "onnx", "--out", out.to_str().unwrap()])
            .assert()
            .success();
        let model = isonn::interop::read_model(&out).unwrap();
        let graph = model.graph.unwrap();
        let has_modulator = graph.node.iter().any(|n| n.name.as_deref() == Some("input/modulator"));
        assert_eq!(has_modulator, kind == "nonneg", "{kind}: modulator node present: {has_modulator}");
    }
    let missing = common::isonn()
        .args(["export", dir.path().join("absent").to_str().unwrap(), "--out", "x.onnx"])
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&missing.get_output().stderr).to_string();
    assert!(stderr.contains("absent"), "{stderr}");
}

/// GELU-N exports as `min(x * 0.5 * (1 + erf(x / sqrt 2)), N)` with ONNX's
/// Erf, in the regular and in the non-negative graph, where its negative
/// lower bound puts an offset on the physical signal.
#[test]
fn gelu_n_matches_onnx_runtime() {
    if !ort::available("gelu_n_matches_onnx_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for seed in [6, 7] {
        let network = Network::mlp(&[1, 4, 4], &[12, 8], 3, Activation::GeluN { n: 1.5 }, Init::Xavier, seed).unwrap();
        let inputs = random_inputs(seed, &network, 9, DType::F32);
        let (regular, nonneg) = check_both(dir.path(), &format!("gelu{seed}"), &network, &inputs);
        assert!(regular <= TOLERANCE, "gelu {seed}: regular export differs by {regular}");
        assert!(nonneg <= TOLERANCE, "gelu {seed}: non-negative export differs by {nonneg}");
    }
}

#[test]
fn conv1d_and_curve_exports_name_the_layer() {
    let curve = Activation::Curve(
        isonn::curve::TransferCurve::from_csv(std::path::Path::new("tests/fixtures/transfer-curve.csv")).unwrap(),
    );
    let network = Network::mlp(&[1, 4, 4], &[5], 3, curve, Init::Xavier, 1).unwrap();
    let message = export_network(&network).unwrap_err().to_string();
    assert!(message.contains("layers.2"), "{message}");
    assert!(message.contains("transfer curve"), "{message}");

    let conv1d = isonn::model::Conv1d::zeros(1, 2, 3, 1, 1, 1, 1).unwrap();
    let layers = vec![Layer::Conv1d(conv1d), Layer::Flatten, Layer::Linear(Linear::zeros(8, 3).unwrap())];
    let network = Network::new(&[1, 1, 4], Range::new(0.0, 1.0).unwrap(), layers);
    let message = export_network(&network).unwrap_err().to_string();
    assert!(message.contains("layers.0"), "{message}");
    assert!(message.contains("conv1d"), "{message}");
}
