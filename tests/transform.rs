//! The transformation is exact: the non-negative network computes the same
//! logits as the regular one, from non-negative parameters and signals only.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use isonn::model::{Network, Range};
use isonn::nonneg::{inverse, transform, ActivationRange, NonnegLayer, NonnegNetwork, ShiftPolicy, TransformOptions};
use proptest::prelude::*;

/// Relative tolerance on logits (divided by the largest |logit| of the batch,
/// at least 1) for networks whose parameters are f32. Every f32 rounding in
/// the physical form is relative to the signal sizes, which the shift can
/// make up to a few times larger than the logits.
const TOLERANCE_F32: f64 = 2e-5;
/// The same for f64 parameters.
const TOLERANCE_F64: f64 = 1e-11;

fn check_all_non_negative(nonneg: &NonnegNetwork) {
    let (weights, biases) = nonneg.count_negative().unwrap();
    assert_eq!(weights, 0, "negative weights");
    assert_eq!(biases, 0, "negative biases");
    for (_, a) in nonneg.affine_layers() {
        assert!(a.shift >= 0.0, "shift {}", a.shift);
        assert!(a.alpha.iter().all(|&v| v >= 0.0), "alpha {:?}", a.alpha);
    }
}

/// `P` and `N` never both route one weight.
fn check_disjoint(nonneg: &NonnegNetwork) {
    for (i, a) in nonneg.affine_layers() {
        let both = a.positive.gt(0.0).unwrap().mul(&a.negative.gt(0.0).unwrap()).unwrap();
        let overlap = both.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert_eq!(overlap, 0.0, "layer {i}: P and N overlap");
    }
}

fn options(shift: bool, tight: bool) -> TransformOptions {
    TransformOptions {
        shift: if shift { ShiftPolicy::Published } else { ShiftPolicy::Minimal },
        activation_range: if tight { ActivationRange::Tight } else { ActivationRange::Method },
    }
}

fn range_strategy() -> impl Strategy<Value = Range> {
    prop_oneof![
        Just(Range { lo: 0.0, hi: 1.0 }),
        (-2.0f64..1.0, 0.1f64..3.0).prop_map(|(lo, w)| Range { lo, hi: lo + w }),
    ]
}

fn check_network(network: &Network, dtype: DType, opts: TransformOptions, seed: u64) -> Result<(), TestCaseError> {
    let nonneg = transform(network, &opts).unwrap();
    check_all_non_negative(&nonneg);
    check_disjoint(&nonneg);
    let x = random_inputs(seed, network, 5, dtype);
    let (rel, min_signal) = compare(network, &nonneg, &x);
    let tolerance = if dtype == DType::F64 { TOLERANCE_F64 } else { TOLERANCE_F32 };
    prop_assert!(rel <= tolerance, "relative logit difference {rel:e} above {tolerance:e}");
    prop_assert!(min_signal >= 0.0, "physical signal {min_signal} < 0");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mlp_equivalent_f64(seed in any::<u64>(), range in range_strategy(), published in any::<bool>(), tight in any::<bool>()) {
        let network = random_mlp(seed, DType::F64, range);
        check_network(&network, DType::F64, options(published, tight), seed)?;
    }

    #[test]
    fn mlp_equivalent_f32(seed in any::<u64>(), range in range_strategy(), published in any::<bool>(), tight in any::<bool>()) {
        let network = random_mlp(seed, DType::F32, range);
        check_network(&network, DType::F32, options(published, tight), seed)?;
    }

    #[test]
    fn cnn_equivalent_f64(seed in any::<u64>(), range in range_strategy(), published in any::<bool>(), tight in any::<bool>()) {
        let network = random_cnn(seed, DType::F64, range);
        check_network(&network, DType::F64, options(published, tight), seed)?;
    }

    #[test]
    fn cnn_equivalent_f32(seed in any::<u64>(), range in range_strategy(), published in any::<bool>(), tight in any::<bool>()) {
        let network = random_cnn(seed, DType::F32, range);
        check_network(&network, DType::F32, options(published, tight), seed)?;
    }

    #[test]
    fn inverse_recovers_parameters(seed in any::<u64>(), range in range_strategy(), cnn in any::<bool>()) {
        let network = if cnn { random_cnn(seed, DType::F64, range) } else { random_mlp(seed, DType::F64, range) };
        let back = inverse(&transform(&network, &TransformOptions::default()).unwrap()).unwrap();
        for ((name, a), (_, b)) in network.parameters().iter().zip(back.parameters()) {
            let diff = max_abs(&a.sub(&b).unwrap());
            prop_assert!(diff <= 1e-12 * (1.0 + max_abs(a)), "{name}: inverse differs by {diff:e}");
        }
    }
}

