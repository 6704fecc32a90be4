//! The transformation of a regular network into its non-negative isomorphic
//! equivalent, and its inverse.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{AffineOp, NonnegActivation, NonnegAffine, NonnegLayer, NonnegNetwork};
use crate::error::{Error, Result};
use crate::model::{Conv2d, Layer, Linear, Network, Range};

/// Margin added to the smallest exact shift, as a fraction of the largest
/// `|c_i|` of the layer (or an absolute `SHIFT_MARGIN` when every `c_i` is 0).
///
/// The smallest exact shift `s = -min c` sets the smallest stored bias to 0,
/// and the sign-preserving optimizer never moves a zero, so the margin keeps
/// every bias trainable. It raises the common-mode power by 1%.
pub const SHIFT_MARGIN: f64 = 0.01;

/// Rule that chooses the activation shift `s` of each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ShiftPolicy {
    /// `s = max(0, -min_i c_i) + margin`: the smallest exact shift plus a
    /// margin of 1% of the largest |c_i|, so every bias is strictly positive.
    #[default]
    Minimal,
    /// `s = max_i |c_i|`, as in the method's reference code.
    Published,
}

impl ShiftPolicy {
    /// Returns the shift for the corrected biases `c` of one layer.
    pub fn shift(self, c: &[f64]) -> f64 {
        let largest = c.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        match self {
            ShiftPolicy::Minimal => {
                let smallest = c.iter().fold(f64::INFINITY, |m, &v| m.min(v));
                let exact = (-smallest).max(0.0);
                let margin = if largest > 0.0 { SHIFT_MARGIN * largest } else { SHIFT_MARGIN };
                exact + margin
            }
            ShiftPolicy::Published => largest,
        }
    }
}

/// Range given to an activation's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationRange {
    /// `[min(0, min f), max f]`: the method's choice (`lo = 0` for the
    /// photonic activations).
    #[default]
    Method,
    /// `[min f, max f]`: lowers the common-mode power.
    Tight,
}

/// Settings of the transformation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TransformOptions {
    /// Rule for each layer's shift.
    pub shift: ShiftPolicy,
    /// Range given to activation outputs.
    pub activation_range: ActivationRange,
}

