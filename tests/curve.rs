//! A measured transfer curve as an activation: interpolation, gradient,
//! exact transformation, model files, CSV checks and the command line.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use isonn::activation::Activation;
use isonn::curve::TransferCurve;
use isonn::model::{Layer, Linear, Network, Range};
use isonn::nonneg::{transform, ActivationRange, NonnegNetwork, TransformOptions};
use isonn::store::{self, Model};
use predicates::prelude::*;

const FIXTURE: &str = "tests/fixtures/transfer-curve.csv";

fn curve(text: &str) -> Activation {
    Activation::Curve(TransferCurve::parse_csv(text, "test").unwrap())
}

/// Returns the outputs and input gradients of `sum(f(x))` in `dtype`.
fn values_and_slopes(activation: &Activation, xs: &[f64], dtype: DType) -> (Vec<f64>, Vec<f64>) {
    let x = Tensor::new(xs, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let y = activation.forward(var.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let to_f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    (to_f64(&y), to_f64(grads.get(var.as_tensor()).unwrap()))
}

#[test]
fn curve_interpolates_hand_values() {
    // Points (0, 0), (1, 2), (3, 3), given out of order with a header.
    let rising = curve("x,y\n1,2\n0,0\n3,3\n");
    // (x, f(x), right-hand slope)
    let cases = [
        (-1.0, 0.0, 0.0),
        (0.0, 0.0, 2.0),
        (0.25, 0.5, 2.0),
        (1.0, 2.0, 0.5),
        (2.0, 2.5, 0.5),
        (2.9, 2.95, 0.5),
        (3.0, 3.0, 0.0),
        (7.0, 3.0, 0.0),
    ];
    let xs: Vec<f64> = cases.iter().map(|c| c.0).collect();
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::F64, 1e-12)] {
        let (ys, slopes) = values_and_slopes(&rising, &xs, dtype);
        for (i, &(x, y, slope)) in cases.iter().enumerate() {
            assert!((ys[i] - y).abs() <= tolerance, "{dtype:?} f({x}) = {} not {y}", ys[i]);
            assert!(
                (slopes[i] - slope).abs() <= tolerance,
                "{dtype:?} f'({x}) = {} not {slope}",
                slopes[i]
            );
            assert!((rising.eval(x) - y).abs() <= 1e-12, "eval({x})");
        }
    }
    assert_eq!(rising.output_bounds(), Some((0.0, 3.0)));

    // A falling curve: (0, 1), (2, 0).
    let falling = curve("0,1\n2,0\n");
    let (ys, slopes) = values_and_slopes(&falling, &[-1.0, 0.5, 3.0], DType::F64);
    assert_eq!(ys, vec![1.0, 0.75, 0.0]);
    assert_eq!(slopes, vec![0.0, -0.5, 0.0]);
    assert_eq!(falling.output_bounds(), Some((0.0, 1.0)));
}

/// Inputs across and beyond the fixture's range that keep away from its
/// measured inputs, where the curve has a kink.
fn off_knot_inputs(curve: &TransferCurve) -> Vec<f64> {
    let knots = &curve.points().inputs;
    (0..300)
        .map(|i| -0.8 + i as f64 * 0.0071 + 0.0003)
        .filter(|x| knots.iter().all(|k| (x - k).abs() > 1e-3))
        .collect()
}

#[test]
fn curve_gradient_matches_finite_differences() {
    let loaded = TransferCurve::from_csv(Path::new(FIXTURE)).unwrap();
    let xs = off_knot_inputs(&loaded);
    let activation = Activation::Curve(loaded);
    let h = 1e-5;
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F64, 1e-9)] {
        let (_, slopes) = values_and_slopes(&activation, &xs, dtype);
        for (x, slope) in xs.iter().zip(slopes) {
            let numeric = (activation.eval(x + h) - activation.eval(x - h)) / (2.0 * h);
            assert!(
                (slope - numeric).abs() <= tolerance * (1.0 + numeric.abs()),
                "{dtype:?} at {x}: autograd {slope} vs finite difference {numeric}"
            );
        }
    }
}

