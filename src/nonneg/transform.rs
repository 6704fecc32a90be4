//! The transformation of a regular network into its non-negative isomorphic
//! equivalent, and its inverse.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{AffineOp, NonnegActivation, NonnegAffine, NonnegElman, NonnegLayer, NonnegNetwork, NonnegResidual};
use crate::activation::Activation;
use crate::error::{Error, Result};
use crate::model::{Conv1d, Conv2d, Elman, Layer, Linear, Network, Range, Residual};

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
/// Batch normalisation is first folded into the adjacent affine layers
/// ([`crate::model::fold_batchnorm`]). Then, for each affine layer
/// `z = W x + b` with input `x` in `[lo, lo + a]` (one range per input
/// channel or feature): `P = max(W, 0)`, `N = max(-W, 0)`,
/// `c = b + W lo - N a`, a shift `s` from `options.shift`, and
/// `z' = P u + N (a - u) + (c + s)` with `u = x - lo`, so that `z = z' - s`
/// exactly. Parameters keep the network's data type; `c` and `s` are
/// computed in f64.
///
/// Every edge carries its range per channel: an affine output reads
/// `[-s, max z'_i - s]` per unit, which is tighter than one range for the
/// layer; a residual sum adds the ranges of its branches. A zero-padded
/// layer needs `lo <= 0 <= hi` so that the pads `-lo` and `hi` are
/// non-negative, so the range of the edge it reads is widened to include 0.
pub fn transform(network: &Network, options: &TransformOptions) -> Result<NonnegNetwork> {
    network.output_shape()?;
    let folded = crate::model::fold_batchnorm(network)?;
    let ranges = folded.input_ranges();
    let mut input = Edge {
        lo: ranges.iter().map(|r| r.lo).collect(),
        hi: ranges.iter().map(|r| r.hi).collect(),
    }
    .collapsed();
    if let Some(values) = pad_values(&folded.layers, 0) {
        input = input.including_all(&values);
    }
    let mut context = Context {
        options,
        path: "layers".into(),
    };
    let (layers, output) = transform_chain(&folded.layers, &folded.input_shape, input.clone(), &mut context)?;
    let output_offset = output.scalar_lo().ok_or_else(|| Error::Transform {
        layer: folded.layers.len().saturating_sub(1),
        message: "the last layer's output has a different offset per unit; end the network with a \
                  linear layer"
            .into(),
    })?;
    let enclosing = Range {
        lo: input.lo.iter().copied().fold(f64::INFINITY, f64::min),
        hi: input.hi.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    };
    let channel_ranges = match input.len() {
        1 => Vec::new(),
        _ => input.lo.iter().zip(&input.hi).map(|(&lo, &hi)| Range { lo, hi }).collect(),
    };
    Ok(NonnegNetwork {
        input_shape: folded.input_shape.clone(),
        input_range: enclosing,
        channel_ranges,
        layers,
        output_offset,
    })
}

/// The range of a signal edge, one value for all channels or one per
/// channel (per feature after a flatten): the true value is the physical
/// one plus `lo`.
#[derive(Debug, Clone, PartialEq)]
struct Edge {
    lo: Vec<f64>,
    hi: Vec<f64>,
}

impl Edge {
    fn scalar(lo: f64, hi: f64) -> Self {
        Edge { lo: vec![lo], hi: vec![hi] }
    }

    fn len(&self) -> usize {
        self.lo.len()
    }

    /// Returns the common `lo` when every channel has the same one.
    fn scalar_lo(&self) -> Option<f64> {
        let first = self.lo[0];
        self.lo.iter().all(|&l| l == first).then_some(first)
    }

    /// Replaces equal per-channel values by one.
    fn collapsed(self) -> Self {
        let same = |v: &[f64]| v.iter().all(|&x| x == v[0]);
        if same(&self.lo) && same(&self.hi) {
            Edge::scalar(self.lo[0], self.hi[0])
        } else {
            self
        }
    }

