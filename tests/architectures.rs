//! Every supported architecture family transforms exactly: VGG-style
//! networks with padded max pooling, residual networks with batch
//! normalisation and projection shortcuts, Elman networks, and networks
//! with per-channel normalised inputs. The non-negative network computes
//! the regular one's logits from non-negative parameters and signals only.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{channel_inputs as inputs, compare, max_abs, randomise_with_norms as randomise};
use isonn::activation::Activation;
use isonn::model::{fold_batchnorm, BatchNorm, Conv2d, Elman, Layer, Linear, Network, Pool, Range, Residual};
use isonn::nonneg::{inverse, transform, ActivationRange, ShiftPolicy, TransformOptions};
use isonn::store::{self, Model};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Relative tolerance on logits (divided by the largest |logit|, at least
/// 1) for f32 parameters. Folding batch normalisation rounds the folded
/// weights to f32 once more than the regular network does, and a folded
/// scale `gamma / sqrt(var + eps)` of up to about 5 amplifies that rounding,
/// so this is looser than the plain chains' 2e-5.
const TOLERANCE_F32: f64 = 1e-4;
/// The same for f64 parameters.
const TOLERANCE_F64: f64 = 1e-9;

const ACTIVATIONS: [Activation; 5] = [
    Activation::PhotonicSigmoid,
    Activation::PhotonicSinusoidal,
    Activation::ReluN { n: 2.0 },
    Activation::Tanh,
    Activation::GeluN { n: 1.5 },
];

fn conv(i: usize, o: usize, kernel: usize, stride: usize, padding: usize, groups: usize) -> Layer {
    Layer::Conv2d(Conv2d::zeros(i, o, kernel, stride, padding, 1, groups).unwrap())
}

fn bn(c: usize) -> Layer {
    Layer::BatchNorm(BatchNorm::new(c).unwrap())
}

fn linear(i: usize, o: usize) -> Layer {
    Layer::Linear(Linear::zeros(i, o).unwrap())
}

fn finish(shape: &[usize], range: Range, layers: Vec<Layer>, seed: u64, dtype: DType) -> Network {
    let mut network = Network::new(shape, range, layers);
    network.output_shape().unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xa5a5);
    randomise(&mut network, &mut rng, dtype);
    network
}

