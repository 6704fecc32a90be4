//! Non-negative isomorphic networks and their physical forward pass.
//!
//! Every signal edge carries a physical value `v >= 0` and a known offset
//! `o`, so that the true value is `x = v + o`. An affine layer reads the
//! signal `u` in `[0, alpha]` and its complement `alpha - u`, and computes
//! `z' = P u + N (alpha - u) + bias` with `P`, `N` and `bias` all `>= 0`;
//! the true pre-activation is `z = z' - s`. An activation device reading an
//! edge with offset `o` computes `f(v + o)` and emits `f(...) - lo_out`.

mod transform;

pub use transform::{inverse, transform, ActivationRange, ShiftPolicy, TransformOptions, SHIFT_MARGIN};

use candle_core::{DType, Device, Tensor, Var};

use crate::activation::Activation;
use crate::error::Result;
use crate::model::{Pool, Range};

/// The linear operation of a non-negative affine layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffineOp {
    /// Fully connected, weights `[out, in]`.
    Linear,
    /// 2-D convolution, weights `[out, in / groups, k, k]`.
    Conv2d {
        /// Step between output positions.
        stride: usize,
        /// Pixels added on every side (with the physical padding values).
        padding: usize,
        /// Spacing between kernel taps.
        dilation: usize,
        /// Channel groups.
        groups: usize,
    },
    /// 1-D convolution over each row, weights `[out, in / groups, k]`.
    Conv1d {
        /// Step between output positions.
        stride: usize,
        /// Samples added at both ends of each row (with the physical
        /// padding values).
        padding: usize,
        /// Spacing between kernel taps.
        dilation: usize,
        /// Channel groups.
        groups: usize,
    },
}

impl AffineOp {
    /// Returns the number of channel groups; 1 for a linear layer.
    pub fn groups(self) -> usize {
        match self {
            AffineOp::Linear => 1,
            AffineOp::Conv2d { groups, .. } | AffineOp::Conv1d { groups, .. } => groups,
        }
    }
}

/// A non-negative affine layer `z' = P u + N (alpha - u) + bias`.
///
/// `lo` and `alpha` are the input range `[lo, lo + alpha]` of the true
/// signal, one value for the layer or one per input channel. `shift` is the
/// `s` that the next device subtracts: the true output is `z' - shift`.
#[derive(Debug, Clone)]
pub struct NonnegAffine {
    /// The linear operation and its settings.
    pub op: AffineOp,
    /// `P = max(W, 0)`, applied to the signal.
    pub positive: Tensor,
    /// `N = max(-W, 0)`, applied to the complement.
    pub negative: Tensor,
    /// The shifted bias `c + s`, `[out]`.
    pub bias: Tensor,
    /// Lower bound of the true input, per input channel or one value.
    pub lo: Vec<f64>,
    /// Width of the input range, per input channel or one value.
    pub alpha: Vec<f64>,
    /// The activation shift `s >= 0`.
    pub shift: f64,
    /// Upper bound of `z'` over all units: the detector's full scale.
    pub out_max: f64,
    /// True value of a convolution's padding, one value or one per input
    /// channel; empty for zeros. The signal is padded with `pad - lo` and
    /// the complement with `lo + alpha - pad`.
    pub pad: Vec<f64>,
}

/// An activation device operated with its input shifted.
#[derive(Debug, Clone, PartialEq)]
pub struct NonnegActivation {
    /// The response.
    pub activation: Activation,
    /// Offset `o` of the edge it reads: it computes `f(v + o)`.
    pub input_offset: f64,
    /// Offset of the edge it drives: it emits `f(v + o) - output_offset`.
    pub output_offset: f64,
}