    fn alpha(&self) -> Vec<f64> {
        self.lo.iter().zip(&self.hi).map(|(l, h)| h - l).collect()
    }

    /// Widens every channel's range to contain every value in `values`.
    fn including_all(&self, values: &[f64]) -> Self {
        let smallest = values.iter().copied().fold(f64::INFINITY, f64::min);
        let largest = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Edge {
            lo: self.lo.iter().map(|l| l.min(smallest)).collect(),
            hi: self.hi.iter().map(|h| h.max(largest)).collect(),
        }
    }

    /// Repeats each channel's range `repeat` times: per channel to per
    /// feature after a flatten.
    fn repeated(&self, repeat: usize) -> Self {
        if self.len() == 1 {
            return self.clone();
        }
        let spread = |v: &[f64]| v.iter().flat_map(|&x| std::iter::repeat_n(x, repeat)).collect();
        Edge {
            lo: spread(&self.lo),
            hi: spread(&self.hi),
        }
    }

    /// Returns the value of channel `c`, broadcasting a single one.
    fn at(values: &[f64], c: usize) -> f64 {
        values[c.min(values.len() - 1)]
    }

    /// Returns `n` values of each bound.
    fn broadcast(&self, n: usize) -> Self {
        Edge {
            lo: (0..n).map(|c| Edge::at(&self.lo, c)).collect(),
            hi: (0..n).map(|c| Edge::at(&self.hi, c)).collect(),
        }
    }

    /// Returns the range of the sum of two signals, whose bounds add.
    fn plus(&self, other: &Edge) -> Self {
        let n = self.len().max(other.len());
        Edge {
            lo: (0..n).map(|c| Edge::at(&self.lo, c) + Edge::at(&other.lo, c)).collect(),
            hi: (0..n).map(|c| Edge::at(&self.hi, c) + Edge::at(&other.hi, c)).collect(),
        }
        .collapsed()
    }
}

/// Settings and position of the transformation, for error messages.
struct Context<'a> {
    options: &'a TransformOptions,
    path: String,
}

impl Context<'_> {
    fn error(&self, index: usize, message: String) -> Error {
        Error::Transform {
            layer: index,
            message: format!("{}.{index}: {message}", self.path),
        }
    }
}

/// Returns the true padding values, one or one per channel, that the
/// first layer from `start` on that reads values, past those that keep the
/// range, pads its input with; `None` when it does not pad.
fn pad_values(layers: &[Layer], start: usize) -> Option<Vec<f64>> {
    for layer in layers.iter().skip(start) {
        match layer {
            Layer::Conv2d(Conv2d { padding, pad_value, .. }) | Layer::Conv1d(Conv1d { padding, pad_value, .. })
                if *padding > 0 =>
            {
                return Some(if pad_value.is_empty() { vec![0.0] } else { pad_value.clone() })
            }
            Layer::AvgPool2d(p) if p.padding > 0 => return Some(vec![0.0]),
            Layer::AvgPool2d(_)
            | Layer::MaxPool2d(_)
            | Layer::Flatten
            | Layer::Dropout(_)
            | Layer::GlobalAvgPool
            | Layer::AdaptiveAvgPool2d(_) => continue,
            Layer::Residual(r) => {
                let mut values: Vec<f64> = Vec::new();
                for branch in [&r.main, &r.shortcut] {
                    values.extend(pad_values(branch, 0).unwrap_or_default());
                }
                return (!values.is_empty()).then_some(values);
            }
            _ => return None,
        }
    }
    None
}

