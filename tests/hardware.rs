//! The hardware model: the device mapping is exact, hardware evaluation with
//! every effect off is the ideal non-negative network, and each effect has
//! the statistics its formula states.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use isonn::hardware::{
    cost_table, quantise, realise, DeviceMapping, Effects, Energies, GainGranularity, NoiseSource, Sweep,
    SweepParameter,
};
use isonn::model::{Layer, Linear, Network, Range};
use isonn::nonneg::{transform, NonnegNetwork, TransformOptions};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Relative tolerance (to the largest |value|, at least 1) of the mapping
/// round trip and of ideal hardware against the non-negative forward in f32:
/// the mapping multiplies by `alpha / g` and back, two roundings per weight.
const TOLERANCE_F32: f64 = 1e-5;
/// The same in f64.
const TOLERANCE_F64: f64 = 1e-12;

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        TOLERANCE_F64
    } else {
        TOLERANCE_F32
    }
}

fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&a.sub(b).unwrap()) / max_abs(a).max(1.0)
}

fn random_nonneg(seed: u64, dtype: DType, cnn: bool) -> (Network, NonnegNetwork) {
    let range = Range::new(0.0, 1.0).unwrap();
    let regular = if cnn { random_cnn(seed, dtype, range) } else { random_mlp(seed, dtype, range) };
    let nonneg = transform(&regular, &TransformOptions::default()).unwrap();
    (regular, nonneg)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn mean_and_variance(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let variance = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, variance)
}

fn check_round_trip(seed: u64, dtype: DType, cnn: bool, granularity: GainGranularity) {
    let (_, nonneg) = random_nonneg(seed, dtype, cnn);
    let mapping = DeviceMapping::new(&nonneg, granularity).unwrap();
    let mapped = mapping.map(&nonneg).unwrap();
    for device in &mapped {
        for t in [&device.signal, &device.complement] {
            let v = values(t);
            assert!(v.iter().all(|x| (0.0..=1.0 + 1e-6).contains(x)), "transmission outside [0, 1]");
        }
        let largest = values(&device.signal)
            .into_iter()
            .chain(values(&device.complement))
            .fold(0.0f64, f64::max);
        assert!((largest - 1.0).abs() < 1e-6, "largest transmission {largest}, expected 1");
    }
    let back = mapping.unmap(&nonneg, &mapped).unwrap();
    for ((_, a), (_, b)) in nonneg.affine_layers().zip(back.affine_layers()) {
        for (x, y) in a.parameters().into_iter().zip(b.parameters()) {
            let d = relative_difference(x, y);
            assert!(d <= tolerance(dtype), "seed {seed} {dtype:?}: round trip differs by {d}");
        }
    }
}

fn check_ideal_hardware(seed: u64, dtype: DType, cnn: bool, granularity: GainGranularity) {
    let (regular, nonneg) = random_nonneg(seed, dtype, cnn);
    let x = random_inputs(seed, &regular, 7, dtype);
    let ideal = nonneg.forward(&x).unwrap();
    let mapping = DeviceMapping::new(&nonneg, granularity).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let realised = realise(&nonneg, &mapping, &Effects::default(), &mut rng).unwrap();
    let hardware = realised.forward(&x, &NoiseSource::new(rng)).unwrap();
    let d = relative_difference(&ideal, &hardware);
    assert!(d <= tolerance(dtype), "seed {seed} {dtype:?}: hardware differs by {d}");
    let a: Vec<u32> = ideal.argmax(1).unwrap().to_vec1().unwrap();
    let b: Vec<u32> = hardware.argmax(1).unwrap().to_vec1().unwrap();
    assert_eq!(a, b, "seed {seed} {dtype:?}: predictions differ");
}

#[test]
fn mapping_round_trips_f32_and_f64() {
    for dtype in [DType::F32, DType::F64] {
        for seed in 0..4 {
            for cnn in [false, true] {
                for granularity in [GainGranularity::PerLayer, GainGranularity::PerOutput] {
                    check_round_trip(seed, dtype, cnn, granularity);
                }
            }
        }
    }
}

