//! Bounding ReLU networks: the per-channel rescaling is exact, and a bounded
//! network transforms into an equivalent non-negative one.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use isonn::activation::Activation;
use isonn::bound::{
    apply_bounds, bound_network, calibrate, forward_clipped, BoundMode, Granularity, LayerBounds, Statistic,
};
use isonn::model::{Init, Layer, Network, Range};
use isonn::nonneg::{transform, TransformOptions};
use isonn::progress::Progress;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// Replaces every activation of `network` by an unbounded ReLU.
fn with_relu(mut network: Network) -> Network {
    for layer in &mut network.layers {
        if let Layer::Activation(a) = layer {
            *a = Activation::Relu;
        }
    }
    network
}

/// Draws random bounds in [0.2, 2.5] for every ReLU layer: one per channel,
/// or for some layers one for the whole layer.
fn random_bounds(network: &Network, seed: u64) -> Vec<LayerBounds> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xb0b);
    let mut shape = network.input_shape.clone();
    let mut bounds = Vec::new();
    for (i, layer) in network.layers.iter().enumerate() {
        if matches!(layer, Layer::Activation(Activation::Relu)) {
            let channels = if rng.gen_bool(0.2) { 1 } else { shape[0] };
            bounds.push(LayerBounds {
                layer: i,
                path: format!("layers.{i}"),
                bounds: (0..channels).map(|_| rng.gen_range(0.2..2.5)).collect(),
                fallback_channels: vec![],
            });
        }
        shape = layer.output_shape(&shape).unwrap();
    }
    bounds
}

/// Returns `max |a - b| / max(1, max |a|)`.
fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&a.sub(b).unwrap()) / max_abs(a).max(1.0)
}

/// Checks that the rescaled network equals the per-channel-clipped one.
fn check_rescaling(network: &Network, seed: u64, tolerance: f64) -> Result<(), TestCaseError> {
    let bounds = random_bounds(network, seed);
    let (rescaled, rescalings) = apply_bounds(network, &bounds).unwrap();
    let per_channel = bounds.iter().filter(|b| b.is_per_channel()).count();
    prop_assert_eq!(rescalings.len(), per_channel);
    let x = random_inputs(seed, network, 16, network.dtype());
    let clipped = forward_clipped(network, &bounds, &x).unwrap();
    let folded = rescaled.forward(&x).unwrap();
    let difference = relative_difference(&clipped, &folded);
    prop_assert!(difference <= tolerance, "relative difference {:e} above {:e}", difference, tolerance);
    Ok(())
}

