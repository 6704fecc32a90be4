//! The 1-D convolution layer: forward pass and gradients against candle's
//! own `Tensor::conv1d`, exact transformation of random networks that
//! contain it, the model directory round trip and validation on load, and
//! training on the embedded Fashion-MNIST subset.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{channel_inputs as inputs, compare, max_abs, randomise_with_norms as randomise, uniform};
use isonn::activation::Activation;
use isonn::model::{fold_batchnorm, BatchNorm, Conv1d, Layer, Linear, Network, Pool, Range};
use isonn::nonneg::{inverse, transform, TransformOptions};
use isonn::store::{self, Model};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Relative tolerance of the forward pass and gradients against candle,
/// divided by the largest |reference| value (at least 1), for f32.
const KERNEL_TOLERANCE_F32: f64 = 1e-5;
/// The same for f64.
const KERNEL_TOLERANCE_F64: f64 = 1e-12;
/// Relative tolerance on logits of the non-negative network, f32. Folding
/// batch normalisation rounds the folded weights to f32 once more.
const LOGIT_TOLERANCE_F32: f64 = 1e-4;
/// The same for f64.
const LOGIT_TOLERANCE_F64: f64 = 1e-9;

/// Returns `|a - b|` over the largest `|b|` (at least 1).
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    max_abs(&a.sub(&b).unwrap()) / max_abs(&b).max(1.0)
}

/// Settings of one random convolution and its input.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    channels: usize,
    out: usize,
    rows: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1usize..4, 1usize..4, 1usize..4, 1usize..3, 1usize..12, 1usize..5, 1usize..3, 0usize..3, 1usize..3, 1usize..3)
        .prop_map(|(batch, c, o, rows, width, kernel, stride, padding, dilation, groups)| {
            let width = width.max(dilation * (kernel - 1) + 1); // the kernel fits unpadded
            Case {
                batch,
                channels: c * groups,
                out: o * groups,
                rows,
                width,
                kernel,
                stride,
                padding,
                dilation,
                groups,
            }
        })
}

/// Runs candle's `conv1d` on each row of `x` `[b, c, h, w]` as a
/// `[b * h, c, w]` batch, adds the bias and returns `[b, out, h, w']`.
fn reference(case: &Case, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
    let (b, c, h, w) = x.dims4().unwrap();
    let rows = x.transpose(1, 2).unwrap().contiguous().unwrap().reshape((b * h, c, w)).unwrap();
    // NOTE: candle 0.11.1's conv1d returns wrong input gradients for a
    // batch of more than one signal (for x [2, 1, 2], a [2, 1, 1] kernel
    // and batch 1's read-out all ones, it gives 205 where the exact
    // gradient is 7), so each signal runs as a batch of one.
    let signals: Vec<Tensor> = (0..b * h)
        .map(|i| {
            let signal = rows.narrow(0, i, 1).unwrap();
            signal.conv1d(weight, case.padding, case.stride, case.dilation, case.groups).unwrap()
        })
        .collect();
    let y = Tensor::cat(&signals, 0).unwrap();
    let y = y.broadcast_add(&bias.reshape((1, case.out, 1)).unwrap()).unwrap();
    let out_width = y.dims()[2];
    y.reshape((b, h, case.out, out_width)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
}

/// Checks values and gradients of `Layer::Conv1d` against candle's conv1d.
fn check_against_candle(case: Case, seed: u64, dtype: DType, tolerance: f64) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = Var::from_tensor(&uniform(&mut rng, &[case.batch, case.channels, case.rows, case.width], 1.0, dtype)).unwrap();
    let weight = Var::from_tensor(&uniform(&mut rng, &[case.out, case.channels / case.groups, case.kernel], 1.0, dtype)).unwrap();
    let bias = Var::from_tensor(&uniform(&mut rng, &[case.out], 1.0, dtype)).unwrap();
    let layer = Layer::Conv1d(Conv1d {
        weight: weight.as_tensor().clone(),
        bias: bias.as_tensor().clone(),
        stride: case.stride,
        padding: case.padding,
        dilation: case.dilation,
        groups: case.groups,
        pad_value: Vec::new(),
    });
    let shape = layer.output_shape(&[case.channels, case.rows, case.width]).unwrap();
    let ours = layer.forward(x.as_tensor()).unwrap();
    let theirs = reference(&case, x.as_tensor(), weight.as_tensor(), bias.as_tensor());
    prop_assert_eq!(ours.dims(), theirs.dims());
    prop_assert_eq!(&ours.dims()[1..], &shape[..]);
    let forward = relative(&ours, &theirs);
    prop_assert!(forward < tolerance, "forward differs by {:e} for {:?}", forward, case);

    // A random linear read-out makes every output position matter.
    let readout = uniform(&mut rng, theirs.dims(), 1.0, dtype);
    let ours_grad = ours.mul(&readout).unwrap().sum_all().unwrap().backward().unwrap();
    let theirs_grad = theirs.mul(&readout).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("input", &x), ("weight", &weight), ("bias", &bias)] {
        let a = ours_grad.get(var.as_tensor()).unwrap();
        let b = theirs_grad.get(var.as_tensor()).unwrap();
        let diff = relative(a, b);
        prop_assert!(diff < tolerance, "{} gradient differs by {:e} for {:?}", name, diff, case);
    }
    Ok(())
}

