//! Random networks and inputs shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use isonn::activation::Activation;
use isonn::model::{Conv2d, Layer, Linear, Network, Pool, Range};
use isonn::nonneg::NonnegNetwork;
use rand::{Rng, SeedableRng};

pub mod ort;

/// The bounded activations the transformation supports.
pub const BOUNDED: [Activation; 3] = [
    Activation::PhotonicSigmoid,
    Activation::PhotonicSinusoidal,
    Activation::ReluN { n: 3.0 },
];

/// Fills a tensor of `shape` with values in `[-scale, scale]`.
pub fn uniform(rng: &mut impl Rng, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.gen_range(-scale..=scale)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Gives every affine layer random weights and biases of both signs. A
/// third of the biases are large and positive, so that many units have a
/// positive corrected bias `c_i` (the case the reference code gets wrong).
pub fn randomise(network: &mut Network, rng: &mut impl Rng, dtype: DType) {
    for layer in &mut network.layers {
        if let Some((w, b)) = layer.weight_and_bias_mut() {
            let fan_in: usize = w.dims()[1..].iter().product();
            let scale = 1.5 / (fan_in as f64).sqrt();
            *w = uniform(rng, w.dims(), scale, dtype);
            let out = b.dims()[0];
            let biases: Vec<f64> = (0..out)
                .map(|_| {
                    if rng.gen_bool(0.33) {
                        rng.gen_range(0.5..3.0)
                    } else {
                        rng.gen_range(-1.0..1.0)
                    }
                })
                .collect();
            *b = Tensor::from_vec(biases, out, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
        }
    }
}

/// Builds a random MLP on `[1, side, side]` inputs in `range`.
pub fn random_mlp(seed: u64, dtype: DType, range: Range) -> Network {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let side = rng.gen_range(2..6);
    let depth = rng.gen_range(1..4);
    let act = BOUNDED[rng.gen_range(0..BOUNDED.len())].clone();
    let mut layers = vec![Layer::Flatten];
    let mut width = side * side;
    for _ in 0..depth {
        let h = rng.gen_range(1..12);
        layers.push(Layer::Linear(Linear::zeros(width, h).unwrap()));
        layers.push(Layer::Activation(act.clone()));
        width = h;
    }
    // Sometimes two affine layers in a row, whose edge carries the shift.
    if rng.gen_bool(0.3) {
        let h = rng.gen_range(1..8);
        layers.push(Layer::Linear(Linear::zeros(width, h).unwrap()));
        width = h;
    }
    layers.push(Layer::Linear(Linear::zeros(width, rng.gen_range(2..6)).unwrap()));
    let mut network = Network {
        channel_ranges: Vec::new(),
        input_shape: vec![1, side, side],
        input_range: range,
        layers,
    };
    randomise(&mut network, &mut rng, dtype);
    network
}

/// Builds a random CNN with padding, stride, dilation, groups and pooling.
pub fn random_cnn(seed: u64, dtype: DType, range: Range) -> Network {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let act = BOUNDED[rng.gen_range(0..BOUNDED.len())].clone();
    let groups_choices = [1usize, 2];
    let mut channels = 2 * rng.gen_range(1..3);
    let mut side = rng.gen_range(7..12);
    let input_shape = vec![channels, side, side];
    let mut layers = Vec::new();
    for _ in 0..rng.gen_range(1..3) {
        let groups = groups_choices[rng.gen_range(0..2)];
        let out = groups * rng.gen_range(1..4);
        let kernel = rng.gen_range(1..4);
        let padding = rng.gen_range(0..3);
        let dilation = rng.gen_range(1..3);
        let stride = rng.gen_range(1..3);
        let extent = dilation * (kernel - 1) + 1;
        if side + 2 * padding < extent {
            continue;
        }
        let groups = if channels % groups == 0 { groups } else { 1 };
        let conv = Conv2d::zeros(channels, out, kernel, stride, padding, dilation, groups).unwrap();
        side = (side + 2 * padding - extent) / stride + 1;
        channels = out;
        layers.push(Layer::Conv2d(conv));
        if side >= 2 && rng.gen_bool(0.3) {
            // Pooling straight after the convolution, before the activation.
            let pool = Pool::new(2, rng.gen_range(1..3));
            layers.push(if rng.gen_bool(0.5) { Layer::MaxPool2d(pool) } else { Layer::AvgPool2d(pool) });
            side = (side - 2) / pool.stride + 1;
        }
        layers.push(Layer::Activation(act.clone()));
        if side >= 2 && rng.gen_bool(0.3) {
            let pool = Pool::new(2, 2);
            layers.push(if rng.gen_bool(0.5) { Layer::MaxPool2d(pool) } else { Layer::AvgPool2d(pool) });
            side = (side - 2) / 2 + 1;
        }
    }
    layers.push(Layer::Flatten);
    let flat = channels * side * side;
    let hidden = rng.gen_range(2..8);
    layers.push(Layer::Linear(Linear::zeros(flat, hidden).unwrap()));
    layers.push(Layer::Activation(act.clone()));
    layers.push(Layer::Linear(Linear::zeros(hidden, 4).unwrap()));
    let mut network = Network {
        channel_ranges: Vec::new(),
        input_shape,
        input_range: range,
        layers,
    };
    network.output_shape().expect("the generator keeps shapes consistent");
    randomise(&mut network, &mut rng, dtype);
    network
}

/// Draws a batch of inputs uniformly from `range`, with some samples at
/// the bounds exactly.
pub fn random_inputs(seed: u64, network: &Network, batch: usize, dtype: DType) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut shape = vec![batch];
    shape.extend(&network.input_shape);
    let n: usize = shape.iter().product();
    let Range { lo, hi } = network.input_range;
    let values: Vec<f64> = (0..n)
        .map(|i| match i % 7 {
            0 => lo,
            1 => hi,
            _ => rng.gen_range(lo..=hi),
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Runs both networks and returns (relative logit difference, smallest
/// physical signal).
pub fn compare(regular: &Network, nonneg: &NonnegNetwork, x: &Tensor) -> (f64, f64) {
    let a = regular.forward(x).unwrap();
    let mut min_signal = f64::INFINITY;
    let b = nonneg
        .forward_observed(x, &mut |_, _, t| {
            let m = t.min_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            min_signal = min_signal.min(m);
            Ok(())
        })
        .unwrap();
    let diff = max_abs(&a.sub(&b).unwrap());
    (diff / max_abs(&a).max(1.0), min_signal)
}

/// Returns the `isonn` binary as a command, with `ISONN_DATA` removed so
/// that a developer's setting cannot change the files a test reads.
pub fn isonn() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("isonn").unwrap();
    cmd.env_remove("ISONN_DATA");
    cmd
}

/// Trains a one-epoch 784-32-16-10 MLP on the embedded subset into `dir`.
pub fn train_small(dir: &Path, activation: &str) {
    isonn()
        .args(["train", "--dataset", "fashion-mnist-subset", "--epochs", "1", "--lr", "0.16"])
        .args(["--activation", activation, "--hidden", "32,16", "--out"])
        .arg(dir)
        .assert()
        .success()
        .stdout(predicates::str::contains("test_accuracy"));
}

/// Gives every trained tensor random values of both signs, nested layers
/// included, and every batch normalisation random statistics with scales
/// of both signs.
pub fn randomise_with_norms(network: &mut Network, rng: &mut impl Rng, dtype: DType) {
    network
        .visit_mut(&mut |_, layer| {
            if let Layer::BatchNorm(bn) = layer {
                let c = bn.channels();
                bn.weight = uniform(rng, &[c], 1.5, dtype);
                bn.bias = uniform(rng, &[c], 1.0, dtype);
                let mean = uniform(rng, &[c], 1.0, dtype);
                let var = uniform(rng, &[c], 0.9, dtype).affine(1.0, 1.0).unwrap(); // in [0.1, 1.9]
                bn.set_running_stats(mean, var);
                return Ok(());
            }
            for (name, t) in layer.parameters_mut() {
                let dims = t.dims().to_vec();
                let scale = if name == "bias" {
                    1.0
                } else {
                    1.5 / (dims[1..].iter().product::<usize>() as f64).sqrt()
                };
                *t = uniform(rng, &dims, scale, dtype);
            }
            Ok(())
        })
        .unwrap();
}

/// Draws inputs within each channel's range, a seventh of them exactly on
/// a bound.
pub fn channel_inputs(network: &Network, seed: u64, batch: usize, dtype: DType) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let ranges = network.input_ranges();
    let per_channel: usize = network.input_shape[1..].iter().product();
    let values: Vec<f64> = (0..batch * network.input_shape.iter().product::<usize>())
        .map(|i| {
            let r = ranges[(i / per_channel) % ranges.len()];
            match i % 7 {
                0 => r.lo,
                1 => r.hi,
                _ => rng.gen_range(r.lo..=r.hi),
            }
        })
        .collect();
    let mut shape = vec![batch];
    shape.extend(&network.input_shape);
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}