fn unit_range() -> Range {
    Range { lo: 0.0, hi: 1.0 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mlp_rescaling_exact_f64(seed in any::<u64>()) {
        check_rescaling(&with_relu(random_mlp(seed, DType::F64, unit_range())), seed, 1e-12)?;
    }

    #[test]
    fn mlp_rescaling_exact_f32(seed in any::<u64>()) {
        check_rescaling(&with_relu(random_mlp(seed, DType::F32, unit_range())), seed, 1e-6)?;
    }

    #[test]
    fn cnn_rescaling_exact_f64(seed in any::<u64>()) {
        check_rescaling(&with_relu(random_cnn(seed, DType::F64, unit_range())), seed, 1e-12)?;
    }

    #[test]
    fn cnn_rescaling_exact_f32(seed in any::<u64>()) {
        check_rescaling(&with_relu(random_cnn(seed, DType::F32, unit_range())), seed, 1e-6)?;
    }
}

/// The random bounds do clip, so the rescaling tests compare two networks
/// that differ from the unbounded one.
#[test]
fn random_bounds_change_outputs() {
    let mut changed = 0;
    for seed in 0..10 {
        let network = with_relu(random_cnn(seed, DType::F64, unit_range()));
        let x = random_inputs(seed, &network, 16, DType::F64);
        let clipped = forward_clipped(&network, &random_bounds(&network, seed), &x).unwrap();
        let unbounded = network.forward(&x).unwrap();
        if relative_difference(&unbounded, &clipped) > 1e-6 {
            changed += 1;
        }
    }
    assert!(changed >= 5, "only {changed} of 10 networks changed under the bounds");
}

/// Bounds every ReLU of `network` on the embedded subset, transforms the
/// bounded network and verifies it against the bounded one.
fn check_bound_then_transform(network: &Network, mode: BoundMode, samples: usize) {
    let data = isonn::data::load_embedded().unwrap();
    let calibration = data.train.take(samples);
    let test = data.test.take(samples);
    let progress = Progress::hidden();
    let bounded = bound_network(network, &mode, &calibration, &test, &progress).unwrap();
    let record = &bounded.record;
    assert_eq!(record.reference, mode.reference());
    assert!((0.0..=1.0).contains(&record.clip_rate_test), "{}", record.clip_rate_test);
    if let BoundMode::Calibrate { statistic: Statistic::Max, .. } = mode {
        assert_eq!(record.clip_rate_calibration, 0.0, "max calibration clips no calibration value");
    }
    let nonneg = transform(&bounded.network, &TransformOptions::default()).unwrap();
    let report = isonn::verify::verify(&bounded.network, &nonneg, &test, 100, Default::default(), &progress).unwrap();
    assert_eq!(report.argmax_agreement, 1.0, "{}", report.summary());
    // f32 models meet 1e-4, f64 ones 1e-9, as `isonn verify` requires.
    let tolerance = if network.dtype() == DType::F64 { 1e-9 } else { 1e-4 };
    assert!(report.passes(tolerance), "{}", report.summary());
    assert!(
        (report.accuracy_original - record.accuracy_bounded).abs() < 1e-12,
        "verify compares with the bounded network"
    );
}

fn calibrated(statistic: Statistic, margin: f64, granularity: Granularity) -> BoundMode {
    BoundMode::Calibrate {
        statistic,
        margin,
        granularity,
    }
}

#[test]
fn bounded_mlp_transforms_exactly() {
    let network = Network::mlp(&[1, 28, 28], &[32, 16], 10, Activation::Relu, Init::Xavier, 1).unwrap();
    for mode in [
        BoundMode::Fixed { n: 0.5 },
        calibrated(Statistic::Max, 0.05, Granularity::Channel),
        calibrated(Statistic::Percentile(99.0), 0.0, Granularity::Layer),
        calibrated(Statistic::Percentile(90.0), 0.0, Granularity::Channel),
    ] {
        check_bound_then_transform(&network, mode, 300);
    }
}

/// In f64, because per-channel folding with bounds that differ by a factor of
/// 100 or more raises the shift, and so the f32 rounding, past 1e-4 (see
/// docs/RELU.md).
#[test]
fn bounded_cnn_transforms_exactly() {
    let network = Network::cnn(&[1, 28, 28], 10, Activation::Relu, Init::Xavier, 2)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    for mode in [
        calibrated(Statistic::Max, 0.0, Granularity::Channel),
        calibrated(Statistic::Percentile(99.9), 0.1, Granularity::Layer),
    ] {
        check_bound_then_transform(&network, mode, 100);
    }
}

/// Per-channel calibration folds the bounds into the weights and keeps the
/// clipped function.
#[test]
fn calibrated_channels_fold_exactly() {
    let network = Network::mlp(&[1, 28, 28], &[12], 10, Activation::Relu, Init::Xavier, 3)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let data = isonn::data::load_embedded().unwrap();
    let images = data.train.take(200);
    let bounds = calibrate(&network, &images, Statistic::Percentile(95.0), 0.0, Granularity::Channel, 64).unwrap();
    assert_eq!(bounds.len(), 1);
    assert_eq!(bounds[0].bounds.len(), 12);
    let (rescaled, _) = apply_bounds(&network, &bounds).unwrap();
    assert!(matches!(rescaled.layers[2], Layer::Activation(Activation::ReluN { n }) if n == 1.0));
    let (x, _) = images.batch(&(0..64).collect::<Vec<_>>(), &candle_core::Device::Cpu).unwrap();
    let x = x.to_dtype(DType::F64).unwrap();
    let clipped = forward_clipped(&network, &bounds, &x).unwrap();
    let difference = relative_difference(&clipped, &rescaled.forward(&x).unwrap());
    assert!(difference <= 1e-12, "{difference:e}");
}

#[test]
fn network_without_relu_is_rejected() {
    let network = Network::mlp(&[1, 28, 28], &[8], 10, Activation::PhotonicSigmoid, Init::Xavier, 0).unwrap();
    let data = isonn::data::load_embedded().unwrap();
    let images = data.test.take(10);
    let progress = Progress::hidden();
    let message = bound_network(&network, &BoundMode::Fixed { n: 2.0 }, &images, &images, &progress)
        .unwrap_err()
        .to_string();
    assert!(message.contains("without relu or gelu layers"), "{message}");
    assert!(message.contains("transform it directly"), "{message}");
}

#[test]
fn bounded_gelu_mlp_transforms_exactly() {
    for dtype in [DType::F32, DType::F64] {
        let network = Network::mlp(&[1, 28, 28], &[32, 16], 10, Activation::Gelu, Init::Xavier, 4)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for mode in [
            BoundMode::Fixed { n: 0.5 },
            calibrated(Statistic::Max, 0.05, Granularity::Layer),
            calibrated(Statistic::Percentile(99.0), 0.0, Granularity::Layer),
        ] {
            check_bound_then_transform(&network, mode, 300);
        }
    }
}

#[test]
fn gelu_layers_become_gelu_n() {
    let network = Network::mlp(&[1, 28, 28], &[12, 8], 10, Activation::Gelu, Init::Xavier, 5).unwrap();
    let data = isonn::data::load_embedded().unwrap();
    let images = data.train.take(200);
    let bounds = calibrate(&network, &images, Statistic::Max, 0.0, Granularity::Layer, 64).unwrap();
    assert_eq!(bounds.len(), 2);
    let (bounded, rescalings) = apply_bounds(&network, &bounds).unwrap();
    assert!(rescalings.is_empty());
    for b in &bounds {
        let n = b.bounds[0];
        assert!(
            matches!(bounded.layers[b.layer], Layer::Activation(Activation::GeluN { n: m }) if m == n),
            "layer {} is {:?}",
            b.layer,
            bounded.layers[b.layer]
        );
    }
}

/// The max of the GELU outputs is the bound, so no calibration value lies
/// above it, while half of it clips some.
#[test]
fn gelu_max_bound_clips_nothing() {
    let network = Network::mlp(&[1, 28, 28], &[16], 10, Activation::Gelu, Init::Xavier, 6).unwrap();
    let data = isonn::data::load_embedded().unwrap();
    let images = data.train.take(100);
    let bounds = calibrate(&network, &images, Statistic::Max, 0.0, Granularity::Layer, 50).unwrap();
    let rates = isonn::bound::clip_rates(&network, &bounds, &images, 50).unwrap();
    assert_eq!(rates.clipped, 0);
    let mut halved = bounds.clone();
    halved[0].bounds[0] /= 2.0;
    let rates = isonn::bound::clip_rates(&network, &halved, &images, 50).unwrap();
    assert!(rates.clipped > 0, "half the max clipped nothing");
    assert_eq!(rates.values, 100 * 16);
}

#[test]
fn gelu_per_channel_is_rejected() {
    let network = Network::mlp(&[1, 28, 28], &[8], 10, Activation::Gelu, Init::Xavier, 0).unwrap();
    let data = isonn::data::load_embedded().unwrap();
    let images = data.train.take(20);
    let message = calibrate(&network, &images, Statistic::Max, 0.0, Granularity::Channel, 10)
        .unwrap_err()
        .to_string();
    assert!(message.contains("gelu"), "{message}");
    assert!(message.contains("--per layer"), "{message}");
}

/// A residual network with ReLU inside its blocks: every ReLU is found, the
/// nested ones by their path, and bounding all of them gives a network that
/// transforms exactly.
#[test]
fn residual_relus_are_bounded() {
    let network = Network::build(isonn::model::Arch::Resnet, &[1, 28, 28], &[4], 10, Activation::Relu, Init::Xavier, 7)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let paths: Vec<String> = isonn::bound::unbounded_sites(&network).into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["layers.2", "layers.3.main.2", "layers.4", "layers.5.main.2", "layers.6"]);
    for mode in [
        BoundMode::Fixed { n: 1.5 },
        calibrated(Statistic::Max, 0.0, Granularity::Layer),
        calibrated(Statistic::Percentile(99.0), 0.05, Granularity::Layer),
    ] {
        check_bound_then_transform(&network, mode, 100);
    }
}