/// Transforms a chain of layers reading `edge`; returns the layers and the
/// edge they drive.
fn transform_chain(
    layers: &[Layer],
    input_shape: &[usize],
    mut edge: Edge,
    context: &mut Context,
) -> Result<(Vec<NonnegLayer>, Edge)> {
    let options = context.options;
    let mut shape = input_shape.to_vec();
    let mut out = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let next = match layer {
            Layer::Linear(l) => {
                let (affine, output) = transform_affine(&l.weight, &l.bias, AffineOp::Linear, &edge, options)?;
                tracing::debug!(layer = %format!("{}.{i}", context.path), shift = affine.shift, "transformed linear layer");
                edge = output;
                NonnegLayer::Affine(affine)
            }
            Layer::Conv2d(c) => {
                let op = AffineOp::Conv2d {
                    stride: c.stride,
                    padding: c.padding,
                    dilation: c.dilation,
                    groups: c.groups,
                };
                NonnegLayer::Affine(transform_conv(&c.weight, &c.bias, op, &c.pad_value, &mut edge, context, i)?)
            }
            Layer::Conv1d(c) => {
                let op = AffineOp::Conv1d {
                    stride: c.stride,
                    padding: c.padding,
                    dilation: c.dilation,
                    groups: c.groups,
                };
                NonnegLayer::Affine(transform_conv(&c.weight, &c.bias, op, &c.pad_value, &mut edge, context, i)?)
            }
            Layer::Activation(act) => {
                let input_offset = edge.scalar_lo().ok_or_else(|| {
                    context.error(
                        i,
                        format!(
                            "activation {act} reads a signal with a different offset per channel; \
                             put an affine layer before it"
                        ),
                    )
                })?;
                let (lo, hi) = activation_range(act, options).map_err(|m| context.error(i, m))?;
                edge = Edge::scalar(lo, hi);
                if let Some(values) = pad_values(layers, i + 1) {
                    edge = edge.including_all(&values);
                }
                tracing::debug!(activation = %act, input_offset, output_lo = edge.lo[0], "shifted activation");
                NonnegLayer::Activation(NonnegActivation {
                    activation: act.clone(),
                    input_offset,
                    output_offset: edge.lo[0],
                })
            }
            Layer::AvgPool2d(p) if p.padding > 0 => {
                edge = padded_edge(&edge, &[]).map_err(|m| context.error(i, m))?;
                NonnegLayer::PaddedAvgPool2d {
                    pool: *p,
                    pad: edge.lo.iter().map(|l| -l).collect(),
                }
            }
            Layer::AvgPool2d(p) => NonnegLayer::AvgPool2d(*p),
            Layer::MaxPool2d(p) => NonnegLayer::MaxPool2d(*p),
            Layer::Flatten => {
                edge = edge.repeated(shape[1..].iter().product());
                NonnegLayer::Flatten
            }
            Layer::GlobalAvgPool => NonnegLayer::GlobalAvgPool,
            Layer::AdaptiveAvgPool2d(size) => NonnegLayer::AdaptiveAvgPool2d(*size),
            Layer::Dropout(p) => NonnegLayer::Dropout(*p),
            Layer::Residual(r) => {
                let outer = std::mem::take(&mut context.path);
                context.path = format!("{outer}.{i}.main");
                let (main, main_edge) = transform_chain(&r.main, &shape, edge.clone(), context)?;
                context.path = format!("{outer}.{i}.shortcut");
                let (shortcut, shortcut_edge) = transform_chain(&r.shortcut, &shape, edge.clone(), context)?;
                context.path = outer;
                edge = main_edge.plus(&shortcut_edge);
                NonnegLayer::Residual(NonnegResidual { main, shortcut })
            }
            Layer::Elman(e) => {
                let elman = transform_elman(e, &shape, &edge, options).map_err(|m| context.error(i, m))?;
                edge = Edge::scalar(-elman.initial_state, elman.activation_hi());
                NonnegLayer::Elman(elman)
            }
            Layer::BatchNorm(_) => {
                return Err(context.error(i, "batch normalisation was not folded; this is a bug".into()))
            }
        };
        shape = layer.output_shape(&shape).map_err(|m| context.error(i, m))?;
        out.push(next);
    }
    Ok((out, edge))
}