/// Draws per-channel input ranges of a normalised signal, each with a
/// negative lower bound, and returns them with their enclosing range.
fn normalised_ranges(rng: &mut StdRng, channels: usize) -> (Vec<Range>, Range) {
    let ranges: Vec<Range> = (0..channels)
        .map(|_| {
            let mean = rng.gen_range(0.2..0.7);
            let std = rng.gen_range(0.15..0.4);
            Range {
                lo: -mean / std,
                hi: (1.0 - mean) / std,
            }
        })
        .collect();
    let enclosing = Range {
        lo: ranges.iter().map(|r| r.lo).fold(f64::INFINITY, f64::min),
        hi: ranges.iter().map(|r| r.hi).fold(f64::NEG_INFINITY, f64::max),
    };
    (ranges, enclosing)
}

/// Builds a random network of one or two padded, strided, dilated and
/// grouped 1-D convolutions with optional batch normalisation before or
/// after them, a bounded activation, pooling, and a linear classifier, on a
/// per-channel normalised `[c, rows, length]` input.
fn random_network(seed: u64, dtype: DType) -> Network {
    let mut rng = StdRng::seed_from_u64(seed);
    let act = [Activation::PhotonicSigmoid, Activation::Tanh, Activation::ReluN { n: 2.0 }][rng.gen_range(0..3)].clone();
    let mut channels = 2 * rng.gen_range(1..3);
    let rows = rng.gen_range(1..3);
    let mut width = rng.gen_range(6..14);
    let input_shape = vec![channels, rows, width];
    let (channel_ranges, enclosing) = normalised_ranges(&mut rng, channels);
    let mut layers = Vec::new();
    for depth in 0..rng.gen_range(1..3) {
        let groups = if channels % 2 == 0 { rng.gen_range(1..3) } else { 1 };
        let out = groups * rng.gen_range(1..4);
        let kernel = rng.gen_range(1..4);
        let padding = rng.gen_range(0..3);
        let dilation = rng.gen_range(1..3);
        let stride = rng.gen_range(1..3);
        let extent = dilation * (kernel - 1) + 1;
        if width + 2 * padding < extent {
            continue;
        }
        if depth > 0 && rng.gen_bool(0.5) {
            // Normalisation before a padded convolution: the folded layer
            // pads with -beta / g.
            layers.push(Layer::BatchNorm(BatchNorm::new(channels).unwrap()));
        }
        layers.push(Layer::Conv1d(Conv1d::zeros(channels, out, kernel, stride, padding, dilation, groups).unwrap()));
        width = (width + 2 * padding - extent) / stride + 1;
        channels = out;
        if rng.gen_bool(0.3) {
            layers.push(Layer::BatchNorm(BatchNorm::new(channels).unwrap()));
        }
        layers.push(Layer::Activation(act.clone()));
    }
    if rows >= 2 && width >= 2 {
        let pool = Pool::new(2, rng.gen_range(1..3));
        layers.push(if rng.gen_bool(0.5) { Layer::MaxPool2d(pool) } else { Layer::AvgPool2d(pool) });
    } else if width >= 2 {
        layers.push(Layer::AdaptiveAvgPool2d([rows, width / 2]));
    }
    layers.push(Layer::Flatten);
    let flat: usize = isonn::model::chain_shape(&layers, &input_shape).unwrap().iter().product();
    let hidden = rng.gen_range(2..7);
    layers.extend([
        Layer::Linear(Linear::zeros(flat, hidden).unwrap()),
        Layer::Activation(act),
        Layer::Linear(Linear::zeros(hidden, 3).unwrap()),
    ]);
    let mut network = Network::new(&input_shape, enclosing, layers);
    network.channel_ranges = channel_ranges;
    network.output_shape().expect("the generator keeps shapes consistent");
    randomise(&mut network, &mut rng, dtype);
    network
}