/// Builds a VGG-style network: padded 3x3 convolutions (one grouped), max pooling
/// with and without padding, zero-padded average pooling, dropout.
fn random_vgg(seed: u64, dtype: DType, range: Range) -> Network {
    let mut rng = StdRng::seed_from_u64(seed);
    let act = Layer::Activation(ACTIVATIONS[rng.gen_range(0..ACTIVATIONS.len())].clone());
    let side = rng.gen_range(6..9);
    let (a, b) = (2 * rng.gen_range(1..3), 2 * rng.gen_range(1..3));
    let groups = if rng.gen_bool(0.5) { 2 } else { 1 };
    let mut layers = vec![conv(1, a, 3, 1, 1, 1), act.clone(), conv(a, a, 3, 1, 1, groups), act.clone()];
    layers.push(Layer::MaxPool2d(Pool::new(2, 2)));
    layers.extend([conv(a, b, 3, 1, 1, 1), act.clone()]);
    let padded = Pool {
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    layers.push(if rng.gen_bool(0.5) { Layer::MaxPool2d(padded) } else { Layer::AvgPool2d(padded) });
    let flat = Network::new(&[1, side, side], range, layers.clone()).output_shape_prefix();
    layers.extend([Layer::Flatten, Layer::Dropout(0.5), linear(flat, 6), act, linear(6, 3)]);
    finish(&[1, side, side], range, layers, seed, dtype)
}

/// Builds a residual network: batch normalisation after convolutions, an
/// identity block, a block with a strided projection shortcut,
/// normalisations before an unpadded and a padded convolution, and global
/// or adaptive average pooling.
fn random_resnet(seed: u64, dtype: DType, range: Range) -> Network {
    let mut rng = StdRng::seed_from_u64(seed);
    let act = Layer::Activation(ACTIVATIONS[rng.gen_range(0..ACTIVATIONS.len())].clone());
    let side = rng.gen_range(5..9);
    let (w, wide) = (rng.gen_range(1..4), rng.gen_range(2..5));
    let mut layers = vec![conv(2, w, 3, 1, 1, 1), bn(w), act.clone()];
    layers.push(Layer::Residual(Residual {
        main: vec![conv(w, w, 3, 1, 1, 1), bn(w), act.clone(), conv(w, w, 3, 1, 1, 1), bn(w)],
        shortcut: Vec::new(),
    }));
    layers.push(act.clone());
    layers.push(Layer::Residual(Residual {
        main: vec![conv(w, wide, 3, 2, 1, 1), bn(wide), act.clone(), conv(wide, wide, 3, 1, 1, 1), bn(wide)],
        shortcut: vec![conv(w, wide, 1, 2, 0, 1), bn(wide)],
    }));
    layers.push(act.clone());
    layers.extend([bn(wide), conv(wide, wide, 1, 1, 0, 1), act.clone()]);
    layers.extend([bn(wide), conv(wide, wide, 3, 1, 1, 1), act.clone()]);
    let classes = 3;
    if rng.gen_bool(0.5) {
        layers.extend([Layer::GlobalAvgPool, linear(wide, classes)]);
    } else {
        layers.extend([Layer::AdaptiveAvgPool2d([2, 2]), Layer::Flatten, linear(4 * wide, classes)]);
    }
    finish(&[2, side, side], range, layers, seed, dtype)
}

/// Builds an Elman network reading `[channels, steps, width]` row by row.
fn random_elman(seed: u64, dtype: DType, range: Range) -> Network {
    let mut rng = StdRng::seed_from_u64(seed);
    let activation = ACTIVATIONS[rng.gen_range(0..ACTIVATIONS.len())].clone();
    let (c, steps, width) = (rng.gen_range(1..3), rng.gen_range(1..7), rng.gen_range(1..5));
    let hidden = rng.gen_range(1..7);
    let layers = vec![
        Layer::Elman(Elman::zeros(c * width, hidden, activation).unwrap()),
        linear(hidden, 4),
    ];
    finish(&[c, steps, width], range, layers, seed, dtype)
}

/// Builds a CNN reading three channels normalised per channel (each range
/// negative below its mean), with a padded first convolution and a
/// batch normalisation before the classifier.
fn random_normalised(seed: u64, dtype: DType) -> Network {
    let mut rng = StdRng::seed_from_u64(seed);
    let act = Layer::Activation(ACTIVATIONS[rng.gen_range(0..ACTIVATIONS.len())].clone());
    let side = rng.gen_range(4..8);
    let channel_ranges: Vec<Range> = (0..3)
        .map(|_| {
            let mean = rng.gen_range(0.3..0.6);
            let std = rng.gen_range(0.15..0.3);
            Range {
                lo: -mean / std,
                hi: (1.0 - mean) / std,
            }
        })
        .collect();
    let enclosing = Range {
        lo: channel_ranges.iter().map(|r| r.lo).fold(f64::INFINITY, f64::min),
        hi: channel_ranges.iter().map(|r| r.hi).fold(f64::NEG_INFINITY, f64::max),
    };
    let padding = rng.gen_range(0..2);
    let mut layers = vec![conv(3, 4, 3, 1, padding, 1), act.clone(), Layer::Flatten];
    let flat = Network::new(&[3, side, side], enclosing, layers.clone()).output_shape_prefix();
    layers.extend([bn(flat), linear(flat, 5), act, linear(5, 3)]);
    let mut network = finish(&[3, side, side], enclosing, layers, seed, dtype);
    network.channel_ranges = channel_ranges;
    network.output_shape().unwrap();
    network
}

/// The shape a chain that does not end in logits produces.
trait ShapePrefix {
    fn output_shape_prefix(&self) -> usize;
}

impl ShapePrefix for Network {
    fn output_shape_prefix(&self) -> usize {
        isonn::model::chain_shape(&self.layers, &self.input_shape).unwrap().iter().product()
    }
}

fn options(published: bool, tight: bool) -> TransformOptions {
    TransformOptions {
        shift: if published { ShiftPolicy::Published } else { ShiftPolicy::Minimal },
        activation_range: if tight { ActivationRange::Tight } else { ActivationRange::Method },
    }
}

fn check(network: &Network, dtype: DType, opts: TransformOptions, seed: u64) -> Result<(), TestCaseError> {
    let nonneg = transform(network, &opts).unwrap();
    let (weights, biases) = nonneg.count_negative().unwrap();
    prop_assert_eq!(weights, 0, "negative weights");
    prop_assert_eq!(biases, 0, "negative biases");
    for (i, prefix, a) in nonneg.affines() {
        prop_assert!(a.shift >= 0.0, "layer {i} {prefix}: shift {}", a.shift);
        prop_assert!(a.alpha.iter().all(|&v| v >= 0.0), "layer {i} {prefix}: alpha {:?}", a.alpha);
        let both = a.positive.gt(0.0).unwrap().mul(&a.negative.gt(0.0).unwrap()).unwrap();
        let overlap = both.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        prop_assert_eq!(overlap, 0.0, "layer {} {}: P and N overlap", i, prefix);
    }
    let x = inputs(network, seed, 4, dtype);
    let (rel, min_signal) = compare(network, &nonneg, &x);
    let tolerance = if dtype == DType::F64 { TOLERANCE_F64 } else { TOLERANCE_F32 };
    prop_assert!(rel <= tolerance, "relative logit difference {rel:e} above {tolerance:e}");
    prop_assert!(min_signal >= 0.0, "physical signal {min_signal} < 0");
    Ok(())
}

/// Checks that the inverse map recovers the folded network's parameters.
fn check_inverse(network: &Network) -> Result<(), TestCaseError> {
    let folded = fold_batchnorm(network).unwrap();
    let back = inverse(&transform(network, &TransformOptions::default()).unwrap()).unwrap();
    let (a, b) = (folded.parameters(), back.parameters());
    prop_assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let diff = max_abs(&x.sub(y).unwrap());
        prop_assert!(diff <= 1e-11 * (1.0 + max_abs(x)), "{name}: inverse differs by {diff:e}");
    }
    Ok(())
}