/// Transforms `network` into its non-negative isomorphic equivalent.
///
/// For each affine layer `z = W x + b` with input `x` in `[lo, lo + a]`:
/// `P = max(W, 0)`, `N = max(-W, 0)`, `c = b + W lo 1 - a N 1`, a shift `s`
/// from `options.shift`, and `z' = P u + N (a - u) + (c + s)` with
/// `u = x - lo`, so that `z = z' - s` exactly. Parameters keep the network's
/// data type; `c` and `s` are computed in f64.
///
/// A zero-padded layer needs `lo <= 0 <= hi` so that the pads `-lo` and `hi`
/// are non-negative, so the range of the edge it reads is widened to include 0.
pub fn transform(network: &Network, options: &TransformOptions) -> Result<NonnegNetwork> {
    network.output_shape()?;
    let layers = &network.layers;
    let mut range = widen_for_consumer(layers, 0, network.input_range);
    let input_range = range;
    let mut out = Vec::with_capacity(layers.len());
    let mut output_offset = range.lo;
    for (i, layer) in layers.iter().enumerate() {
        let next = match layer {
            Layer::Linear(l) => {
                let affine = transform_affine(&l.weight, &l.bias, AffineOp::Linear, range, options)?;
                tracing::debug!(layer = i, lo = range.lo, alpha = range.width(), shift = affine.shift, "transformed linear layer");
                range = widen_for_consumer(layers, i + 1, Range { lo: -affine.shift, hi: affine.out_max - affine.shift });
                NonnegLayer::Affine(affine)
            }
            Layer::Conv2d(c) => {
                let op = AffineOp::Conv2d {
                    stride: c.stride,
                    padding: c.padding,
                    dilation: c.dilation,
                    groups: c.groups,
                };
                if c.padding > 0 && !(range.lo <= 0.0 && 0.0 <= range.hi) {
                    return Err(Error::Transform {
                        layer: i,
                        message: format!(
                            "zero padding needs an input range containing 0, got [{}, {}]",
                            range.lo, range.hi
                        ),
                    });
                }
                let affine = transform_affine(&c.weight, &c.bias, op, range, options)?;
                tracing::debug!(layer = i, lo = range.lo, alpha = range.width(), shift = affine.shift, "transformed conv2d layer");
                range = widen_for_consumer(layers, i + 1, Range { lo: -affine.shift, hi: affine.out_max - affine.shift });
                NonnegLayer::Affine(affine)
            }
            Layer::Activation(act) => {
                let Some((f_lo, f_hi)) = act.output_bounds() else {
                    return Err(Error::Transform {
                        layer: i,
                        message: format!(
                            "activation {act} is unbounded, so the next layer has no input range; \
                             bound it first with `isonn bound` (ReLU-N with a fixed or calibrated N) or train \
                             with a bounded version (e.g. --activation relu-n:6)"
                        ),
                    });
                };
                let lo = match options.activation_range {
                    ActivationRange::Method => f_lo.min(0.0),
                    ActivationRange::Tight => f_lo,
                };
                let input_offset = range.lo;
                range = widen_for_consumer(layers, i + 1, Range { lo, hi: f_hi });
                tracing::debug!(layer = i, activation = %act, input_offset, output_lo = range.lo, "shifted activation");
                NonnegLayer::Activation(NonnegActivation {
                    activation: *act,
                    input_offset,
                    output_offset: range.lo,
                })
            }
            Layer::AvgPool2d(p) => NonnegLayer::AvgPool2d(*p),
            Layer::MaxPool2d(p) => NonnegLayer::MaxPool2d(*p),
            Layer::Flatten => NonnegLayer::Flatten,
        };
        output_offset = range.lo;
        out.push(next);
    }
    Ok(NonnegNetwork {
        input_shape: network.input_shape.clone(),
        input_range,
        layers: out,
        output_offset,
    })
}

/// Widens `range` to contain 0 when the next affine layer from `start` on,
/// past layers that keep the range, is zero-padded.
fn widen_for_consumer(layers: &[Layer], start: usize, range: Range) -> Range {
    let consumer = layers[start.min(layers.len())..]
        .iter()
        .find(|l| !matches!(l, Layer::AvgPool2d(_) | Layer::MaxPool2d(_) | Layer::Flatten));
    match consumer {
        Some(Layer::Conv2d(c)) if c.padding > 0 => range.including(0.0),
        _ => range,
    }
}

/// Splits one affine layer; see [`transform`].
fn transform_affine(
    weight: &Tensor,
    bias: &Tensor,
    op: AffineOp,
    range: Range,
    options: &TransformOptions,
) -> Result<NonnegAffine> {
    let dtype = weight.dtype();
    let out_units = weight.dims()[0];
    let rows: Vec<Vec<f64>> = weight
        .reshape((out_units, ()))?
        .to_dtype(DType::F64)?
        .to_vec2()?;
    let b: Vec<f64> = bias.to_dtype(DType::F64)?.to_vec1()?;
    let (lo, alpha) = (range.lo, range.width());

    // c_i = b_i + lo * sum_j W_ij - alpha * sum_j N_ij
    let c: Vec<f64> = rows
        .iter()
        .zip(&b)
        .map(|(row, bi)| {
            let sum: f64 = row.iter().sum();
            let negative: f64 = row.iter().map(|w| (-w).max(0.0)).sum();
            bi + lo * sum - alpha * negative
        })
        .collect();
    let shift = options.shift.shift(&c);
    let shifted: Vec<f64> = c.iter().map(|ci| (ci + shift).max(0.0)).collect();

    // Full scale of z'_i: alpha * sum_j |W_ij| + c_i + s.
    let out_max = rows
        .iter()
        .zip(&shifted)
        .map(|(row, bias)| alpha * row.iter().map(|w| w.abs()).sum::<f64>() + bias)
        .fold(0.0f64, f64::max);

    let positive = weight.relu()?.detach();
    let negative = weight.neg()?.relu()?.detach();
    let bias = Tensor::new(shifted.as_slice(), weight.device())?
        .to_dtype(dtype)?
        .relu()?; // rounding to f32 cannot make a bias negative
    Ok(NonnegAffine {
        op,
        positive,
        negative,
        bias,
        lo: vec![lo],
        alpha: vec![alpha],
        shift,
        out_max,
    })
}