/// The generic form (one clamp per segment, for devices without the fused
/// node) computes the same values and gradients away from the kinks.
#[test]
fn curve_generic_form_matches_fused() {
    let loaded = TransferCurve::from_csv(Path::new(FIXTURE)).unwrap();
    let xs = off_knot_inputs(&loaded);
    for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::F64, 1e-12)] {
        let x = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let fused = Activation::Curve(loaded.clone()).forward(x.as_tensor()).unwrap();
        let generic = loaded.forward_generic(x.as_tensor()).unwrap();
        let fused_grad = fused.sum_all().unwrap().backward().unwrap();
        let generic_grad = generic.sum_all().unwrap().backward().unwrap();
        let values = max_abs(&fused.sub(&generic).unwrap());
        assert!(values <= tolerance, "{dtype:?}: values differ by {values:e}");
        let a = fused_grad.get(x.as_tensor()).unwrap();
        let b = generic_grad.get(x.as_tensor()).unwrap();
        let gradients = max_abs(&a.sub(b).unwrap());
        assert!(gradients <= 10.0 * tolerance, "{dtype:?}: gradients differ by {gradients:e}");
    }
}

/// Builds a random 16-12-8-3 MLP with the fixture's curve as activation.
fn curve_mlp(seed: u64, dtype: DType) -> Network {
    use rand::SeedableRng;
    let activation = Activation::Curve(TransferCurve::from_csv(Path::new(FIXTURE)).unwrap());
    let mut network = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, 4, 4],
        input_range: Range { lo: 0.0, hi: 1.0 },
        layers: vec![
            Layer::Flatten,
            Layer::Linear(Linear::zeros(16, 12).unwrap()),
            Layer::Activation(activation.clone()),
            Layer::Linear(Linear::zeros(12, 8).unwrap()),
            Layer::Activation(activation),
            Layer::Linear(Linear::zeros(8, 3).unwrap()),
        ],
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    randomise(&mut network, &mut rng, dtype);
    network
}

#[test]
fn curve_mlp_transforms_exactly() {
    for seed in 0..8 {
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::F64, 1e-9)] {
            for range in [ActivationRange::Method, ActivationRange::Tight] {
                let network = curve_mlp(seed, dtype);
                let options = TransformOptions {
                    activation_range: range,
                    ..Default::default()
                };
                let nonneg = transform(&network, &options).unwrap();
                let (weights, biases) = nonneg.count_negative().unwrap();
                assert_eq!(weights, 0, "seed {seed}: negative weights");
                assert_eq!(biases, 0, "seed {seed}: negative biases");
                let x = random_inputs(seed, &network, 16, dtype);
                let (relative, min_signal) = compare(&network, &nonneg, &x);
                assert!(
                    relative <= tolerance,
                    "seed {seed}, {dtype:?}, {range:?}: logits differ by {relative:e}"
                );
                assert!(min_signal >= 0.0, "seed {seed}: physical signal {min_signal}");
            }
        }
    }
}

#[test]
fn curve_model_dir_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let network = curve_mlp(3, DType::F32);
    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    let x = random_inputs(3, &network, 4, DType::F32);
    let regular_dir = tmp.path().join("regular");
    let nonneg_dir = tmp.path().join("nonneg");
    store::save(&regular_dir, &Model::Regular(network.clone()), &serde_json::json!({})).unwrap();
    store::save(&nonneg_dir, &Model::Nonneg(nonneg.clone()), &serde_json::json!({})).unwrap();

    let Model::Regular(loaded) = store::load(&regular_dir).unwrap().0 else {
        panic!("the regular directory loaded as a non-negative model");
    };
    let (Layer::Activation(before), Layer::Activation(after)) = (&network.layers[2], &loaded.layers[2]) else {
        panic!("layer 2 is no longer an activation");
    };
    assert_eq!(after, before, "activation changed");
    let difference = max_abs(&loaded.forward(&x).unwrap().sub(&network.forward(&x).unwrap()).unwrap());
    assert_eq!(difference, 0.0, "regular logits changed");

    let Model::Nonneg(loaded) = store::load(&nonneg_dir).unwrap().0 else {
        panic!("the non-negative directory loaded as a regular model");
    };
    let loaded: NonnegNetwork = loaded;
    let difference = max_abs(&loaded.forward(&x).unwrap().sub(&nonneg.forward(&x).unwrap()).unwrap());
    assert_eq!(difference, 0.0, "non-negative logits changed");
}

/// Returns the first JSON object whose `name` is `curve`.
fn find_curve(value: &mut serde_json::Value) -> Option<&mut serde_json::Value> {
    if value.get("name").and_then(|n| n.as_str()) == Some("curve") {
        return Some(value);
    }
    match value {
        serde_json::Value::Array(items) => items.iter_mut().find_map(find_curve),
        serde_json::Value::Object(map) => map.values_mut().find_map(find_curve),
        _ => None,
    }
}

