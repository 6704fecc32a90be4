//! Parameter initialisation.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::{Layer, Network};
use crate::error::Result;

/// Distribution of a new network's weights and biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// Xavier-normal weights, `std = sqrt(2 / (fan_in + fan_out))`, zero biases
    /// (the method's reference code).
    Xavier,
    /// Xavier-normal weights, and each unit's bias chosen so that its
    /// pre-activation is centred on the steepest point of the activation
    /// that follows: `b_i = x_steep - m * sum_j W_ij`, where `m` is the
    /// midpoint of the layer's input range. The sinusoidal response
    /// `sin^2(pi/2 x)` has zero slope at 0, so pre-activations centred on 0
    /// (zero biases) starve the gradient of a CNN; this centres them at 0.5.
    /// The output layer keeps zero biases.
    Photonic,
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Init::Xavier => "xavier",
            Init::Photonic => "photonic",
        })
    }
}

impl Init {
    /// Draws every parameter of `network` from `seed`, replacing what was there.
    pub fn apply(self, network: &mut Network, seed: u64) -> Result<()> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let input_mid = (network.input_range.lo + network.input_range.hi) / 2.0;
        self.apply_chain(&mut network.layers, input_mid, &mut rng)?;
        Ok(())
    }

    /// Initialises a chain whose input values centre on `input_mid`, and
    /// returns the centre of its output.
    fn apply_chain(self, layers: &mut [Layer], mut input_mid: f64, rng: &mut StdRng) -> Result<f64> {
        for i in 0..layers.len() {
            // The activation this layer feeds, if pooling and flattening
            // are all that lies between them.
            let next_activation = layers[i + 1..]
                .iter()
                .find(|l| !matches!(l, Layer::AvgPool2d(_) | Layer::MaxPool2d(_) | Layer::Flatten | Layer::Dropout(_)))
                .and_then(|l| match l {
                    Layer::Activation(a) => Some(a.clone()),
                    _ => None,
                });
            match &mut layers[i] {
                Layer::Activation(a) => input_mid = midpoint(a),
                Layer::Residual(r) => {
                    self.apply_chain(&mut r.main, input_mid, rng)?;
                    self.apply_chain(&mut r.shortcut, input_mid, rng)?;
                }
                Layer::Elman(e) => {
                    let (input, _) = xavier(e.input_weight.dims(), rng)?;
                    let (recurrent, _) = xavier(e.recurrent_weight.dims(), rng)?;
                    let state_mid = midpoint(&e.activation);
                    let biases: Vec<f32> = match self {
                        Init::Photonic => {
                            let sums = |w: &Tensor| -> Result<Vec<f64>> {
                                Ok(w.to_dtype(candle_core::DType::F64)?.sum(1)?.to_vec1()?)
                            };
                            sums(&input)?
                                .iter()
                                .zip(sums(&recurrent)?)
                                .map(|(a, b)| (e.activation.steepest_input() - input_mid * a - state_mid * b) as f32)
                                .collect()
                        }
                        Init::Xavier => vec![0.0; e.hidden()],
                    };
                    e.bias = Tensor::from_vec(biases, e.hidden(), &Device::Cpu)?;
                    e.input_weight = input;
                    e.recurrent_weight = recurrent;
                    input_mid = state_mid;
                }
                layer => {
                    let Some((weight, bias)) = layer.weight_and_bias_mut() else {
                        continue;
                    };
                    let dims = weight.dims().to_vec();
                    let (w, values) = xavier(&dims, rng)?;
                    let fan_in = values.len() / dims[0];
                    let biases: Vec<f32> = match (self, next_activation) {
                        (Init::Photonic, Some(act)) => values
                            .chunks(fan_in)
                            .map(|row| {
                                let sum: f64 = row.iter().map(|&v| v as f64).sum();
                                (act.steepest_input() - input_mid * sum) as f32
                            })
                            .collect(),
                        _ => vec![0.0; dims[0]],
                    };
                    *bias = Tensor::from_vec(biases, dims[0], &Device::Cpu)?;
                    *weight = w;
                }
            }
        }
        Ok(input_mid)
    }
}

/// Returns the centre of an activation's outputs (0.5 when unbounded).
fn midpoint(activation: &crate::activation::Activation) -> f64 {
    activation.output_bounds().map(|(lo, hi)| (lo + hi) / 2.0).unwrap_or(0.5)
}

/// Draws Xavier-normal weights of shape `dims`, `std = sqrt(2 / (fan_in +
/// fan_out))` with the receptive field counted in both fans.
fn xavier(dims: &[usize], rng: &mut StdRng) -> Result<(Tensor, Vec<f32>)> {
    let receptive: usize = dims[2..].iter().product();
    let fan_in = dims[1] * receptive;
    let fan_out = dims[0] * receptive;
    let std = (2.0 / (fan_in + fan_out) as f64).sqrt();
    let normal = Normal::new(0.0, std).expect("std is finite and > 0");
    let values: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| normal.sample(rng) as f32)
        .collect();
    let w = Tensor::from_vec(values.clone(), dims, &Device::Cpu)?;
    Ok((w, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;

    #[test]
    fn xavier_std_matches_fan() {
        let net = Network::mlp(&[1, 28, 28], &[300], 10, Activation::PhotonicSigmoid, Init::Xavier, 7)
            .unwrap();
        let w: Vec<f32> = net.parameters()[0].1.flatten_all().unwrap().to_vec1().unwrap();
        let mean = w.iter().map(|&v| v as f64).sum::<f64>() / w.len() as f64;
        let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64;
        let want = 2.0 / (784.0 + 300.0);
        assert!(mean.abs() < 5e-4, "mean {mean}");
        assert!((var / want - 1.0).abs() < 0.02, "variance {var}, expected {want}");
    }

    #[test]
    fn photonic_bias_centres_preactivation() {
        let act = Activation::PhotonicSinusoidal;
        let net = Network::mlp(&[1, 4, 4], &[8], 3, act, Init::Photonic, 1).unwrap();
        let params = net.parameters();
        let w: Vec<Vec<f32>> = params[0].1.to_vec2().unwrap();
        let b: Vec<f32> = params[1].1.to_vec1().unwrap();
        for (row, bias) in w.iter().zip(&b) {
            let z_at_mid: f64 = row.iter().map(|&v| 0.5 * v as f64).sum::<f64>() + *bias as f64;
            assert!((z_at_mid - 0.5).abs() < 1e-5, "pre-activation at midpoint {z_at_mid}");
        }
        let out_bias: Vec<f32> = params[3].1.to_vec1().unwrap();
        assert!(out_bias.iter().all(|&v| v == 0.0), "output layer biases stay zero");
    }

    #[test]
    fn same_seed_same_weights() {
        let build = |seed| {
            Network::cnn(&[1, 28, 28], 10, Activation::PhotonicSigmoid, Init::Xavier, seed).unwrap()
        };
        let (a, b, c) = (build(3), build(3), build(4));
        let first = |n: &Network| -> Vec<f32> {
            n.parameters()[0].1.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(first(&a), first(&b));
        assert_ne!(first(&a), first(&c));
    }
}