/// A single unit whose corrected bias is positive: the reference code
/// stores `s - |b|` there, which is wrong; isonn stores `c + s`.
#[test]
fn positive_corrected_bias_is_exact() {
    use isonn::activation::Activation;
    use isonn::model::{Layer, Linear};
    let device = candle_core::Device::Cpu;
    // Two units: w = [-1, 2], b = [0.5, -3]; input in [0, 1].
    // c = b + W lo 1 - a N 1 = [0.5 - 1, -3 - 0] = [-0.5, -3] for row 0 = [-1, 0]...
    // Use explicit rows so that unit 0 has c > 0 and unit 1 has c < 0.
    let weight = Tensor::new(&[[0.5f64, 0.25], [-1.0, -0.5]], &device).unwrap();
    let bias = Tensor::new(&[2.0f64, -1.0], &device).unwrap();
    let network = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, 1, 2],
        input_range: Range { lo: 0.0, hi: 1.0 },
        layers: vec![
            Layer::Flatten,
            Layer::Linear(Linear { weight, bias }),
            Layer::Activation(Activation::PhotonicSinusoidal),
            Layer::Linear(Linear {
                weight: Tensor::new(&[[1.0f64, -1.0]], &device).unwrap(),
                bias: Tensor::new(&[0.0f64], &device).unwrap(),
            }),
        ],
    };
    for policy in [ShiftPolicy::Minimal, ShiftPolicy::Published] {
        let nonneg = transform(&network, &TransformOptions { shift: policy, ..Default::default() }).unwrap();
        let NonnegLayer::Affine(first) = &nonneg.layers[1] else { panic!("layer 1 is affine") };
        // c = [2, -1 - 1.5] = [2, -2.5]
        let stored: Vec<f64> = first.bias.to_vec1().unwrap();
        let s = first.shift;
        assert!((stored[0] - (2.0 + s)).abs() < 1e-12, "unit 0 stores {} for c + s = {}", stored[0], 2.0 + s);
        assert!((stored[1] - (-2.5 + s)).abs() < 1e-12, "unit 1 stores {}", stored[1]);
        let x = Tensor::new(&[[[[0.0f64, 0.0]]], [[[1.0, 1.0]]], [[[0.3, 0.9]]]], &device).unwrap();
        let (rel, min_signal) = compare(&network, &nonneg, &x);
        assert!(rel < 1e-14, "{policy:?}: relative difference {rel:e}");
        assert!(min_signal >= 0.0);
    }
}

#[test]
fn shift_policies_follow_their_rules() {
    let c = [-2.0, 0.5, 3.0];
    let minimal = ShiftPolicy::Minimal.shift(&c);
    assert!((minimal - (2.0 + isonn::nonneg::SHIFT_MARGIN * 3.0)).abs() < 1e-12, "{minimal}");
    assert_eq!(ShiftPolicy::Published.shift(&c), 3.0);
    // Every bias positive: the smallest exact shift is 0, plus the margin.
    let positive = [0.5, 1.0];
    assert!((ShiftPolicy::Minimal.shift(&positive) - 0.01).abs() < 1e-12);
    assert!(ShiftPolicy::Minimal.shift(&[0.0, 0.0]) > 0.0, "the margin keeps zero biases trainable");
}

#[test]
fn minimal_shift_keeps_every_bias_positive() {
    let network = random_mlp(11, DType::F64, Range { lo: 0.0, hi: 1.0 });
    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    for (i, a) in nonneg.affine_layers() {
        let smallest = a.bias.min_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(smallest > 0.0, "layer {i}: smallest bias {smallest}");
    }
}

#[test]
fn unbounded_activation_is_rejected() {
    let mut network = random_mlp(3, DType::F32, Range { lo: 0.0, hi: 1.0 });
    for layer in &mut network.layers {
        if let isonn::model::Layer::Activation(a) = layer {
            *a = isonn::activation::Activation::Relu;
        }
    }
    let message = transform(&network, &TransformOptions::default()).unwrap_err().to_string();
    assert!(message.contains("relu"), "{message}");
    assert!(message.contains("unbounded"), "{message}");
    assert!(message.contains("relu-n"), "the message names the fix: {message}");
}

/// Padded convolutions read a range containing 0, so the transformation
/// widens the tight sigmoid range [0.06, 1.005] to [0, 1.005] there.
#[test]
fn padding_widens_range_to_zero() {
    use isonn::activation::Activation;
    use isonn::model::{Conv2d, Layer, Linear};
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut network = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, 6, 6],
        input_range: Range { lo: 0.2, hi: 1.0 },
        layers: vec![
            Layer::Conv2d(Conv2d::zeros(1, 2, 3, 1, 1, 1, 1).unwrap()),
            Layer::Activation(Activation::PhotonicSigmoid),
            Layer::Conv2d(Conv2d::zeros(2, 2, 3, 1, 2, 1, 1).unwrap()),
            Layer::Activation(Activation::PhotonicSigmoid),
            Layer::Flatten,
            Layer::Linear(Linear::zeros(2 * 8 * 8, 3).unwrap()),
        ],
    };
    randomise(&mut network, &mut rng, DType::F64);
    let nonneg = transform(&network, &options(false, true)).unwrap();
    assert_eq!(nonneg.input_range.lo, 0.0, "input range widened to contain 0");
    let NonnegLayer::Activation(a) = &nonneg.layers[1] else { panic!() };
    assert_eq!(a.output_offset, 0.0, "tight range widened before a padded layer");
    let NonnegLayer::Activation(b) = &nonneg.layers[3] else { panic!() };
    assert!((b.output_offset - 0.06).abs() < 1e-12, "no padding after: tight range kept");
    let x = random_inputs(1, &network, 4, DType::F64);
    let (rel, min_signal) = compare(&network, &nonneg, &x);
    assert!(rel < 1e-12, "{rel:e}");
    assert!(min_signal >= 0.0, "{min_signal}");
}