#[test]
fn per_output_gains_fill_every_row() {
    let (_, nonneg) = random_nonneg(3, DType::F64, false);
    let mapping = DeviceMapping::new(&nonneg, GainGranularity::PerOutput).unwrap();
    for device in mapping.map(&nonneg).unwrap() {
        let p: Vec<Vec<f64>> = device.signal.to_vec2().unwrap();
        let n: Vec<Vec<f64>> = device.complement.to_vec2().unwrap();
        for (row_p, row_n) in p.iter().zip(&n) {
            let peak = row_p.iter().chain(row_n).fold(0.0f64, |m, v| m.max(*v));
            assert!((peak - 1.0).abs() < 1e-12, "row peak {peak}, expected 1");
        }
    }
}

#[test]
fn full_scale_bounds_every_reading() {
    let (regular, nonneg) = random_nonneg(5, DType::F64, true);
    let mapping = DeviceMapping::new(&nonneg, GainGranularity::PerLayer).unwrap();
    let x = random_inputs(5, &regular, 32, DType::F64);
    nonneg
        .forward_observed(&x, &mut |layer, name, t| {
            if let (Some(i), "output") = (layer, name) {
                if let Some(m) = mapping.layer(i) {
                    let top = max_abs(t);
                    assert!(top <= m.full_scale * (1.0 + 1e-12), "layer {i}: reading {top} above {}", m.full_scale);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn ideal_hardware_matches_nonneg_forward() {
    for dtype in [DType::F32, DType::F64] {
        for seed in 0..4 {
            for cnn in [false, true] {
                check_ideal_hardware(seed, dtype, cnn, GainGranularity::PerLayer);
                check_ideal_hardware(seed, dtype, cnn, GainGranularity::PerOutput);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn ideal_hardware_is_exact_on_random_networks(seed in 0u64..10_000, cnn: bool, f64_params: bool) {
        let dtype = if f64_params { DType::F64 } else { DType::F32 };
        check_ideal_hardware(seed, dtype, cnn, GainGranularity::PerLayer);
        check_round_trip(seed, dtype, cnn, GainGranularity::PerOutput);
    }
}

fn uniform_samples(n: usize, dtype: DType) -> Tensor {
    // Evenly spaced in [-0.1, 1.1], so the clip is exercised too.
    let v: Vec<f64> = (0..n).map(|k| -0.1 + 1.2 * k as f64 / (n - 1) as f64).collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

#[test]
fn quantise_has_levels_and_step() {
    for dtype in [DType::F32, DType::F64] {
        for bits in [1u32, 3, 6] {
            let x = uniform_samples(100_001, dtype);
            let q = values(&quantise(&x, bits).unwrap());
            let levels = (1u64 << bits) - 1;
            let step = 1.0 / levels as f64;
            let mut distinct: Vec<i64> = q.iter().map(|v| (v / step).round() as i64).collect();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len() as u64, levels + 1, "{bits} bits: {} levels", distinct.len());
            for (xi, qi) in values(&x).iter().zip(&q) {
                let k = qi / step;
                assert!((k - k.round()).abs() < 1e-5, "{qi} is not a level of {bits} bits");
                let error = (xi.clamp(0.0, 1.0) - qi).abs();
                assert!(error <= step / 2.0 + 1e-6, "{bits} bits: {xi} -> {qi}, error above step / 2");
            }
            // Round-to-nearest on uniform inputs has mean error ~0 and
            // variance step^2 / 12 (inside [0, 1]).
            let inside: Vec<f64> = values(&x)
                .iter()
                .zip(&q)
                .filter(|(xi, _)| (0.0..=1.0).contains(*xi))
                .map(|(xi, qi)| qi - xi)
                .collect();
            let (mean, variance) = mean_and_variance(&inside);
            assert!(mean.abs() < 1e-3 * step.max(1e-3), "{bits} bits: mean error {mean}");
            let expected = step * step / 12.0;
            assert!((variance - expected).abs() < 0.02 * expected, "{bits} bits: variance {variance} vs {expected}");
        }
    }
}

#[test]
fn quantise_passes_gradient_through() {
    let x = candle_core::Var::new(&[0.1f64, 0.4, 0.77, 1.3], &Device::Cpu).unwrap();
    let q = quantise(x.as_tensor(), 2).unwrap();
    let grads = q.sum_all().unwrap().backward().unwrap();
    let g: Vec<f64> = grads.get(&x).unwrap().to_vec1().unwrap();
    assert_eq!(g, vec![1.0, 1.0, 1.0, 0.0], "straight-through inside [0, 1], zero where clipped");
}

#[test]
fn extinction_floor_lifts_zero() {
    let effects = Effects {
        extinction_db: Some(20.0),
        ..Effects::default()
    };
    let t = Tensor::new(&[0.0f64, 0.5, 1.0], &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let out: Vec<f64> = effects.apply_to_weights(&t, &mut rng).unwrap().to_vec1().unwrap();
    let floor = 0.01; // 10^(-20 / 10)
    let expected = [floor, floor + (1.0 - floor) * 0.5, 1.0];
    for (got, want) in out.iter().zip(expected) {
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
    }
}

#[test]
fn weight_noise_has_stated_moments() {
    let sigma = 0.02;
    let effects = Effects {
        weight_noise: sigma,
        ..Effects::default()
    };
    let n = 400_000;
    let t = Tensor::full(0.5f64, n, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let v = values(&effects.apply_to_weights(&t, &mut rng).unwrap());
    let (mean, variance) = mean_and_variance(&v);
    // Standard error of the mean is sigma / sqrt(n) = 3e-5.
    assert!((mean - 0.5).abs() < 2e-4, "mean {mean}");
    assert!((variance / (sigma * sigma) - 1.0).abs() < 0.02, "variance {variance}");
    let mut other = StdRng::seed_from_u64(1);
    let again = values(&effects.apply_to_weights(&t, &mut other).unwrap());
    assert_eq!(v, again, "the same seed must draw the same noise");
}

#[test]
fn weight_noise_stays_passive() {
    let effects = Effects {
        weight_noise: 0.5,
        ..Effects::default()
    };
    let t = Tensor::full(0.0f32, 10_000, &Device::Cpu).unwrap();
    let v = values(&effects.apply_to_weights(&t, &mut StdRng::seed_from_u64(2)).unwrap());
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)), "a transmission left [0, 1]");
}

#[test]
fn detector_noise_has_stated_moments() {
    let full_scale = 8.0;
    let n = 400_000;
    for dtype in [DType::F32, DType::F64] {
        let signal = 2.0;
        let z = Tensor::full(signal, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let additive = Effects {
            detector_noise: 0.01,
            ..Effects::default()
        };
        let v = values(&additive.apply_to_detector(&z, full_scale, &mut StdRng::seed_from_u64(3)).unwrap());
        let (mean, variance) = mean_and_variance(&v);
        let sigma = 0.01 * full_scale;
        assert!((mean - signal).abs() < 4.0 * sigma / (n as f64).sqrt(), "{dtype:?} additive mean {mean}");
        assert!((variance / (sigma * sigma) - 1.0).abs() < 0.02, "{dtype:?} additive variance {variance}");

        let shot = Effects {
            shot_noise: 0.03,
            ..Effects::default()
        };
        let v = values(&shot.apply_to_detector(&z, full_scale, &mut StdRng::seed_from_u64(4)).unwrap());
        let (mean, variance) = mean_and_variance(&v);
        let expected = 0.03 * 0.03 * full_scale * signal;
        assert!((mean - signal).abs() < 4.0 * expected.sqrt() / (n as f64).sqrt(), "{dtype:?} shot mean {mean}");
        assert!((variance / expected - 1.0).abs() < 0.02, "{dtype:?} shot variance {variance} vs {expected}");
    }
}

#[test]
fn adc_quantises_over_full_scale() {
    let full_scale = 5.0;
    let bits = 4;
    let effects = Effects {
        adc_bits: Some(bits),
        ..Effects::default()
    };
    let n = 50_001;
    let raw: Vec<f64> = (0..n).map(|k| -1.0 + 7.0 * k as f64 / (n - 1) as f64).collect();
    let z = Tensor::from_vec(raw.clone(), n, &Device::Cpu).unwrap();
    let q = values(&effects.apply_to_detector(&z, full_scale, &mut StdRng::seed_from_u64(0)).unwrap());
    let step = full_scale / 15.0;
    let mut levels: Vec<i64> = q.iter().map(|v| (v / step).round() as i64).collect();
    levels.sort_unstable();
    levels.dedup();
    assert_eq!(levels, (0..=15).collect::<Vec<_>>(), "16 levels from 0 to full scale");
    for (x, y) in raw.iter().zip(&q) {
        assert!((x.clamp(0.0, full_scale) - y).abs() <= step / 2.0 + 1e-12, "{x} -> {y}");
    }
}

#[test]
fn dac_quantises_modulation_levels() {
    // One linear layer reading inputs in [0, 2] (alpha = 2): with 1 input
    // bit every modulator is fully off or on, so the layer receives 0 or 2.
    let weight = Tensor::new(&[[1.0f64]], &Device::Cpu).unwrap();
    let bias = Tensor::new(&[0.0f64], &Device::Cpu).unwrap();
    let regular = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, 1, 1],
        input_range: Range::new(0.0, 2.0).unwrap(),
        layers: vec![Layer::Flatten, Layer::Linear(Linear { weight, bias })],
    };
    let nonneg = transform(&regular, &TransformOptions::default()).unwrap();
    let mapping = DeviceMapping::new(&nonneg, GainGranularity::PerLayer).unwrap();
    let effects = Effects {
        input_bits: Some(1),
        ..Effects::default()
    };
    let mut rng = StdRng::seed_from_u64(0);
    let realised = realise(&nonneg, &mapping, &effects, &mut rng).unwrap();
    let x = Tensor::new(&[0.3f64, 0.9, 1.1, 1.9], &Device::Cpu).unwrap().reshape((4, 1, 1, 1)).unwrap();
    let out: Vec<f64> = realised.forward(&x, &NoiseSource::new(rng)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for (got, want) in out.iter().zip([0.0, 0.0, 2.0, 2.0]) {
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}

#[test]
fn effects_reject_invalid_settings() {
    let cases = [
        Effects { weight_bits: Some(0), ..Effects::default() },
        Effects { adc_bits: Some(25), ..Effects::default() },
        Effects { extinction_db: Some(0.0), ..Effects::default() },
        Effects { extinction_db: Some(f64::NAN), ..Effects::default() },
        Effects { detector_noise: -0.1, ..Effects::default() },
        Effects { shot_noise: f64::INFINITY, ..Effects::default() },
    ];
    for effects in cases {
        assert!(effects.validate().is_err(), "{effects:?} was accepted");
    }
}

#[test]
fn sweep_parses_ranges() {
    let bits: Sweep = "weight-bits=2..5".parse().unwrap();
    assert_eq!(bits.parameter, SweepParameter::WeightBits);
    assert_eq!(bits.values, vec![2.0, 3.0, 4.0, 5.0]);
    let noise: Sweep = "detector-noise=0..0.05:6".parse().unwrap();
    assert_eq!(noise.values.len(), 6);
    assert!((noise.values[5] - 0.05).abs() < 1e-15);
    assert!((noise.values[1] - 0.01).abs() < 1e-15);
    assert_eq!(noise.values[3].to_string(), "0.03", "values are rounded for the table");
    for bad in ["weight-bits", "speed=1..2", "weight-bits=0..4", "weight-bits=5..2", "detector-noise=-1..0", "detector-noise=0..1:0", "adc-bits=2.5..4"] {
        let message = bad.parse::<Sweep>().unwrap_err().to_string();
        assert!(message.contains(bad), "{message}");
    }
}

fn linear(out: usize, inputs: usize, values: Vec<f64>) -> Layer {
    Layer::Linear(Linear {
        weight: Tensor::from_vec(values, (out, inputs), &Device::Cpu).unwrap(),
        bias: Tensor::zeros(out, DType::F64, &Device::Cpu).unwrap(),
    })
}

#[test]
fn cost_table_counts_each_scheme() {
    let network = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, 1, 3],
        input_range: Range::new(0.0, 1.0).unwrap(),
        layers: vec![Layer::Flatten, linear(2, 3, vec![1.0, -2.0, 0.0, 0.5, 0.0, -1.0])],
    };
    let table = cost_table(&network, None).unwrap();
    assert_eq!(table.rows.len(), 1);
    let row = &table.rows[0];
    assert_eq!((row.inputs, row.outputs, row.cycles), (3, 2, 1));
    let n = &row.nonneg;
    assert_eq!((n.optical_inputs, n.modulators, n.weight_elements, n.nonzero_elements), (6, 3, 12, 4));
    assert_eq!((n.photodetectors, n.adcs, n.subtractions), (2, 2, 0));
    let b = &row.balanced;
    assert_eq!((b.optical_inputs, b.weight_elements, b.photodetectors, b.adcs, b.subtractions), (3, 6, 4, 2, 2));
    let d = &row.differential;
    assert_eq!((d.optical_inputs, d.weight_elements, d.photodetectors, d.adcs, d.subtractions), (3, 12, 4, 4, 2));
    assert_eq!(table.totals[0], row.nonneg);
    assert!(table.energy_per_sample_j.is_none());
}

#[test]
fn cost_table_counts_convolution_cycles() {
    let network = common::random_cnn(1, DType::F32, Range::new(0.0, 1.0).unwrap());
    let table = cost_table(&network, None).unwrap();
    let mut shape = network.input_shape.clone();
    let mut rows = table.rows.iter();
    for layer in &network.layers {
        let output = layer.output_shape(&shape).unwrap();
        if let Layer::Conv2d(c) = layer {
            let row = rows.next().unwrap();
            let (_, _, kh, kw) = c.kernel_dims();
            assert_eq!(row.cycles, output[1] * output[2]);
            assert_eq!(row.inputs, shape[0] * kh * kw);
            assert_eq!(row.nonneg.weight_elements, 2 * c.weight.elem_count());
        } else if let Layer::Linear(l) = layer {
            let row = rows.next().unwrap();
            assert_eq!((row.cycles, row.inputs), (1, l.in_features()));
        }
        shape = output;
    }
    assert!(rows.next().is_none(), "a row without a layer");
}

#[test]
fn energies_load_json_and_toml() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e.json");
    std::fs::write(
        &json,
        r#"{"modulator_j": 1e-12, "weight_element_j": 0, "photodetector_j": 2e-12, "adc_j": 3e-12, "subtraction_j": 4e-12}"#,
    )
    .unwrap();
    let toml = dir.path().join("e.toml");
    std::fs::write(
        &toml,
        "modulator_j = 1e-12\nweight_element_j = 0.0\nphotodetector_j = 2e-12\nadc_j = 3e-12\nsubtraction_j = 4e-12\n",
    )
    .unwrap();
    let a = Energies::load(&json).unwrap();
    let b = Energies::load(&toml).unwrap();
    assert_eq!(a, b);
    let network = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, 1, 3],
        input_range: Range::new(0.0, 1.0).unwrap(),
        layers: vec![Layer::Flatten, linear(2, 3, vec![1.0, -2.0, 0.0, 0.5, 0.0, -1.0])],
    };
    let table = cost_table(&network, Some(&a)).unwrap();
    let energy = table.energy_per_sample_j.unwrap();
    // nonneg: 3 modulators, 2 detectors, 2 ADCs, no subtraction.
    let expected_nonneg = 3.0 * 1e-12 + 2.0 * 2e-12 + 2.0 * 3e-12;
    assert!((energy[0] - expected_nonneg).abs() < 1e-24, "{}", energy[0]);
    // balanced: 3 modulators, 4 detectors, 2 ADCs, 2 subtractions.
    let expected_balanced = 3.0 * 1e-12 + 4.0 * 2e-12 + 2.0 * 3e-12 + 2.0 * 4e-12;
    assert!((energy[1] - expected_balanced).abs() < 1e-24, "{}", energy[1]);
}

#[test]
fn energies_reject_missing_and_negative() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    std::fs::write(&missing, r#"{"modulator_j": 1e-12}"#).unwrap();
    let message = Energies::load(&missing).unwrap_err().to_string();
    assert!(message.contains("missing.json"), "{message}");
    assert!(message.contains("weight_element_j"), "{message}");
    let negative = dir.path().join("negative.toml");
    std::fs::write(
        &negative,
        "modulator_j = -1.0\nweight_element_j = 0.0\nphotodetector_j = 0.0\nadc_j = 0.0\nsubtraction_j = 0.0\n",
    )
    .unwrap();
    let message = Energies::load(&negative).unwrap_err().to_string();
    assert!(message.contains("modulator_j"), "{message}");
}

/// Trains a small f64 MLP for one epoch on 256 subset images, with the
/// ideal forward or through the hardware model with `effects`.
fn train_small(effects: Option<Effects>) -> NonnegNetwork {
    use isonn::activation::Activation;
    use isonn::model::Init;
    use isonn::progress::Progress;
    use isonn::scenario::{train_nonneg, train_nonneg_on_hardware, NonnegOptimizer};
    use isonn::train::TrainConfig;

    let mut data = isonn::data::load_embedded().unwrap();
    data.train = data.train.take(256);
    data.test = data.test.take(64);
    let regular = Network::mlp(&[1, 28, 28], &[8], 10, Activation::PhotonicSigmoid, Init::Xavier, 0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let mut nonneg = transform(&regular, &TransformOptions::default()).unwrap();
    let config = TrainConfig {
        epochs: 1,
        batch_size: 64,
        seed: 0,
        eval_every_epoch: false,
        shuffle: true,
        augment: false,
    };
    let optimizer = NonnegOptimizer::Projected { lr: 0.01, momentum: 0.0 };
    let progress = Progress::hidden();
    match effects {
        None => train_nonneg(&mut nonneg, &data, &config, &optimizer, &progress).unwrap(),
        Some(effects) => {
            let hardware = isonn::hardware::HardwareTraining {
                effects,
                granularity: GainGranularity::PerLayer,
                seed: 0,
            };
            train_nonneg_on_hardware(&mut nonneg, &data, &config, &optimizer, &hardware, &progress).unwrap()
        }
    };
    nonneg
}

#[test]
fn ideal_hardware_training_matches_plain() {
    let plain = train_small(None);
    let hardware = train_small(Some(Effects::default()));
    for ((_, a), (_, b)) in plain.affine_layers().zip(hardware.affine_layers()) {
        for (x, y) in a.parameters().into_iter().zip(b.parameters()) {
            let d = relative_difference(x, y);
            assert!(d <= 1e-9, "parameters differ by {d} after ideal hardware training");
        }
    }
    let quantised = train_small(Some(Effects {
        weight_bits: Some(2),
        ..Effects::default()
    }));
    let (_, a) = plain.affine_layers().next().unwrap();
    let (_, b) = quantised.affine_layers().next().unwrap();
    assert!(relative_difference(&a.positive, &b.positive) > 1e-6, "2-bit training left the weights unchanged");
}