/// One step of a non-negative network.
#[derive(Debug, Clone)]
pub enum NonnegLayer {
    /// Non-negative affine layer.
    Affine(NonnegAffine),
    /// Shifted activation.
    Activation(NonnegActivation),
    /// Average pooling without padding (commutes with a constant offset).
    AvgPool2d(Pool),
    /// Max pooling (commutes with a constant offset). Padding is the
    /// physical value 0, the lower bound of the edge, so it is never
    /// selected where the regular network's minus infinity is not.
    MaxPool2d(Pool),
    /// `[batch, c, h, w]` -> `[batch, c * h * w]`.
    Flatten,
    /// Zero-padded average pooling: a true 0 is the physical value `pad`
    /// (`-lo` of the edge, one value or one per channel).
    PaddedAvgPool2d {
        /// Window, stride and padding.
        pool: Pool,
        /// Physical value of the padding.
        pad: Vec<f64>,
    },
    /// A residual block: the physical signals of the branches add, and so
    /// do their offsets.
    Residual(NonnegResidual),
    /// An Elman cell over the rows of its input.
    Elman(NonnegElman),
    /// The mean of each channel (commutes with a per-channel offset).
    GlobalAvgPool,
    /// Adaptive average pooling to a fixed size.
    AdaptiveAvgPool2d([usize; 2]),
    /// Dropout: the identity, in inference and in non-negative training,
    /// because scaling a physical signal `v = x - o` by `1 / (1 - p)` does
    /// not scale the true value `x`.
    Dropout(f64),
}

/// A residual block of a non-negative network.
#[derive(Debug, Clone)]
pub struct NonnegResidual {
    /// The main branch.
    pub main: Vec<NonnegLayer>,
    /// The shortcut; empty for the identity.
    pub shortcut: Vec<NonnegLayer>,
}

/// A non-negative Elman cell. At each step one affine layer reads the
/// step's input `x_t` and the state, `z' = P [u_t; v] + N (alpha - [u_t; v]) + bias`,
/// and the activation device turns it into the next physical state `v`.
#[derive(Debug, Clone)]
pub struct NonnegElman {
    /// The affine layer over `features + hidden` inputs; its `lo` and
    /// `alpha` have one value per input.
    pub affine: NonnegAffine,
    /// The activation, reading `z'` with offset `-shift` and driving the
    /// state edge.
    pub activation: NonnegActivation,
    /// Physical value of the initial state `h_0 = 0`, that is `-lo` of the
    /// state edge.
    pub initial_state: f64,
}

impl NonnegElman {
    /// Returns the number of input features per step.
    pub fn features(&self) -> usize {
        self.affine.positive.dims()[1] - self.hidden()
    }

    /// Returns the size of the state.
    pub fn hidden(&self) -> usize {
        self.affine.positive.dims()[0]
    }

    /// Runs the cell on the physical input, observing every step's signals.
    ///
    /// # Shapes
    /// `v`: `[batch, channels, steps, width]` -> `[batch, hidden]`.
    pub fn forward(&self, v: &Tensor, observe: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<Tensor> {
        let batch = v.dims()[0];
        let mut state = Tensor::full(self.initial_state, (batch, self.hidden()), v.device())?.to_dtype(v.dtype())?;
        for step in crate::model::sequence(v)? {
            let u = Tensor::cat(&[&step, &state], 1)?;
            let z = self.affine.forward(&u, observe)?;
            state = self.activation.forward(&z)?;
            observe("state", &state)?;
        }
        Ok(state)
    }
}

/// A non-negative isomorphic network.
#[derive(Debug, Clone)]
pub struct NonnegNetwork {
    /// Shape of one input sample.
    pub input_shape: Vec<usize>,
    /// Range of the true input; the modulators emit `x - input_range.lo`.
    pub input_range: Range,
    /// Ranges per input channel, each within `input_range`, or empty; with
    /// them the modulator of channel `c` emits `x - channel_ranges[c].lo`.
    pub channel_ranges: Vec<Range>,
    /// The layers.
    pub layers: Vec<NonnegLayer>,
    /// Offset of the last edge: logits are the physical output plus this.
    pub output_offset: f64,
}

/// Computes the complement port's signal `max(alpha - u, 0)`, with the
/// gradient of `alpha - u` (-1 for every element).
///
/// When `u` reaches `alpha`, rounding can make the difference -1 ulp, and
/// the clamp removes exactly that, so every physical signal is `>= 0`. An
/// input above its range shows as a signal above alpha in the verification
/// report. The clamp must not cut the gradient. An f32 signal from a unit
/// at its full scale can round to just above `alpha`, and there a relu's
/// gradient would drop the `-N` path that the training form
/// `(P - N) u + N alpha` keeps, so the two forms would train differently.
fn complement_port(alpha: &Tensor, u: &Tensor) -> Result<Tensor> {
    let difference = alpha.broadcast_sub(u)?;
    let rounding = difference.relu()?.sub(&difference)?.detach();
    Ok(difference.add(&rounding)?)
}

impl NonnegAffine {
    /// Broadcasts per-channel values to the shape of the layer's input.
    fn channel_tensor(&self, values: &[f64], like: &Tensor) -> Result<Tensor> {
        let t = Tensor::new(values, like.device())?.to_dtype(like.dtype())?;
        Ok(match (self.op, values.len()) {
            (_, 1) => t.reshape(())?,
            (AffineOp::Linear, n) => t.reshape((1, n))?,
            (AffineOp::Conv2d { .. } | AffineOp::Conv1d { .. }, n) => t.reshape((1, n, 1, 1))?,
        })
    }