/// Maps a non-negative network back to the regular network it implements:
/// `W = P - N`, `b = (c + s) - s + alpha N 1 - W lo 1`.
///
/// Useful after non-negative training, to check that the network stayed
/// isomorphic, and to run it on signed hardware.
pub fn inverse(network: &NonnegNetwork) -> Result<Network> {
    let mut layers = Vec::with_capacity(network.layers.len());
    for layer in &network.layers {
        layers.push(match layer {
            NonnegLayer::Affine(a) => {
                let weight = a.positive.sub(&a.negative)?;
                let bias = inverse_bias(a, &weight)?;
                match a.op {
                    AffineOp::Linear => Layer::Linear(Linear { weight, bias }),
                    AffineOp::Conv2d {
                        stride,
                        padding,
                        dilation,
                        groups,
                    } => Layer::Conv2d(Conv2d {
                        weight,
                        bias,
                        stride,
                        padding,
                        dilation,
                        groups,
                    }),
                }
            }
            NonnegLayer::Activation(a) => Layer::Activation(a.activation),
            NonnegLayer::AvgPool2d(p) => Layer::AvgPool2d(*p),
            NonnegLayer::MaxPool2d(p) => Layer::MaxPool2d(*p),
            NonnegLayer::Flatten => Layer::Flatten,
        });
    }
    Ok(Network {
        input_shape: network.input_shape.clone(),
        input_range: network.input_range,
        layers,
    })
}

/// `b = bias - s + sum_j N_ij alpha_j - sum_j W_ij lo_j`, per input channel
/// when `lo` and `alpha` have one value per channel.
fn inverse_bias(a: &NonnegAffine, weight: &Tensor) -> Result<Tensor> {
    let dims = weight.dims();
    let (out_units, group_inputs) = (dims[0], dims[1]);
    let receptive: usize = dims[2..].iter().product();
    let groups = match a.op {
        AffineOp::Linear => 1,
        AffineOp::Conv2d { groups, .. } => groups,
    };
    let w: Vec<Vec<f64>> = weight.reshape((out_units, ()))?.to_dtype(DType::F64)?.to_vec2()?;
    let n: Vec<Vec<f64>> = a.negative.reshape((out_units, ()))?.to_dtype(DType::F64)?.to_vec2()?;
    let stored: Vec<f64> = a.bias.to_dtype(DType::F64)?.to_vec1()?;
    let b: Vec<f64> = (0..out_units)
        .map(|i| {
            // Entry j of row i reads input channel g * group_inputs + j / receptive.
            let group = i / (out_units / groups);
            let channel_value = |values: &[f64], j: usize| {
                let channel = group * group_inputs + j / receptive;
                values[channel.min(values.len() - 1)]
            };
            let len = w[i].len();
            let complement: f64 = (0..len).map(|j| n[i][j] * channel_value(&a.alpha, j)).sum();
            let offset: f64 = (0..len).map(|j| w[i][j] * channel_value(&a.lo, j)).sum();
            stored[i] - a.shift + complement - offset
        })
        .collect();
    Ok(Tensor::new(b.as_slice(), weight.device())?.to_dtype(weight.dtype())?)
}
