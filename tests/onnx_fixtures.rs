//! ONNX models exported from PyTorch (tests/fixtures/onnx, made by
//! make_fixtures.py): each imports, computes PyTorch's logits, transforms
//! into a non-negative network that agrees with it, and exports to files
//! that ONNX Runtime runs with the same results.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{max_abs, ort};
use isonn::interop::{export_network, export_nonneg, import_model, npy, read_model, write_model};
use isonn::activation::Activation;
use isonn::model::{Layer, Network, Range};
use isonn::nonneg::{transform, TransformOptions};

/// Largest difference between isonn's and PyTorch's logits, relative to
/// the largest logit (at least 1); both compute in float32.
const PYTORCH_TOLERANCE: f64 = 1e-5;

/// The equivalence tolerance of `isonn verify` for float32 models.
const EQUIVALENCE_TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(name)
}

fn load_npy(path: &Path) -> Tensor {
    let data = npy::read_npy(path).unwrap();
    Tensor::from_vec(data.values, data.dims, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

/// CIFAR-10's standardisation (x - mean) / std applied to pixels in [0, 1],
/// as make_fixtures.py uses it.
fn standardised() -> Vec<Range> {
    let mean = [0.4914, 0.4822, 0.4465];
    let std = [0.2023, 0.1994, 0.2010];
    (0..3).map(|c| Range::new(-mean[c] / std[c], (1.0 - mean[c]) / std[c]).unwrap()).collect()
}

fn argmax(t: &Tensor) -> Vec<u32> {
    t.argmax(1).unwrap().to_vec1().unwrap()
}

fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    max_abs(&a.sub(&b).unwrap()) / max_abs(&a).max(1.0)
}

/// The files of each fixture: from the TorchScript exporter (opset 13)
/// and from the dynamo exporter (opset 18).
const EXPORTERS: [&str; 2] = ["onnx", "dynamo.onnx"];

/// Imports fixture `name` from each exporter's file and checks it end to
/// end; returns the networks imported.
fn check_fixture(name: &str, ranges: Vec<Range>, output_function: Option<&str>) -> Vec<Network> {
    EXPORTERS
        .iter()
        .map(|extension| check_file(name, extension, ranges.clone(), output_function))
        .collect()
}

fn check_file(name: &str, extension: &str, ranges: Vec<Range>, output_function: Option<&str>) -> Network {
    let path = fixture(&format!("{name}.{extension}"));
    let name = &format!("{name}.{extension}");
    let imported = import_model(&read_model(&path).unwrap(), &path, &ranges).unwrap();
    assert_eq!(imported.output_function.as_deref(), output_function, "{name}: output function");
    let network = imported.network;
    let stem = name.split('.').next().unwrap();
    let x = load_npy(&fixture(&format!("{stem}.inputs.npy")));
    let expected = load_npy(&fixture(&format!("{stem}.outputs.npy")));
    let logits = network.forward(&x).unwrap();
    let pytorch = relative(&expected, &logits);
    assert!(pytorch <= PYTORCH_TOLERANCE, "{name}: isonn and PyTorch logits differ by {pytorch}");
    eprintln!("{name}: PyTorch {pytorch:.2e}");
    check_conversion(name, &network, &x);
    network
}

/// Transforms `network`, checks that the non-negative network agrees with
/// it on `x` and that ONNX Runtime computes both exports.
fn check_conversion(name: &str, network: &Network, x: &Tensor) {
    let logits = network.forward(x).unwrap();
    let nonneg = transform(network, &TransformOptions::default()).unwrap();
    let physical = nonneg.forward(x).unwrap();
    let equivalence = relative(&logits, &physical);
    assert!(equivalence <= EQUIVALENCE_TOLERANCE, "{name}: non-negative logits differ by {equivalence}");
    assert_eq!(argmax(&logits), argmax(&physical), "{name}: argmax agreement below 1.0");
    let negative = nonneg
        .parameters()
        .iter()
        .map(|(_, t)| t.to_dtype(DType::F64).unwrap().min_all().unwrap().to_scalar::<f64>().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert!(negative >= 0.0, "{name}: a non-negative parameter is {negative}");
    eprintln!("{name}: non-negative {equivalence:.2e}");

    if ort::available(name) {
        let dir = tempfile::tempdir().unwrap();
        let regular_path = dir.path().join("regular.onnx");
        write_model(&regular_path, &export_network(network).unwrap()).unwrap();
        let regular_runtime = relative(&logits, &ort::run(&regular_path, x));
        let nonneg_path = dir.path().join("nonneg.onnx");
        write_model(&nonneg_path, &export_nonneg(&nonneg).unwrap()).unwrap();
        let nonneg_runtime = relative(&physical, &ort::run(&nonneg_path, x));
        eprintln!("{name}: ONNX Runtime regular {regular_runtime:.2e}, non-negative {nonneg_runtime:.2e}");
        assert!(regular_runtime <= PYTORCH_TOLERANCE, "{name}: regular export differs by {regular_runtime}");
        assert!(nonneg_runtime <= PYTORCH_TOLERANCE, "{name}: non-negative export differs by {nonneg_runtime}");
    }
}

#[test]
fn mlp_with_photonic_sigmoid() {
    for network in check_fixture("mlp_photonic_sigmoid", vec![Range::new(0.0, 1.0).unwrap()], None) {
        let activations = network.layers.iter().filter(|l| matches!(l, isonn::model::Layer::Activation(isonn::activation::Activation::PhotonicSigmoid))).count();
        assert_eq!(activations, 2);
    }
}

#[test]
fn padded_cnn_with_photonic_sinusoidal() {
    for network in check_fixture("cnn_padded_photonic_sinusoidal", vec![Range::new(0.0, 1.0).unwrap()], Some("Softmax")) {
        let activations = network.layers.iter().filter(|l| matches!(l, isonn::model::Layer::Activation(isonn::activation::Activation::PhotonicSinusoidal))).count();
        assert_eq!(activations, 2);
    }
}

#[test]
fn resnet_with_batch_norm() {
    for network in check_fixture("resnet_batchnorm_relu6", standardised(), None) {
        let residuals = network.layers.iter().filter(|l| matches!(l, isonn::model::Layer::Residual(_))).count();
        assert_eq!(residuals, 2);
    }
}

#[test]
fn normalised_inputs_with_tanh() {
    check_fixture("normalised_inputs_tanh", standardised(), Some("LogSoftmax"));
}

fn activations(network: &Network) -> Vec<Activation> {
    network
        .layers
        .iter()
        .filter_map(|l| match l {
            Layer::Activation(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

/// nn.GELU from the TorchScript exporter (an Erf chain) and the dynamo
/// exporter (one Gelu node, opset 20), and GELU-N as torch.clamp after it.
/// `import --calibrate` bounds the plain GELU at its largest output on the
/// fixture inputs, so on them the bounded network still computes
/// PyTorch's logits and then transforms.
#[test]
fn cnn_with_gelu_from_both_exporters() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = fixture("cnn_gelu.inputs.npy");
    let x = load_npy(&inputs);
    let expected = load_npy(&fixture("cnn_gelu.outputs.npy"));
    for extension in EXPORTERS {
        let name = format!("cnn_gelu.{extension}");
        let path = fixture(&name);
        let imported = import_model(&read_model(&path).unwrap(), &path, &[Range::new(0.0, 1.0).unwrap()]).unwrap();
        let want = vec![Activation::Gelu, Activation::GeluN { n: 2.0 }];
        assert_eq!(activations(&imported.network), want, "{name}: activations");
        let pytorch = relative(&expected, &imported.network.forward(&x).unwrap());
        assert!(pytorch <= PYTORCH_TOLERANCE, "{name}: isonn and PyTorch logits differ by {pytorch}");

        let out = dir.path().join(extension);
        common::isonn()
            .args(["import", path.to_str().unwrap(), "--out", out.to_str().unwrap(), "--input-range", "0,1"])
            .args(["--calibrate", inputs.to_str().unwrap()])
            .assert()
            .success();
        let (model, _) = isonn::store::load(&out).unwrap();
        let isonn::store::Model::Regular(bounded) = model else { panic!("import wrote a non-negative model") };
        let bounded_activations = activations(&bounded);
        assert!(
            matches!(bounded_activations[..], [Activation::GeluN { .. }, Activation::GeluN { n }] if n == 2.0),
            "{name}: bounded activations {bounded_activations:?}"
        );
        let calibrated = relative(&expected, &bounded.forward(&x).unwrap());
        assert!(calibrated <= PYTORCH_TOLERANCE, "{name}: bounded logits differ from PyTorch's by {calibrated}");
        eprintln!("{name}: PyTorch {pytorch:.2e}, after calibration {calibrated:.2e}");
        check_conversion(&name, &bounded, &x);
    }
}

fn conv_paddings(network: &Network) -> Vec<(usize, Vec<f64>)> {
    network
        .layers
        .iter()
        .filter_map(|l| match l {
            Layer::Conv2d(c) => Some((c.padding, c.pad_value.clone())),
            _ => None,
        })
        .collect()
}

/// nn.ConstantPad2d(1, 0.25) and nn.ZeroPad2d(1) before convolutions and
/// an average pool. The TorchScript exporter computes the pads from
/// constants (ConstantOfShape, Concat, Slice, Transpose); the dynamo
/// exporter writes them as an initializer and folds the last one into the
/// Conv itself.
#[test]
fn pad_nodes_fold_into_layers() {
    for network in check_fixture("cnn_pad_nodes", vec![Range::new(0.0, 1.0).unwrap()], None) {
        assert_eq!(conv_paddings(&network), vec![(1, vec![0.25]), (1, vec![])]);
        let pools: Vec<usize> = network
            .layers
            .iter()
            .filter_map(|l| match l {
                Layer::AvgPool2d(p) => Some(p.padding),
                _ => None,
            })
            .collect();
        assert_eq!(pools, vec![1]);
    }
}

#[test]
fn convert_command_verifies_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cnn-nonneg.onnx");
    let model = fixture("cnn_padded_photonic_sinusoidal.onnx");
    let inputs = fixture("cnn_padded_photonic_sinusoidal.inputs.npy");
    for extra in [vec![], vec!["--inputs", inputs.to_str().unwrap()]] {
        let mut args = vec!["convert", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--input-range", "0,1"];
        args.extend(extra.iter().copied());
        let run = common::isonn().args(&args).assert().success();
        let stdout = String::from_utf8_lossy(&run.get_output().stdout).to_string();
        assert!(stdout.contains("argmax_agreement   1.000000"), "{stdout}");
        assert!(stdout.contains("verification passed"), "{stdout}");
        let graph = read_model(&out).unwrap().graph.unwrap();
        assert!(graph.node.iter().any(|n| n.name.as_deref() == Some("input/modulator")));
    }
    // Inputs of the wrong shape name the file and the expected layout.
    let wrong = fixture("resnet_batchnorm_relu6.inputs.npy");
    let run = common::isonn()
        .args(["convert", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--input-range", "0,1"])
        .args(["--inputs", wrong.to_str().unwrap()])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&run.get_output().stderr).to_string();
    assert!(stderr.contains("resnet_batchnorm_relu6.inputs.npy"), "{stderr}");
    assert!(stderr.contains("[n, 1, 8, 8]"), "{stderr}");
}

#[test]
fn predict_command_matches_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("mlp_photonic_sigmoid.onnx");
    let imported = import_model(&read_model(&path).unwrap(), &path, &[Range::new(0.0, 1.0).unwrap()]).unwrap();

    let regular_dir = dir.path().join("regular");
    isonn::store::save(&regular_dir, &isonn::store::Model::Regular(imported.network.clone()), &serde_json::json!({})).unwrap();
    let nonneg = transform(&imported.network, &TransformOptions::default()).unwrap();
    let nonneg_dir = dir.path().join("nonneg");
    isonn::store::save(&nonneg_dir, &isonn::store::Model::Nonneg(nonneg), &serde_json::json!({})).unwrap();
    let expected = load_npy(&fixture("mlp_photonic_sigmoid.outputs.npy"));
    let inputs = fixture("mlp_photonic_sigmoid.inputs.npy");
    for (model_dir, tolerance) in [(&regular_dir, PYTORCH_TOLERANCE), (&nonneg_dir, EQUIVALENCE_TOLERANCE)] {
        let out = dir.path().join("logits.npy");
        common::isonn()
            .args(["predict", model_dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .assert()
            .success();
        let diff = relative(&expected, &load_npy(&out));
        assert!(diff <= tolerance, "{}: predicted logits differ from PyTorch's by {diff}", model_dir.display());
    }
}