    /// Computes the physical output `z' = P u + N (alpha - u) + bias`,
    /// passing each physical signal to `observe`.
    ///
    /// # Shapes
    /// `u`: `[batch, in]` or `[batch, c, h, w]` -> `[batch, out]` or
    /// `[batch, out, h', w']`.
    pub fn forward(&self, u: &Tensor, observe: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<Tensor> {
        let alpha = self.channel_tensor(&self.alpha, u)?;
        let complement = complement_port(&alpha, u)?;
        let z = match self.op {
            AffineOp::Linear => {
                observe("signal", u)?;
                observe("complement", &complement)?;
                u.matmul(&self.positive.t()?)?
                    .add(&complement.matmul(&self.negative.t()?)?)?
                    .broadcast_add(&self.bias)?
            }
            AffineOp::Conv2d { .. } | AffineOp::Conv1d { .. } => {
                // A true pad q is u = q - lo on the signal and lo + alpha - q
                // on the complement.
                let (signal_pad, complement_pad) = self.pad_values();
                let u = self.pad_input(u, &signal_pad)?;
                let complement = self.pad_input(&complement, &complement_pad)?;
                observe("signal", &u)?;
                observe("complement", &complement)?;
                let p = self.convolve(&u, &self.positive)?;
                let n = self.convolve(&complement, &self.negative)?;
                crate::ops::add_channel_bias(&p.add(&n)?, &self.bias)?
            }
        };
        observe("output", &z)?;
        Ok(z)
    }

    /// Computes the same `z'` as [`forward`](Self::forward) by the identity
    /// `P u + N (alpha - u) = (P - N) u + N alpha`: one GEMM over the signal
    /// instead of two over the signal and the complement. The gradients for
    /// `P`, `N` and `bias` are the same as those of the physical form.
    ///
    /// It is for training without a hardware model. It leaves out the
    /// physical complement port, so it neither observes signals nor removes
    /// the rounding of `alpha - u` below 0, which the physical form clips
    /// without changing the gradient.
    pub fn forward_training(&self, u: &Tensor) -> Result<Tensor> {
        match self.op {
            AffineOp::Linear => crate::ops::nonneg_linear(u, &self.positive, &self.negative, &self.bias, &self.alpha),
            AffineOp::Conv2d { .. } | AffineOp::Conv1d { .. } => {
                let (z, bias) = self.convolution_training_parts(u)?;
                crate::ops::add_channel_bias(&z, &bias)
            }
        }
    }

    /// Returns the training form of a convolution layer in two parts: the
    /// convolution of the padded `u` with `P - N`, and the per-channel bias
    /// `N alpha + bias` to add to it. For a linear layer it returns an error.
    fn convolution_training_parts(&self, u: &Tensor) -> Result<(Tensor, Tensor)> {
        let (AffineOp::Conv2d { dilation, .. } | AffineOp::Conv1d { dilation, .. }) = self.op else {
            return Err(crate::Error::Shape("a linear layer has no convolution parts".into()));
        };
        let weight = self.positive.sub(&self.negative)?;
        // Padding with the physical value q - lo keeps alpha - u equal
        // to the complement's pad value lo + alpha - q.
        let (signal_pad, _) = self.pad_values();
        let u = self.pad_input(u, &signal_pad)?;
        // N alpha is the convolution of N with an image of alpha,
        // exactly one kernel extent in size (one row for conv1d).
        let dims = self.negative.dims();
        let extent = |k: usize| dilation * (k - 1) + 1;
        let (height, width) = match dims[2..] {
            [kernel_h, kernel_w] => (extent(kernel_h), extent(kernel_w)),
            _ => (1, extent(dims[2])),
        };
        let alpha_image = self
            .channel_tensor(&self.alpha, &u)?
            .broadcast_as((1, u.dims()[1], height, width))?
            .contiguous()?;
        let bias = self
            .convolve(&alpha_image, &self.negative)?
            .reshape(dims[0])?
            .add(&self.bias)?;
        Ok((self.convolve(&u, &weight)?, bias))
    }

    /// Pads a convolution's input `x` with `values` (one or one per
    /// channel): on every side for conv2d, at both ends of each row for
    /// conv1d.
    fn pad_input(&self, x: &Tensor, values: &[f64]) -> Result<Tensor> {
        let values = self.channel_tensor(values, x)?;
        match self.op {
            AffineOp::Conv2d { padding, .. } => crate::ops::pad_constant(x, padding, &values),
            AffineOp::Conv1d { padding, .. } => crate::ops::pad_width_constant(x, padding, &values),
            AffineOp::Linear => Ok(x.clone()),
        }
    }

    /// Convolves the padded input `x` with `kernel` (`P`, `N` or `P - N`).
    fn convolve(&self, x: &Tensor, kernel: &Tensor) -> Result<Tensor> {
        match self.op {
            AffineOp::Conv2d {
                stride,
                dilation,
                groups,
                ..
            } => crate::ops::conv2d(x, kernel, 0, stride, dilation, groups),
            AffineOp::Conv1d {
                stride,
                dilation,
                groups,
                ..
            } => crate::ops::conv1d_rows(x, kernel, stride, dilation, groups),
            AffineOp::Linear => Ok(x.matmul(&kernel.t()?)?),
        }
    }

    /// Returns the physical padding values of the signal and of the
    /// complement, one or one per input channel.
    pub(crate) fn pad_values(&self) -> (Vec<f64>, Vec<f64>) {
        let pad = if self.pad.is_empty() { &[0.0][..] } else { &self.pad[..] };
        let n = self.lo.len().max(self.alpha.len()).max(pad.len());
        let at = |v: &[f64], c: usize| v[c.min(v.len() - 1)];
        // A pad on a bound of the range rounds to about -1 ulp; the
        // transformation checks that every pad lies within the range, so
        // clamping at 0 changes only that rounding.
        let signal = (0..n).map(|c| (at(pad, c) - at(&self.lo, c)).max(0.0)).collect();
        let complement = (0..n)
            .map(|c| (at(&self.lo, c) + at(&self.alpha, c) - at(pad, c)).max(0.0))
            .collect();
        (signal, complement)
    }

    /// Returns the three parameter tensors, mutably.
    pub fn parameters_mut(&mut self) -> [&mut Tensor; 3] {
        [&mut self.positive, &mut self.negative, &mut self.bias]
    }

    /// Returns the three parameter tensors.
    pub fn parameters(&self) -> [&Tensor; 3] {
        [&self.positive, &self.negative, &self.bias]
    }
}

impl NonnegActivation {
    /// Computes `f(v + input_offset) - output_offset`.
    ///
    /// The device output is clamped to the activation's bounds, which is
    /// the identity in exact arithmetic and removes rounding above `max f`
    /// (f32 evaluates the photonic sigmoid's plateau 1.005 a little high).
    pub fn forward(&self, v: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::ops::shifted_activation(v, self.fused_op())? {
            return Ok(y);
        }
        self.forward_generic(v)
    }