#[test]
fn residual_bounds_replace_nested_layers() {
    let network = Network::build(isonn::model::Arch::Resnet, &[1, 28, 28], &[4], 10, Activation::Relu, Init::Xavier, 8).unwrap();
    let data = isonn::data::load_embedded().unwrap();
    let images = data.train.take(50);
    let bounds = calibrate(&network, &images, Statistic::Max, 0.0, Granularity::Layer, 25).unwrap();
    assert_eq!(bounds.len(), 5);
    let (bounded, _) = apply_bounds(&network, &bounds).unwrap();
    assert!(isonn::bound::unbounded_sites(&bounded).is_empty(), "a ReLU is left");
    let Layer::Residual(block) = &bounded.layers[3] else {
        panic!("layer 3 is {:?}", bounded.layers[3]);
    };
    let nested = bounds.iter().find(|b| b.path == "layers.3.main.2").unwrap();
    assert_eq!(nested.layer, 3);
    assert!(
        matches!(block.main[2], Layer::Activation(Activation::ReluN { n }) if n == nested.bounds[0]),
        "{:?}",
        block.main[2]
    );
    let rates = isonn::bound::clip_rates(&network, &bounds, &images, 25).unwrap();
    assert_eq!(rates.clipped, 0, "max calibration clips no calibration value");
    assert_eq!(rates.layers.len(), 5);
}