/// Returns the largest relative difference between the affine parameters
/// of two networks with the same layers.
fn parameter_difference(a: &Network, b: &Network) -> f64 {
    let (a, b) = (a.parameters(), b.parameters());
    assert_eq!(a.len(), b.len(), "the networks have different parameters");
    a.iter()
        .zip(&b)
        .map(|((name_a, x), (name_b, y))| {
            assert_eq!(name_a, name_b);
            relative(x, y)
        })
        .fold(0.0, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn conv1d_matches_candle_f32(case in case_strategy(), seed in any::<u64>()) {
        check_against_candle(case, seed, DType::F32, KERNEL_TOLERANCE_F32)?;
    }

    #[test]
    fn conv1d_matches_candle_f64(case in case_strategy(), seed in any::<u64>()) {
        check_against_candle(case, seed, DType::F64, KERNEL_TOLERANCE_F64)?;
    }

    #[test]
    fn conv1d_network_transforms_exactly(seed in any::<u64>(), f64 in any::<bool>()) {
        let (dtype, tolerance) = if f64 { (DType::F64, LOGIT_TOLERANCE_F64) } else { (DType::F32, LOGIT_TOLERANCE_F32) };
        let network = random_network(seed, dtype);
        let nonneg = transform(&network, &TransformOptions::default()).unwrap();
        let (weights, biases) = nonneg.count_negative().unwrap();
        prop_assert_eq!(weights, 0, "negative weights");
        prop_assert_eq!(biases, 0, "negative biases");
        let x = inputs(&network, seed, 4, dtype);
        let (rel, min_signal) = compare(&network, &nonneg, &x);
        prop_assert!(rel < tolerance, "relative logit difference {:e}", rel);
        prop_assert!(min_signal >= 0.0, "physical signal {}", min_signal);
        if f64 {
            let back = inverse(&nonneg).unwrap();
            let folded = fold_batchnorm(&network).unwrap();
            let diff = parameter_difference(&back, &folded);
            prop_assert!(diff < 1e-12, "inverse map differs by {:e}", diff);
        }
    }
}

/// Conv1d networks export as 2-D `Conv` nodes with `[1, k]` kernels, padded
/// along the width only; ONNX Runtime computes isonn's logits for the
/// regular and the non-negative export.
#[test]
fn conv1d_networks_match_onnx_runtime() {
    if !common::ort::available("conv1d_networks_match_onnx_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for seed in 0..16 {
        let network = random_network(seed, DType::F32);
        // An adaptive pool with windows of different sizes has no ONNX
        // operator; the generator makes some.
        if let Err(e) = isonn::interop::export_network(&network) {
            assert!(e.to_string().contains("adaptive average pooling"), "conv1d {seed}: {e}");
            continue;
        }
        checked += 1;
        let x = inputs(&network, seed, 6, DType::F32);
        let (regular, nonneg) = common::ort::check_both(dir.path(), &format!("conv1d{seed}"), &network, &x);
        assert!(regular <= common::ort::TOLERANCE, "conv1d {seed}: regular export differs by {regular}");
        assert!(nonneg <= common::ort::TOLERANCE, "conv1d {seed}: non-negative export differs by {nonneg}");
    }
    assert!(checked >= 8, "only {checked} of 16 random networks were exportable");
}

#[test]
fn conv1d_pads_rows_only() {
    // One row of 3 samples, kernel [1, 1, 1], padding 1: sums of 2, 3, 2.
    let mut layer = Conv1d::zeros(1, 1, 3, 1, 1, 1, 1).unwrap();
    layer.weight = Tensor::ones((1, 1, 3), DType::F64, &Device::Cpu).unwrap();
    layer.bias = Tensor::zeros(1, DType::F64, &Device::Cpu).unwrap();
    let x = Tensor::new(&[1.0f64, 2.0, 3.0, 10.0, 20.0, 30.0], &Device::Cpu).unwrap().reshape((1, 1, 2, 3)).unwrap();
    let y: Vec<f64> = Layer::Conv1d(layer).forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(y, vec![3.0, 6.0, 5.0, 30.0, 60.0, 50.0]);
}

#[test]
fn conv1d_output_shape_rejects_bad_settings() {
    let fits = Conv1d::zeros(4, 6, 3, 2, 1, 2, 2).unwrap();
    assert_eq!(fits.output_shape(&[4, 1, 9]).unwrap(), vec![6, 1, 4]);
    let message = fits.output_shape(&[4, 1, 2]).unwrap_err();
    assert!(message.contains("spans 5 samples"), "{message}");
    let message = fits.output_shape(&[3, 1, 9]).unwrap_err();
    assert!(message.contains("does not fit 3 input channels"), "{message}");
    let mut zero_stride = fits.clone();
    zero_stride.stride = 0;
    let message = zero_stride.output_shape(&[4, 1, 9]).unwrap_err();
    assert!(message.contains("stride 0"), "{message}");
}

#[test]
fn conv1d_models_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..4 {
        let network = random_network(seed, DType::F32);
        let nonneg = transform(&network, &TransformOptions::default()).unwrap();
        let x = inputs(&network, seed, 3, DType::F32);
        for (name, model) in [("regular", Model::Regular(network.clone())), ("nonneg", Model::Nonneg(nonneg))] {
            let path = dir.path().join(format!("{name}-{seed}"));
            store::save(&path, &model, &serde_json::Value::Null).unwrap();
            let (loaded, _) = store::load(&path).unwrap();
            assert_eq!(loaded.kind(), model.kind());
            let diff = max_abs(&loaded.forward(&x).unwrap().sub(&model.forward(&x).unwrap()).unwrap());
            assert_eq!(diff, 0.0, "{name} model {seed} changed on the round trip");
            let json = std::fs::read_to_string(path.join("model.json")).unwrap();
            let tag = if name == "regular" { "\"conv1d\"" } else { "\"nonneg-conv1d\"" };
            assert!(json.contains(tag), "{name} model.json has no {tag} layer");
        }
    }
}