/// Checks that writing and reading a model keeps its logits, bit for bit.
fn check_store(network: &Network, seed: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let nonneg = transform(network, &TransformOptions::default()).unwrap();
    let x = inputs(network, seed, 2, network.dtype());
    for (name, model) in [("regular", Model::Regular(network.clone())), ("nonneg", Model::Nonneg(nonneg))] {
        let path = dir.path().join(name);
        store::save(&path, &model, &serde_json::Value::Null).unwrap();
        let (loaded, _) = store::load(&path).unwrap();
        let diff = max_abs(&model.forward(&x).unwrap().sub(&loaded.forward(&x).unwrap()).unwrap());
        prop_assert_eq!(diff, 0.0, "{} model changed on a round trip", name);
    }
    Ok(())
}

fn range_strategy() -> impl Strategy<Value = Range> {
    prop_oneof![
        Just(Range { lo: 0.0, hi: 1.0 }),
        (-2.0f64..0.0, 0.1f64..3.0).prop_map(|(lo, w)| Range { lo, hi: lo + w }),
    ]
}

fn dtype_of(f64: bool) -> DType {
    if f64 {
        DType::F64
    } else {
        DType::F32
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn vgg_equivalent(seed in any::<u64>(), range in range_strategy(), f64 in any::<bool>(), published in any::<bool>(), tight in any::<bool>()) {
        let dtype = dtype_of(f64);
        check(&random_vgg(seed, dtype, range), dtype, options(published, tight), seed)?;
    }

    #[test]
    fn resnet_equivalent(seed in any::<u64>(), range in range_strategy(), f64 in any::<bool>(), published in any::<bool>(), tight in any::<bool>()) {
        let dtype = dtype_of(f64);
        check(&random_resnet(seed, dtype, range), dtype, options(published, tight), seed)?;
    }

    #[test]
    fn elman_equivalent(seed in any::<u64>(), range in range_strategy(), f64 in any::<bool>(), published in any::<bool>(), tight in any::<bool>()) {
        let dtype = dtype_of(f64);
        check(&random_elman(seed, dtype, range), dtype, options(published, tight), seed)?;
    }

    #[test]
    fn normalised_inputs_equivalent(seed in any::<u64>(), f64 in any::<bool>(), published in any::<bool>(), tight in any::<bool>()) {
        let dtype = dtype_of(f64);
        check(&random_normalised(seed, dtype), dtype, options(published, tight), seed)?;
    }

    #[test]
    fn inverse_recovers_folded_parameters(seed in any::<u64>(), family in 0..4u8) {
        let range = Range { lo: -0.5, hi: 1.0 };
        let network = match family {
            0 => random_vgg(seed, DType::F64, range),
            1 => random_resnet(seed, DType::F64, range),
            2 => random_elman(seed, DType::F64, range),
            _ => random_normalised(seed, DType::F64),
        };
        check_inverse(&network)?;
    }

    #[test]
    fn store_round_trip(seed in any::<u64>(), family in 0..4u8) {
        let range = Range { lo: 0.0, hi: 1.0 };
        let network = match family {
            0 => random_vgg(seed, DType::F32, range),
            1 => random_resnet(seed, DType::F32, range),
            2 => random_elman(seed, DType::F32, range),
            _ => random_normalised(seed, DType::F32),
        };
        check_store(&network, seed)?;
    }
}

#[test]
fn folding_matches_unfolded_network() {
    let network = random_resnet(3, DType::F64, Range { lo: 0.0, hi: 1.0 });
    let folded = fold_batchnorm(&network).unwrap();
    let mut count = 0;
    folded.visit(&mut |_, layer| count += matches!(layer, Layer::BatchNorm(_)) as usize);
    assert_eq!(count, 0, "a batch normalisation survived folding");
    let x = inputs(&network, 3, 4, DType::F64);
    let diff = max_abs(&network.forward(&x).unwrap().sub(&folded.forward(&x).unwrap()).unwrap());
    assert!(diff < 1e-12, "folded network differs by {diff:e}");
}

#[test]
fn batchnorm_between_pooling_is_rejected() {
    let layers = vec![
        conv(1, 2, 3, 1, 0, 1),
        Layer::Activation(Activation::PhotonicSigmoid),
        bn(2),
        Layer::MaxPool2d(Pool::new(2, 2)),
        Layer::Flatten,
        linear(8, 2),
    ];
    let network = finish(&[1, 6, 6], Range { lo: 0.0, hi: 1.0 }, layers, 1, DType::F64);
    let message = transform(&network, &TransformOptions::default()).unwrap_err().to_string();
    assert!(message.contains("layers.2 (batch-norm)"), "{message}");
    assert!(message.contains("max-pool2d"), "{message}");
}

#[test]
fn batchnorm_before_padded_conv_pads_with_its_preimage() {
    for dtype in [DType::F64, DType::F32] {
        let layers = vec![
            Layer::Activation(Activation::PhotonicSigmoid),
            bn(2),
            conv(2, 3, 3, 1, 1, 1),
            Layer::Activation(Activation::PhotonicSinusoidal),
            Layer::Flatten,
            linear(3 * 25, 2),
        ];
        let network = finish(&[2, 5, 5], Range { lo: -1.0, hi: 1.0 }, layers, 9, dtype);
        let folded = fold_batchnorm(&network).unwrap();
        let Layer::Conv2d(c) = &folded.layers[1] else {
            panic!("the convolution is not the second layer after folding");
        };
        // The pad is the input that the normalisation maps to 0.
        let (scale, offset) = match &network.layers[1] {
            Layer::BatchNorm(bn) => bn.inference_affine().unwrap(),
            _ => unreachable!(),
        };
        for (q, (g, beta)) in c.pad_value.iter().zip(scale.iter().zip(&offset)) {
            assert!((g * q + beta).abs() < 1e-12, "pad {q} maps to {}", g * q + beta);
        }
        let x = inputs(&network, 9, 4, dtype);
        let diff = max_abs(&network.forward(&x).unwrap().sub(&folded.forward(&x).unwrap()).unwrap());
        let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        assert!(diff < tolerance, "folded network differs by {diff:e}");
        check(&network, dtype, TransformOptions::default(), 9).unwrap();
    }
}

#[test]
fn elman_state_range_includes_initial_state() {
    let network = random_elman(5, DType::F64, Range { lo: 0.0, hi: 1.0 });
    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    let isonn::nonneg::NonnegLayer::Elman(cell) = &nonneg.layers[0] else {
        panic!("the first layer is not an Elman cell");
    };
    let bounds = cell.activation.activation.output_bounds().unwrap();
    // The physical state of h_0 = 0 is -lo, and lo <= min(0, min f).
    assert!(cell.initial_state >= 0.0);
    assert!(-cell.initial_state <= bounds.0.min(0.0) + 1e-15);
}

#[test]
fn batchnorm_training_updates_running_stats() {
    let norm = BatchNorm::new(2).unwrap();
    let x = Tensor::new(&[[1.0f32, 3.0], [3.0, 7.0]], &Device::Cpu).unwrap(); // [batch 2, channels 2]
    let y = norm.forward(&x, isonn::model::Mode::Train).unwrap();
    // Batch means 2 and 5, biased variances 1 and 4: y = +-1 per channel.
    let y: Vec<Vec<f32>> = y.to_vec2().unwrap();
    for (got, want) in y.iter().flatten().zip([-1.0f32, -1.0, 1.0, 1.0]) {
        assert!((got - want).abs() < 1e-4, "normalised {got}, expected {want}");
    }
    let (mean, var) = norm.running_stats();
    let mean: Vec<f32> = mean.to_vec1().unwrap();
    let var: Vec<f32> = var.to_vec1().unwrap();
    // momentum 0.1: mean 0.9 * 0 + 0.1 * batch, var 0.9 * 1 + 0.1 * unbiased (2 and 8).
    assert!((mean[0] - 0.2).abs() < 1e-6, "running mean {mean:?}");
    assert!((mean[1] - 0.5).abs() < 1e-6, "running mean {mean:?}");
    assert!((var[0] - 1.1).abs() < 1e-6, "running variance {var:?}");
    assert!((var[1] - 1.7).abs() < 1e-6, "running variance {var:?}");
}

#[test]
fn adaptive_pool_matches_windows() {
    // 5 columns to 2: windows [0, 3) and [2, 5), as PyTorch computes them.
    let x = Tensor::arange(0f64, 5.0, &Device::Cpu).unwrap().reshape((1, 1, 1, 5)).unwrap();
    let y: Vec<f64> = isonn::model::adaptive_average(&x, [1, 2]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(y, vec![1.0, 3.0]);
}

/// Trains `network` for one epoch on a slice of the embedded subset, then
/// checks that its transformation agrees on every test image.
fn train_and_verify(mut network: Network, lr: f64, epochs: usize) -> isonn::verify::EquivalenceReport {
    use isonn::progress::Progress;
    use isonn::train::{fit, Sgd, TrainConfig};
    let full = isonn::data::load_embedded().unwrap();
    let data = isonn::data::Dataset {
        train: full.train.take(1024),
        test: full.test.take(500),
        ..full
    };
    let config = TrainConfig {
        epochs,
        batch_size: 64,
        seed: 1,
        eval_every_epoch: false,
        shuffle: true,
        augment: false,
    };
    let vars = network.make_trainable().unwrap();
    let mut sgd = Sgd::new(lr, 0.9, 0.0).unwrap();
    let shape = network.input_shape.clone();
    let forward = |x: &Tensor, mode| network.forward_mode(x, mode);
    let metrics = fit(&forward, &shape, &vars, &mut sgd, &data, &config, &Progress::hidden(), &mut || Ok(())).unwrap();
    assert!(metrics.test_accuracy > 0.2, "training did not learn: test accuracy {}", metrics.test_accuracy);
    let network = network.detached();
    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    isonn::verify::verify(&network, &nonneg, &data.test, 100, isonn::verify::Precision::F64, &Progress::hidden()).unwrap()
}

#[test]
fn trained_resnet_transforms_exactly() {
    let network =
        Network::build(isonn::model::Arch::Resnet, &[1, 28, 28], &[4], 10, Activation::PhotonicSinusoidal, isonn::model::Init::Photonic, 2)
            .unwrap();
    let report = train_and_verify(network, 0.1, 3);
    assert_eq!(report.argmax_agreement, 1.0);
    assert_eq!(report.negative_weights + report.negative_biases, 0);
    assert!(report.min_signal >= 0.0, "physical signal {}", report.min_signal);
    // The model is stored in f32, so its biases c + s are rounded to f32.
    assert!(report.max_rel_diff < 1e-4, "relative logit difference {:e}", report.max_rel_diff);
}

#[test]
fn trained_elman_transforms_exactly() {
    let network =
        Network::build(isonn::model::Arch::Elman, &[1, 28, 28], &[16], 10, Activation::Tanh, isonn::model::Init::Xavier, 2).unwrap();
    let report = train_and_verify(network, 0.05, 1);
    assert_eq!(report.argmax_agreement, 1.0);
    assert_eq!(report.negative_weights + report.negative_biases, 0);
    assert!(report.min_signal >= 0.0, "physical signal {}", report.min_signal);
    // The model is stored in f32, so its biases c + s are rounded to f32.
    assert!(report.max_rel_diff < 1e-4, "relative logit difference {:e}", report.max_rel_diff);
}