/// Transforms convolution `i` of the chain, reading `edge`, with true
/// padding values `pad_value` (zeros when empty); replaces `edge` by the
/// one it drives.
fn transform_conv(
    weight: &Tensor,
    bias: &Tensor,
    op: AffineOp,
    pad_value: &[f64],
    edge: &mut Edge,
    context: &Context,
    i: usize,
) -> Result<NonnegAffine> {
    let padding = match op {
        AffineOp::Conv2d { padding, .. } | AffineOp::Conv1d { padding, .. } => padding,
        AffineOp::Linear => 0,
    };
    let pad = if padding > 0 { pad_value.to_vec() } else { Vec::new() };
    if padding > 0 {
        *edge = padded_edge(edge, &pad).map_err(|m| context.error(i, m))?;
    }
    let (mut affine, output) = transform_affine(weight, bias, op, edge, context.options)?;
    affine.pad = pad;
    tracing::debug!(layer = %format!("{}.{i}", context.path), shift = affine.shift, ?op, "transformed convolution");
    *edge = output;
    Ok(affine)
}

/// Returns the range given to an activation's output.
fn activation_range(act: &Activation, options: &TransformOptions) -> std::result::Result<(f64, f64), String> {
    let Some((f_lo, f_hi)) = act.output_bounds() else {
        return Err(format!(
            "activation {act} is unbounded, so the next layer has no input range; \
             bound it first with `isonn bound` (ReLU-N or GELU-N with a fixed or calibrated N) \
             or train with a bounded version (e.g. --activation relu-n:6 or gelu-n:6)"
        ));
    };
    let lo = match options.activation_range {
        ActivationRange::Method => f_lo.min(0.0),
        ActivationRange::Tight => f_lo,
    };
    Ok((lo, f_hi))
}

/// Widens the upper bounds of an edge read by a padded layer to include
/// its true padding values `pad` (zeros when empty), which changes no
/// physical value. An edge whose lower bound is above a padding value
/// cannot represent that pad and is rejected.
fn padded_edge(edge: &Edge, pad: &[f64]) -> std::result::Result<Edge, String> {
    let pad = if pad.is_empty() { &[0.0][..] } else { pad };
    let n = edge.len().max(pad.len());
    let wide = edge.broadcast(n);
    for c in 0..n {
        let (lo, q) = (wide.lo[c], Edge::at(pad, c));
        if lo > q {
            return Err(format!(
                "padding value {q} of channel {c} is below the signal's lower bound {lo}, and only an \
                 activation or the input can move that bound; pad after an activation"
            ));
        }
    }
    Ok(Edge {
        lo: wide.lo.clone(),
        hi: (0..n).map(|c| wide.hi[c].max(Edge::at(pad, c))).collect(),
    }
    .collapsed())
}

/// Transforms an Elman cell reading `edge` (per channel of its
/// `[channels, steps, width]` input).
fn transform_elman(
    cell: &Elman,
    shape: &[usize],
    edge: &Edge,
    options: &TransformOptions,
) -> std::result::Result<NonnegElman, String> {
    let (features, hidden) = (cell.features(), cell.hidden());
    let width = shape.get(2).copied().unwrap_or(1);
    let (state_lo, state_hi) = activation_range(&cell.activation, options)?;
    // The state starts at h_0 = 0, so its range must contain 0.
    let state = Edge::scalar(state_lo.min(0.0), state_hi.max(0.0)).broadcast(hidden);
    let input = edge.repeated(width).broadcast(features);
    let combined = Edge {
        lo: input.lo.iter().chain(&state.lo).copied().collect(),
        hi: input.hi.iter().chain(&state.hi).copied().collect(),
    };
    let weight = Tensor::cat(&[&cell.input_weight, &cell.recurrent_weight], 1).map_err(|e| e.to_string())?;
    let (affine, _) =
        transform_affine(&weight, &cell.bias, AffineOp::Linear, &combined, options).map_err(|e| e.to_string())?;
    let activation = NonnegActivation {
        activation: cell.activation.clone(),
        input_offset: -affine.shift,
        output_offset: state.lo[0],
    };
    Ok(NonnegElman {
        affine,
        activation,
        initial_state: -state.lo[0],
    })
}