    /// Returns the fused op that computes [`forward`](Self::forward).
    fn fused_op(&self) -> crate::ops::ShiftedActivation {
        crate::ops::ShiftedActivation {
            activation: self.activation.clone(),
            input_offset: self.input_offset,
            output_offset: self.output_offset,
            clamp: true,
        }
    }

    /// Computes [`forward`](Self::forward) with candle's generic ops, on any
    /// device: its fallback and its reference.
    pub fn forward_generic(&self, v: &Tensor) -> Result<Tensor> {
        let mut y = self.activation.forward_generic(&v.affine(1.0, self.input_offset)?)?;
        if let Some((lo, hi)) = self.activation.output_bounds() {
            y = y.clamp(lo, hi)?;
        }
        Ok(y.affine(1.0, -self.output_offset)?)
    }
}

impl NonnegNetwork {
    /// Computes the logits for a batch of true inputs `x`.
    ///
    /// # Shapes
    /// `x`: `[batch, channels, height, width]` -> `[batch, classes]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_observed(x, &mut |_, _, _| Ok(()))
    }

    /// Like [`forward`](Self::forward), passing every physical signal to
    /// `observe(layer, name, tensor)`; `layer` is `None` for the modulators.
    pub fn forward_observed(
        &self,
        x: &Tensor,
        observe: &mut dyn FnMut(Option<usize>, &str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let v = self.physical_output(x, observe)?;
        Ok(v.affine(1.0, self.output_offset)?)
    }

    /// Computes the physical output of the last layer (the logits minus
    /// `output_offset`), observing every physical signal.
    pub fn physical_output(
        &self,
        x: &Tensor,
        observe: &mut dyn FnMut(Option<usize>, &str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let v = self.modulate(x)?;
        observe(None, "modulator", &v)?;
        let mut v = v;
        for (i, layer) in self.layers.iter().enumerate() {
            v = layer.forward(&v, "", &mut |name, t| observe(Some(i), name, t))?;
        }
        Ok(v)
    }

    /// Returns the modulators' output, the physical input `x - lo`.
    pub fn modulate(&self, x: &Tensor) -> Result<Tensor> {
        // Inputs whose range starts at 0 are their own modulator outputs;
        // the subtraction would be a pass over the batch that changes no value.
        let starts_at_zero = match self.channel_ranges.as_slice() {
            [] => self.input_range.lo == 0.0,
            ranges => ranges.iter().all(|r| r.lo == 0.0),
        };
        if starts_at_zero {
            return Ok(x.clone());
        }
        if self.channel_ranges.is_empty() {
            return Ok(x.affine(1.0, -self.input_range.lo)?);
        }
        let lo: Vec<f64> = self.channel_ranges.iter().map(|r| r.lo).collect();
        let mut view = vec![1usize; x.rank()];
        view[1] = lo.len();
        let lo = Tensor::new(lo.as_slice(), x.device())?.to_dtype(x.dtype())?.reshape(view)?;
        Ok(x.broadcast_sub(&lo)?)
    }

    /// Computes the logits like [`forward`](Self::forward), with every
    /// affine layer in the training form [`NonnegAffine::forward_training`].
    /// The values agree with the physical forward pass up to rounding, and
    /// so do the gradients for every parameter.
    ///
    /// # Shapes
    /// `x`: `[batch, channels, height, width]` -> `[batch, classes]`.
    pub fn forward_training(&self, x: &Tensor) -> Result<Tensor> {
        let mut v = self.modulate(x)?;
        let mut i = 0;
        while i < self.layers.len() {
            let next = self.layers.get(i + 1);
            v = match (&self.layers[i], next) {
                // A convolution's bias and the photonic activation after it
                // run as one node (see crate::ops::bias_activation).
                (NonnegLayer::Affine(a), Some(NonnegLayer::Activation(f)))
                    if a.op != AffineOp::Linear && crate::ops::bias_activation_fuses(&v, &f.activation) =>
                {
                    let (z, bias) = a.convolution_training_parts(&v)?;
                    i += 1;
                    crate::ops::bias_activation(&z, &bias, f.fused_op())?
                }
                (NonnegLayer::Affine(a), _) => a.forward_training(&v)?,
                (other, _) => other.forward(&v, "", &mut |_, _| Ok(()))?,
            };
            i += 1;
        }
        Ok(v.affine(1.0, self.output_offset)?)
    }

    /// Returns whether the training form computes the physical form's
    /// values for any parameters, not only for those that the ranges were
    /// computed from.
    ///
    /// It does when each top-level affine layer reads the modulators or a
    /// bounded activation (through flatten or pooling), whose outputs stay
    /// in range whatever the weights. An affine layer that reads another
    /// one's `z'` (or a residual sum) has the range `[0, max z']` of the
    /// weights at transformation time. Training can move `z'` above it,
    /// where the physical complement is clamped at 0 and the training
    /// form's `alpha - u` goes negative.
    pub fn training_form_is_exact(&self) -> bool {
        let mut reads_weighted_sum = false;
        for layer in &self.layers {
            match layer {
                NonnegLayer::Affine(_) if reads_weighted_sum => return false,
                NonnegLayer::Affine(_) | NonnegLayer::Residual(_) => reads_weighted_sum = true,
                NonnegLayer::Activation(_) | NonnegLayer::Elman(_) => reads_weighted_sum = false,
                // Flatten and pooling keep the range of what they read.
                _ => {}
            }
        }
        true
    }

    /// Returns every affine layer, nested ones included, with the index of
    /// the top-level layer that contains it and the prefix of the names its
    /// signals are observed under (`""`, `"main.0."`, ...).
    pub fn affines(&self) -> Vec<(usize, String, &NonnegAffine)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            collect_affines(layer, i, "", &mut out);
        }
        out
    }