#[test]
fn curve_model_file_rejects_bad_points() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("regular");
    store::save(&dir, &Model::Regular(curve_mlp(1, DType::F32)), &serde_json::json!({})).unwrap();
    let json = dir.join("model.json");
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // Raise the second output of the first curve above the third, so that
    // the outputs rise and then fall.
    let points = find_curve(&mut file).expect("the model file stores the curve");
    points["outputs"][1] = serde_json::json!(5.0);
    std::fs::write(&json, serde_json::to_string(&file).unwrap()).unwrap();
    let message = store::load(&dir).unwrap_err().to_string();
    assert!(message.contains("monotone"), "{message}");
}

#[test]
fn curve_csv_rejects_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("one-point", "x,y\n0,1\n", "at least 2 points, found 1"),
        ("empty", "", "at least 2 points, found 0"),
        ("three-columns", "0,0\n1,1,1\n", "line 2: expected 2 comma-separated columns"),
        ("not-a-number", "0,0\n1,abc\n2,3\n", "line 2: `abc` is not a number"),
        ("late-header", "0,0\nx,y\n1,1\n", "line 2: `x` is not a number"),
        ("infinite", "0,0\n1,inf\n", "line 2: input 1 and output inf must both be finite"),
        ("not-a-number-value", "0,0\nNaN,1\n", "line 2: input NaN"),
        ("repeated-input", "0,0\n1,1\n1,2\n", "lines 2 and 3 both have input 1"),
        ("not-monotone", "0,0\n1,1\n2,0.5\n", "rise from line 1 to 2 and fall from line 2 to 3"),
    ];
    for (name, text, expected) in cases {
        let path = tmp.path().join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        let message = TransferCurve::from_csv(&path).unwrap_err().to_string();
        assert!(message.contains(&format!("{name}.csv")), "{name}: no file name in {message}");
        assert!(message.contains(expected), "{name}: {message}");
    }
    let missing = "curve:no-such-curve.csv".parse::<Activation>().unwrap_err().to_string();
    assert!(missing.contains("no-such-curve.csv"), "{missing}");
    let unnamed = "curve:".parse::<Activation>().unwrap_err().to_string();
    assert!(unnamed.contains("name the CSV file"), "{unnamed}");
}

#[test]
fn curve_activation_parses_and_displays() {
    let spec = format!("curve:{FIXTURE}");
    let activation: Activation = spec.parse().unwrap();
    assert_eq!(activation.to_string(), spec);
    assert_eq!(activation.output_bounds(), Some((0.02, 0.99)));
    // Comment lines, the header and the order of rows do not matter.
    let shuffled = "input,output\n1.0,0.99\n-0.5,0.02\n";
    let short = TransferCurve::parse_csv(shuffled, "short").unwrap();
    assert_eq!(short.points().inputs, vec![-0.5, 1.0]);
    assert_eq!(short.points().outputs, vec![0.02, 0.99]);
    let marked = TransferCurve::parse_csv("\u{feff}0,1\r\n2,3\r\n", "marked").unwrap();
    assert_eq!(marked.points().inputs, vec![0.0, 2.0]);
}

/// Train, transform, verify, hardware evaluation and noise-aware training
/// with a curve activation, on the embedded subset.
#[test]
fn curve_cli_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (regular, nonneg, tuned) = (
        tmp.path().join("regular"),
        tmp.path().join("nonneg"),
        tmp.path().join("tuned"),
    );
    let activation = format!("curve:{FIXTURE}");
    train_small(&regular, &activation);
    isonn().arg("transform").arg(&regular).arg("--out").arg(&nonneg).assert().success();
    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset"])
        .assert()
        .success();
    isonn()
        .arg("hardware")
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset", "--test-images", "200"])
        .args(["--weight-bits", "6", "--detector-noise", "0.001", "--seeds", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("200 test images, accuracy"));
    isonn()
        .arg("train-nonneg")
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset", "--epochs", "1", "--weight-bits", "6"])
        .arg("--out")
        .arg(&tuned)
        .assert()
        .success();
    let model = std::fs::read_to_string(tuned.join("model.json")).unwrap();
    assert!(model.contains("\"curve\""), "the tuned model lost its curve");
}