impl NonnegElman {
    /// Returns the upper bound of the state's true value.
    fn activation_hi(&self) -> f64 {
        let hi = self.activation.activation.output_bounds().map_or(0.0, |(_, hi)| hi);
        hi.max(0.0)
    }
}

/// Returns the input channel (or feature) that entry `j` of row `i` of a
/// flattened weight reads.
fn channel_of(op: AffineOp, out_units: usize, group_inputs: usize, receptive: usize, i: usize, j: usize) -> usize {
    let group = i / (out_units / op.groups()).max(1);
    group * group_inputs + j / receptive
}

/// Splits one affine layer reading `edge`; see [`transform`]. Returns the
/// layer and the edge it drives, `[-s, max z'_i - s]` per unit.
fn transform_affine(
    weight: &Tensor,
    bias: &Tensor,
    op: AffineOp,
    edge: &Edge,
    options: &TransformOptions,
) -> Result<(NonnegAffine, Edge)> {
    let dtype = weight.dtype();
    let dims = weight.dims().to_vec();
    let (out_units, group_inputs) = (dims[0], dims[1]);
    let receptive: usize = dims[2..].iter().product();
    let rows: Vec<Vec<f64>> = weight
        .reshape((out_units, ()))?
        .to_dtype(DType::F64)?
        .to_vec2()?;
    let b: Vec<f64> = bias.to_dtype(DType::F64)?.to_vec1()?;
    let alpha = edge.alpha();
    let channel = |i: usize, j: usize| channel_of(op, out_units, group_inputs, receptive, i, j);

    // c_i = b_i + sum_j W_ij lo_j - sum_j N_ij alpha_j
    let c: Vec<f64> = rows
        .iter()
        .zip(&b)
        .enumerate()
        .map(|(i, (row, bi))| {
            let offset: f64 = row.iter().enumerate().map(|(j, w)| w * Edge::at(&edge.lo, channel(i, j))).sum();
            let negative: f64 = row
                .iter()
                .enumerate()
                .map(|(j, w)| (-w).max(0.0) * Edge::at(&alpha, channel(i, j)))
                .sum();
            bi + offset - negative
        })
        .collect();
    let shift = options.shift.shift(&c);
    let shifted: Vec<f64> = c.iter().map(|ci| (ci + shift).max(0.0)).collect();

    // Full scale of z'_i: sum_j |W_ij| alpha_j + c_i + s.
    let unit_max: Vec<f64> = rows
        .iter()
        .zip(&shifted)
        .enumerate()
        .map(|(i, (row, bias))| {
            let swing: f64 = row.iter().enumerate().map(|(j, w)| w.abs() * Edge::at(&alpha, channel(i, j))).sum();
            swing + bias
        })
        .collect();
    let out_max = unit_max.iter().copied().fold(0.0f64, f64::max);

    let positive = weight.relu()?.detach();
    let negative = weight.neg()?.relu()?.detach();
    let bias = Tensor::new(shifted.as_slice(), weight.device())?
        .to_dtype(dtype)?
        .relu()?; // rounding to f32 cannot make a bias negative
    let output = Edge {
        lo: vec![-shift; out_units],
        hi: unit_max.iter().map(|m| m - shift).collect(),
    }
    .collapsed();
    let affine = NonnegAffine {
        op,
        positive,
        negative,
        bias,
        lo: edge.lo.clone(),
        alpha,
        shift,
        out_max,
        pad: Vec::new(),
    };
    Ok((affine, output))
}