#[test]
fn residual_per_channel_is_rejected() {
    let network = Network::build(isonn::model::Arch::Resnet, &[1, 28, 28], &[4], 10, Activation::Relu, Init::Xavier, 9).unwrap();
    let message = isonn::bound::check_per_channel(&network).unwrap_err().to_string();
    assert!(message.contains("layers.") || message.contains("layer 2"), "{message}");
    let bounds = vec![LayerBounds {
        layer: 3,
        path: "layers.3.main.2".into(),
        bounds: vec![1.0; 4],
        fallback_channels: Vec::new(),
    }];
    let message = apply_bounds(&network, &bounds).unwrap_err().to_string();
    assert!(message.contains("layers.3.main.2"), "{message}");
    assert!(message.contains("top-level ReLU"), "{message}");
}

#[test]
fn bound_path_must_name_activation() {
    let network = Network::build(isonn::model::Arch::Resnet, &[1, 28, 28], &[4], 10, Activation::Relu, Init::Xavier, 9).unwrap();
    for path in ["layers.3.main.0", "layers.3.side.2", "layers.99", "layer.2", "layers.3.main"] {
        let bounds = vec![LayerBounds {
            layer: 3,
            path: path.into(),
            bounds: vec![1.0],
            fallback_channels: Vec::new(),
        }];
        let message = apply_bounds(&network, &bounds).unwrap_err().to_string();
        assert!(message.contains(path), "{path}: {message}");
    }
}
