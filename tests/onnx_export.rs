//! Export to ONNX, checked by onnx.checker and ONNX Runtime: every exported
//! model, regular and non-negative, must compute isonn's logits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::ort::{check_both, TOLERANCE};
use common::{ort, random_cnn, random_inputs, random_mlp};
use isonn::activation::Activation;
use isonn::interop::{export_network, export_nonneg};
use isonn::model::{BatchNorm, Init, Layer, Linear, Network, Pool, Range};
use isonn::nonneg::{transform, TransformOptions};
use rand::{Rng, SeedableRng};

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

/// Elman networks export unrolled over their steps, every step reading
/// the same weight initializers.
#[test]
fn elman_matches_onnx_runtime() {
    let cases = [
        (1, Activation::PhotonicSigmoid, [1, 4, 4]),
        (2, Activation::Tanh, [2, 5, 3]),
        (3, Activation::ReluN { n: 2.0 }, [1, 3, 6]),
        (4, Activation::GeluN { n: 1.5 }, [1, 6, 2]),
        (5, Activation::PhotonicSinusoidal, [3, 1, 2]),
    ];
    for (seed, activation, shape) in &cases {
        let network = Network::elman(shape, 5, 3, activation.clone(), Init::Xavier, *seed).unwrap();
        let nonneg = transform(&network, &TransformOptions::default()).unwrap();
        let graph = export_nonneg(&nonneg).unwrap().graph.unwrap();
        let positives = graph.initializer.iter().filter(|t| t.name.as_deref().unwrap().ends_with(".positive")).count();
        // The cell and the classifier, whatever the number of steps.
        assert_eq!(positives, 2, "elman {seed}: .positive initializers");
        let steps = graph.node.iter().filter(|n| n.name.as_deref().unwrap().ends_with("/concat")).count();
        assert_eq!(steps, shape[1], "elman {seed}: unrolled steps");
    }
    if !ort::available("elman_matches_onnx_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (seed, activation, shape) in cases {
        let network = Network::elman(&shape, 5, 3, activation, Init::Xavier, seed).unwrap();
        let inputs = random_inputs(seed, &network, 7, DType::F32);
        let (regular, nonneg) = check_both(dir.path(), &format!("elman{seed}"), &network, &inputs);
        assert!(regular <= TOLERANCE, "elman {seed}: regular export differs by {regular}");
        assert!(nonneg <= TOLERANCE, "elman {seed}: non-negative export differs by {nonneg}");
    }
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
fn curve_export_names_the_layer() {
    let curve = Activation::Curve(
        isonn::curve::TransferCurve::from_csv(std::path::Path::new("tests/fixtures/transfer-curve.csv")).unwrap(),
    );
    let network = Network::mlp(&[1, 4, 4], &[5], 3, curve, Init::Xavier, 1).unwrap();
    let message = export_network(&network).unwrap_err().to_string();
    assert!(message.contains("layers.2"), "{message}");
    assert!(message.contains("transfer curve"), "{message}");
}