    /// Returns every affine layer mutably, in the order of [`affines`](Self::affines).
    pub fn affines_mut(&mut self) -> Vec<&mut NonnegAffine> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            collect_affines_mut(layer, &mut out);
        }
        out
    }

    /// Returns the top-level affine layers with their indices; affine
    /// layers inside blocks are in [`affines`](Self::affines).
    pub fn affine_layers(&self) -> impl Iterator<Item = (usize, &NonnegAffine)> {
        self.layers.iter().enumerate().filter_map(|(i, l)| match l {
            NonnegLayer::Affine(a) => Some((i, a)),
            _ => None,
        })
    }

    /// Returns whether the network is a plain chain, with no residual block
    /// or recurrent cell, and one input range for all channels: what the
    /// hardware model reads.
    pub fn is_chain(&self) -> bool {
        let nested = self
            .layers
            .iter()
            .any(|l| matches!(l, NonnegLayer::Residual(_) | NonnegLayer::Elman(_)));
        !nested && self.channel_ranges.is_empty()
    }

    /// Named parameters: `layers.{i}.positive`, `.negative` and `.bias`,
    /// with nested paths such as `layers.{i}.main.{j}.positive` for
    /// layers inside blocks.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (path, a) in self.affine_paths() {
            for (name, t) in ["positive", "negative", "bias"].iter().zip(a.parameters()) {
                out.push((format!("{path}.{name}"), t.clone()));
            }
        }
        out
    }

    /// Returns every affine layer with its parameter path (`layers.3`,
    /// `layers.4.main.0`, `layers.2.affine`), in the order of
    /// [`affines`](Self::affines).
    pub fn affine_paths(&self) -> Vec<(String, &NonnegAffine)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            collect_paths(layer, &format!("layers.{i}"), &mut out);
        }
        out
    }

    /// Turns every parameter into a candle [`Var`] in place and returns them,
    /// `P`, `N`, bias for each affine layer in order.
    pub fn make_trainable(&mut self) -> Result<Vec<Var>> {
        let mut vars = Vec::new();
        for a in self.affines_mut() {
            for t in a.parameters_mut() {
                let var = Var::from_tensor(t)?;
                *t = var.as_tensor().clone();
                vars.push(var);
            }
        }
        Ok(vars)
    }

    /// Returns a copy with every parameter converted to `dtype` and detached
    /// from autograd.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut out = self.clone();
        for a in out.affines_mut() {
            for t in a.parameters_mut() {
                *t = t.to_dtype(dtype)?.detach();
            }
        }
        Ok(out)
    }

    /// Returns the data type of the parameters.
    pub fn dtype(&self) -> DType {
        self.affines()
            .first()
            .map(|(_, _, a)| a.positive.dtype())
            .unwrap_or(DType::F32)
    }

    /// Returns the device of the parameters.
    pub fn device(&self) -> Device {
        self.affines()
            .first()
            .map(|(_, _, a)| a.positive.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// Returns the number of negative entries in the weights (`P` and `N`)
    /// and in the biases, counting non-finite entries as negative.
    pub fn count_negative(&self) -> Result<(usize, usize)> {
        let mut weights = 0;
        let mut biases = 0;
        for (_, _, a) in self.affines() {
            weights += count_negative(&a.positive)? + count_negative(&a.negative)?;
            biases += count_negative(&a.bias)?;
        }
        Ok((weights, biases))
    }
}

/// Counts entries that are `< 0` or not finite.
pub fn count_negative(t: &Tensor) -> Result<usize> {
    let values: Vec<f64> = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    Ok(values.iter().filter(|v| !(**v >= 0.0) || !v.is_finite()).count())
}

impl NonnegLayer {
    /// Applies the layer to a physical signal, passing the signals it
    /// produces to `observe` under names that start with `prefix`.
    pub fn forward(&self, v: &Tensor, prefix: &str, observe: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<Tensor> {
        let mut named = |name: &str, t: &Tensor| observe(&format!("{prefix}{name}"), t);
        Ok(match self {
            NonnegLayer::Affine(a) => a.forward(v, &mut named)?,
            NonnegLayer::Activation(a) => {
                let y = a.forward(v)?;
                named("output", &y)?;
                y
            }
            NonnegLayer::AvgPool2d(p) => v.avg_pool2d_with_stride(p.kernel, p.stride)?,
            NonnegLayer::MaxPool2d(p) => p.maximum(v, 0.0)?,
            NonnegLayer::Flatten => v.flatten_from(1)?,
            NonnegLayer::PaddedAvgPool2d { pool, pad } => {
                let pad = Tensor::new(pad.as_slice(), v.device())?.to_dtype(v.dtype())?;
                let pad = match pad.dims()[0] {
                    1 => pad.reshape(())?,
                    n => pad.reshape((1, n, 1, 1))?,
                };
                pool.average(v, &pad)?
            }
            NonnegLayer::Residual(r) => {
                let main = forward_branch(&r.main, v, &format!("{prefix}main."), observe)?;
                let shortcut = forward_branch(&r.shortcut, v, &format!("{prefix}shortcut."), observe)?;
                let sum = main.add(&shortcut)?;
                observe(&format!("{prefix}sum"), &sum)?;
                sum
            }
            NonnegLayer::Elman(e) => e.forward(v, &mut named)?,
            NonnegLayer::GlobalAvgPool => v.flatten_from(2)?.mean(2)?,
            NonnegLayer::AdaptiveAvgPool2d(size) => crate::model::adaptive_average(v, *size)?,
            NonnegLayer::Dropout(_) => v.clone(),
        })
    }
}

/// Applies a branch of a block, naming signals `{prefix}{j}.{name}`.
fn forward_branch(
    layers: &[NonnegLayer],
    v: &Tensor,
    prefix: &str,
    observe: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let mut h = v.clone();
    for (j, layer) in layers.iter().enumerate() {
        h = layer.forward(&h, &format!("{prefix}{j}."), observe)?;
    }
    Ok(h)
}

fn collect_affines<'a>(layer: &'a NonnegLayer, top: usize, prefix: &str, out: &mut Vec<(usize, String, &'a NonnegAffine)>) {
    match layer {
        NonnegLayer::Affine(a) => out.push((top, prefix.to_string(), a)),
        NonnegLayer::Elman(e) => out.push((top, prefix.to_string(), &e.affine)),
        NonnegLayer::Residual(r) => {
            for (branch, layers) in [("main", &r.main), ("shortcut", &r.shortcut)] {
                for (j, l) in layers.iter().enumerate() {
                    collect_affines(l, top, &format!("{prefix}{branch}.{j}."), out);
                }
            }
        }
        _ => {}
    }
}

fn collect_affines_mut<'a>(layer: &'a mut NonnegLayer, out: &mut Vec<&'a mut NonnegAffine>) {
    match layer {
        NonnegLayer::Affine(a) => out.push(a),
        NonnegLayer::Elman(e) => out.push(&mut e.affine),
        NonnegLayer::Residual(r) => {
            for l in r.main.iter_mut().chain(r.shortcut.iter_mut()) {
                collect_affines_mut(l, out);
            }
        }
        _ => {}
    }
}

fn collect_paths<'a>(layer: &'a NonnegLayer, path: &str, out: &mut Vec<(String, &'a NonnegAffine)>) {
    match layer {
        NonnegLayer::Affine(a) => out.push((path.to_string(), a)),
        NonnegLayer::Elman(e) => out.push((format!("{path}.affine"), &e.affine)),
        NonnegLayer::Residual(r) => {
            for (branch, layers) in [("main", &r.main), ("shortcut", &r.shortcut)] {
                for (j, l) in layers.iter().enumerate() {
                    collect_paths(l, &format!("{path}.{branch}.{j}"), out);
                }
            }
        }
        _ => {}
    }
}