/// Maps a non-negative network back to the regular network it implements:
/// `W = P - N`, `b = (c + s) - s + N alpha - W lo`.
///
/// Useful after non-negative training, to check that the network stayed
/// isomorphic, and to run it on signed hardware.
pub fn inverse(network: &NonnegNetwork) -> Result<Network> {
    let layers = inverse_chain(&network.layers)?;
    let mut out = Network::new(&network.input_shape, network.input_range, layers);
    out.channel_ranges = network.channel_ranges.clone();
    Ok(out)
}

fn inverse_chain(layers: &[NonnegLayer]) -> Result<Vec<Layer>> {
    let mut out = Vec::with_capacity(layers.len());
    for layer in layers {
        out.push(match layer {
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
                        pad_value: a.pad.clone(),
                    }),
                    AffineOp::Conv1d {
                        stride,
                        padding,
                        dilation,
                        groups,
                    } => Layer::Conv1d(Conv1d {
                        weight,
                        bias,
                        stride,
                        padding,
                        dilation,
                        groups,
                        pad_value: a.pad.clone(),
                    }),
                }
            }
            NonnegLayer::Activation(a) => Layer::Activation(a.activation.clone()),
            NonnegLayer::AvgPool2d(p) => Layer::AvgPool2d(*p),
            NonnegLayer::PaddedAvgPool2d { pool, .. } => Layer::AvgPool2d(*pool),
            NonnegLayer::MaxPool2d(p) => Layer::MaxPool2d(*p),
            NonnegLayer::Flatten => Layer::Flatten,
            NonnegLayer::GlobalAvgPool => Layer::GlobalAvgPool,
            NonnegLayer::AdaptiveAvgPool2d(size) => Layer::AdaptiveAvgPool2d(*size),
            NonnegLayer::Dropout(p) => Layer::Dropout(*p),
            NonnegLayer::Residual(r) => Layer::Residual(Residual {
                main: inverse_chain(&r.main)?,
                shortcut: inverse_chain(&r.shortcut)?,
            }),
            NonnegLayer::Elman(e) => {
                let a = &e.affine;
                let weight = a.positive.sub(&a.negative)?;
                let bias = inverse_bias(a, &weight)?;
                let features = e.features();
                Layer::Elman(Elman {
                    input_weight: weight.narrow(1, 0, features)?.contiguous()?,
                    recurrent_weight: weight.narrow(1, features, e.hidden())?.contiguous()?,
                    bias,
                    activation: e.activation.activation.clone(),
                })
            }
        });
    }
    Ok(out)
}

/// `b = bias - s + sum_j N_ij alpha_j - sum_j W_ij lo_j`, per input channel
/// when `lo` and `alpha` have one value per channel.
fn inverse_bias(a: &NonnegAffine, weight: &Tensor) -> Result<Tensor> {
    let dims = weight.dims();
    let (out_units, group_inputs) = (dims[0], dims[1]);
    let receptive: usize = dims[2..].iter().product();
    let w: Vec<Vec<f64>> = weight.reshape((out_units, ()))?.to_dtype(DType::F64)?.to_vec2()?;
    let n: Vec<Vec<f64>> = a.negative.reshape((out_units, ()))?.to_dtype(DType::F64)?.to_vec2()?;
    let stored: Vec<f64> = a.bias.to_dtype(DType::F64)?.to_vec1()?;
    let b: Vec<f64> = (0..out_units)
        .map(|i| {
            let channel = |j: usize| channel_of(a.op, out_units, group_inputs, receptive, i, j);
            let len = w[i].len();
            let complement: f64 = (0..len).map(|j| n[i][j] * Edge::at(&a.alpha, channel(j))).sum();
            let offset: f64 = (0..len).map(|j| w[i][j] * Edge::at(&a.lo, channel(j))).sum();
            stored[i] - a.shift + complement - offset
        })
        .collect();
    Ok(Tensor::new(b.as_slice(), weight.device())?.to_dtype(weight.dtype())?)
}