/// Saves a one-conv1d model, applies `edit` to the conv1d entry of its
/// model.json and returns the error message of loading it.
fn load_edited(edit: impl Fn(&mut serde_json::Value)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let layers = vec![
        Layer::Conv1d(Conv1d::zeros(2, 4, 3, 1, 1, 1, 2).unwrap()),
        Layer::Flatten,
        Layer::Linear(Linear::zeros(4 * 8, 2).unwrap()),
    ];
    let network = Network::new(&[2, 1, 8], Range { lo: 0.0, hi: 1.0 }, layers);
    store::save(dir.path(), &Model::Regular(network), &serde_json::Value::Null).unwrap();
    let json_path = dir.path().join("model.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["layers"][0]["type"], "conv1d");
    edit(&mut json["layers"][0]);
    std::fs::write(&json_path, serde_json::to_string(&json).unwrap()).unwrap();
    match store::load(dir.path()) {
        Ok(_) => panic!("the edited model loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_conv1d_json_rejected() {
    // A 12-tap kernel does not match the stored 3-tap tensor (a kernel too
    // long for the rows with a matching tensor is the next test).
    let message = load_edited(|layer| layer["kernel"] = serde_json::json!(12));
    assert!(message.contains("layers.0.weight"), "{message}");
    let message = load_edited(|layer| layer["stride"] = serde_json::json!(0));
    assert!(message.contains("layer layers.0 (conv1d)"), "{message}");
    assert!(message.contains("stride 0"), "{message}");
    let message = load_edited(|layer| layer["groups"] = serde_json::json!(3));
    assert!(message.contains("layer layers.0 (conv1d)"), "{message}");
    assert!(message.contains("groups 3"), "{message}");
}

#[test]
fn oversized_conv1d_kernel_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // A 9-tap kernel on rows of 8 samples without padding.
    let layers = vec![
        Layer::Conv1d(Conv1d::zeros(1, 1, 9, 1, 0, 1, 1).unwrap()),
        Layer::Flatten,
        Layer::Linear(Linear::zeros(1, 2).unwrap()),
    ];
    let network = Network::new(&[1, 1, 8], Range { lo: 0.0, hi: 1.0 }, layers);
    store::save(dir.path(), &Model::Regular(network), &serde_json::Value::Null).unwrap();
    let message = store::load(dir.path()).err().expect("the model loaded").to_string();
    assert!(message.contains("layer 0 (conv1d)"), "{message}");
    assert!(message.contains("spans 9 samples"), "{message}");
}

#[test]
fn trained_conv1d_transforms_exactly() {
    use isonn::progress::Progress;
    use isonn::train::{fit, Sgd, TrainConfig};
    let full = isonn::data::load_embedded().unwrap();
    let data = isonn::data::Dataset {
        train: full.train.take(512),
        test: full.test.take(200),
        ..full
    };
    // Each image row of 28 pixels is a 1-D signal: conv1d over the rows,
    // pooling, then a linear classifier.
    let act = Layer::Activation(Activation::PhotonicSigmoid);
    let layers = vec![
        Layer::Conv1d(Conv1d::zeros(1, 4, 5, 2, 2, 1, 1).unwrap()),
        act.clone(),
        Layer::Conv1d(Conv1d::zeros(4, 4, 3, 1, 1, 1, 2).unwrap()),
        act,
        Layer::MaxPool2d(Pool::new(2, 2)),
        Layer::Flatten,
        Layer::Linear(Linear::zeros(4 * 14 * 7, 10).unwrap()),
    ];
    let mut network = Network::new(&[1, 28, 28], Range { lo: 0.0, hi: 1.0 }, layers);
    let mut rng = StdRng::seed_from_u64(3);
    randomise(&mut network, &mut rng, DType::F32);
    let config = TrainConfig {
        epochs: 1,
        batch_size: 64,
        seed: 1,
        eval_every_epoch: false,
        shuffle: true,
        augment: false,
    };
    let before: Vec<f32> = network.parameters()[0].1.flatten_all().unwrap().to_vec1().unwrap();
    let vars = network.make_trainable().unwrap();
    let mut sgd = Sgd::new(0.05, 0.9, 0.0).unwrap();
    let shape = network.input_shape.clone();
    let forward = |x: &Tensor, mode| network.forward_mode(x, mode);
    fit(&forward, &shape, &vars, &mut sgd, &data, &config, &Progress::hidden(), &mut || Ok(())).unwrap();
    let network = network.detached();
    let after: Vec<f32> = network.parameters()[0].1.flatten_all().unwrap().to_vec1().unwrap();
    assert_ne!(before, after, "training left the first conv1d kernel unchanged");

    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    let report =
        isonn::verify::verify(&network, &nonneg, &data.test, 100, isonn::verify::Precision::F64, &Progress::hidden()).unwrap();
    assert_eq!(report.argmax_agreement, 1.0);
    assert_eq!(report.negative_weights + report.negative_biases, 0);
    assert!(report.min_signal >= 0.0, "physical signal {}", report.min_signal);
    // The model is f32, so its biases c + s are rounded to f32.
    assert!(report.max_rel_diff < 1e-4, "relative logit difference {:e}", report.max_rel_diff);
}


#[test]
fn conv1d_cost_and_report() {
    // Conv1d 2 -> 4, k3, stride 2, padding 1, groups 2 on [2, 3, 9]: output
    // [4, 3, 5], so 15 cycles of 2 * 3 inputs.
    let layers = vec![
        Layer::Conv1d(Conv1d::zeros(2, 4, 3, 2, 1, 1, 2).unwrap()),
        Layer::Activation(Activation::PhotonicSigmoid),
        Layer::Flatten,
        Layer::Linear(Linear::zeros(4 * 3 * 5, 2).unwrap()),
    ];
    let mut network = Network::new(&[2, 3, 9], Range { lo: 0.0, hi: 1.0 }, layers);
    randomise(&mut network, &mut StdRng::seed_from_u64(5), DType::F32);
    let table = isonn::hardware::cost_table(&network, None).unwrap();
    assert_eq!(table.rows[0].kind, "conv1d");
    assert_eq!(table.rows[0].inputs, 6);
    assert_eq!(table.rows[0].outputs, 4);
    assert_eq!(table.rows[0].cycles, 15);

    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    let report = isonn::inspect::report(&nonneg, None).unwrap();
    let first = &report.layers[0];
    assert_eq!(first.kind, "conv1d");
    assert_eq!(first.shape, vec![4, 1, 3]);
    let conv = first.conv.expect("a conv1d layer reports its settings");
    assert_eq!((conv.stride, conv.padding, conv.dilation, conv.groups), (2, 1, 1, 2));
}
