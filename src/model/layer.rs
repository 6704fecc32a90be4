//! The layers of a regular network.

use candle_core::{DType, Device, Tensor};

pub use super::block::{BatchNorm, Elman, Residual};
pub use super::conv1d::Conv1d;
use crate::activation::Activation;
use crate::error::Result;

/// A fully connected layer `z = W x + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weights, `[out_features, in_features]`.
    pub weight: Tensor,
    /// Biases, `[out_features]`.
    pub bias: Tensor,
}

impl Linear {
    /// Builds a layer with all weights and biases zero (f32, CPU).
    pub fn zeros(in_features: usize, out_features: usize) -> Result<Self> {
        Ok(Linear {
            weight: Tensor::zeros((out_features, in_features), DType::F32, &Device::Cpu)?,
            bias: Tensor::zeros(out_features, DType::F32, &Device::Cpu)?,
        })
    }

    /// Returns the number of inputs.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Returns the number of outputs.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// A 2-D convolution with zero padding, as in PyTorch's `Conv2d`, or with
/// a padding value per input channel.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Kernels, `[out_channels, in_channels / groups, kernel, kernel]`.
    pub weight: Tensor,
    /// Biases, `[out_channels]`.
    pub bias: Tensor,
    /// Step between output positions, in input pixels.
    pub stride: usize,
    /// Zeros added on every side of the input.
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Number of channel groups; each output channel reads one group.
    pub groups: usize,
    /// Value of the padding, one for all input channels or one per
    /// channel; empty for zeros. Folding a batch normalisation into the
    /// convolution after it sets it to the input that the normalisation
    /// maps to 0.
    pub pad_value: Vec<f64>,
}

impl Conv2d {
    /// Builds a square-kernel convolution with zero weights (f32, CPU).
    pub fn zeros(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Self> {
        let group_channels = in_channels / groups.max(1);
        Ok(Conv2d {
            weight: Tensor::zeros(
                (out_channels, group_channels, kernel, kernel),
                DType::F32,
                &Device::Cpu,
            )?,
            bias: Tensor::zeros(out_channels, DType::F32, &Device::Cpu)?,
            stride,
            padding,
            dilation,
            groups,
            pad_value: Vec::new(),
        })
    }

    /// `(out_channels, in_channels / groups, kernel_h, kernel_w)`.
    pub fn kernel_dims(&self) -> (usize, usize, usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1], d[2], d[3])
    }

    /// Applies the convolution to the weights `weight` (the layer's own
    /// settings, someone else's kernel); used by the non-negative layer too.
    pub fn convolve(&self, x: &Tensor, weight: &Tensor, padding: usize) -> Result<Tensor> {
        if self.pad_value.is_empty() || padding == 0 {
            return crate::ops::conv2d(x, weight, padding, self.stride, self.dilation, self.groups);
        }
        let values = Tensor::new(self.pad_value.as_slice(), x.device())?.to_dtype(x.dtype())?;
        let values = match self.pad_value.len() {
            1 => values.reshape(())?,
            n => values.reshape((1, n, 1, 1))?,
        };
        let padded = crate::ops::pad_constant(x, padding, &values)?;
        crate::ops::conv2d(&padded, weight, 0, self.stride, self.dilation, self.groups)
    }

    /// Checks the settings against an input of `[channels, height, width]`
    /// and returns the output shape.
    pub fn output_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let (out_c, group_c, kh, kw) = self.kernel_dims();
        let [c, h, w] = input else {
            return Err(format!("expects [channels, height, width] input, got {input:?}"));
        };
        if self.groups == 0 || self.stride == 0 || self.dilation == 0 || kh == 0 || kw == 0 {
            return Err("kernel size, groups, stride and dilation must be >= 1".into());
        }
        const LIMIT: usize = 1 << 16;
        if [kh, kw, self.stride, self.dilation, self.padding].iter().any(|&v| v > LIMIT) {
            return Err(format!("kernel, stride, dilation and padding must be at most {LIMIT}"));
        }
        if !(self.pad_value.len() <= 1 || self.pad_value.len() == *c) || self.pad_value.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "{} padding values for {c} input channels; give none, one or one per channel, all finite",
                self.pad_value.len()
            ));
        }
        if group_c * self.groups != *c || out_c % self.groups != 0 {
            return Err(format!(
                "kernel {:?} with {} groups does not fit {c} input channels",
                self.weight.dims(),
                self.groups
            ));
        }
        let extent = |k: usize| self.dilation * (k - 1) + 1;
        let (ph, pw) = (h + 2 * self.padding, w + 2 * self.padding);
        if ph < extent(kh) || pw < extent(kw) {
            return Err(format!("kernel {kh}x{kw} does not fit a {h}x{w} input"));
        }
        Ok(vec![
            out_c,
            (ph - extent(kh)) / self.stride + 1,
            (pw - extent(kw)) / self.stride + 1,
        ])
    }
}

/// Settings of a pooling layer, as PyTorch's `AvgPool2d` (zero padding,
/// counted in the average) and `MaxPool2d` (padding never selected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pool {
    /// Window size, square.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Pixels added on every side; at most half the window.
    #[serde(default)]
    pub padding: usize,
}

impl Pool {
    /// Builds an unpadded pool.
    pub fn new(kernel: usize, stride: usize) -> Self {
        Pool {
            kernel,
            stride,
            padding: 0,
        }
    }

    fn output_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let [c, h, w] = input else {
            return Err(format!("expects [channels, height, width] input, got {input:?}"));
        };
        if 2 * self.padding > self.kernel {
            return Err(format!(
                "padding {} is more than half the window {}",
                self.padding, self.kernel
            ));
        }
        let (ph, pw) = (h + 2 * self.padding, w + 2 * self.padding);
        if self.kernel == 0 || self.stride == 0 || ph < self.kernel || pw < self.kernel || self.stride > ph {
            return Err(format!(
                "window {} with stride {} and padding {} does not fit a {h}x{w} input",
                self.kernel, self.stride, self.padding
            ));
        }
        Ok(vec![
            *c,
            (ph - self.kernel) / self.stride + 1,
            (pw - self.kernel) / self.stride + 1,
        ])
    }

    /// Averages each window of `x` padded with `pad` (a scalar or
    /// `[1, channels, 1, 1]`); the padding counts in the average.
    pub fn average(&self, x: &Tensor, pad: &Tensor) -> Result<Tensor> {
        let padded = crate::ops::pad_constant(x, self.padding, pad)?;
        Ok(padded.avg_pool2d_with_stride(self.kernel, self.stride)?)
    }

    /// Takes the maximum of each window of `x` padded with `pad`, a value
    /// no larger than any entry of `x`, so that padding is never selected.
    pub fn maximum(&self, x: &Tensor, pad: f64) -> Result<Tensor> {
        let pad = Tensor::new(pad, x.device())?.to_dtype(x.dtype())?;
        let padded = crate::ops::pad_constant(x, self.padding, &pad)?;
        Ok(padded.max_pool2d_with_stride(self.kernel, self.stride)?)
    }
}

/// Whether a forward pass trains (batch statistics, dropout) or evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: batch normalisation uses and updates batch statistics.
    Train,
    /// Inference.
    Eval,
}

/// One step of a regular network.
#[derive(Debug, Clone)]
pub enum Layer {
    /// Fully connected.
    Linear(Linear),
    /// 2-D convolution.
    Conv2d(Conv2d),
    /// 1-D convolution over each row.
    Conv1d(Conv1d),
    /// Elementwise activation.
    Activation(Activation),
    /// Average over each window.
    AvgPool2d(Pool),
    /// Maximum over each window.
    MaxPool2d(Pool),
    /// `[batch, c, h, w]` -> `[batch, c * h * w]`.
    Flatten,
    /// Batch normalisation over channels.
    BatchNorm(BatchNorm),
    /// `main(x) + shortcut(x)`.
    Residual(Residual),
    /// Elman recurrent cell over the rows of its input.
    Elman(Elman),
    /// `[batch, c, h, w]` -> `[batch, c]`, the mean of each channel.
    GlobalAvgPool,
    /// Average pooling to a fixed `[height, width]`, as PyTorch's
    /// `AdaptiveAvgPool2d`: output cell `i` averages input rows
    /// `floor(i h / out) .. ceil((i + 1) h / out)`, and likewise for columns.
    AdaptiveAvgPool2d([usize; 2]),
    /// Dropout with drop probability `p`: the identity at inference.
    Dropout(f64),
}

impl Layer {
    /// Returns the layer's type as written in `model.json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Linear(_) => "linear",
            Layer::Conv2d(_) => "conv2d",
            Layer::Conv1d(_) => "conv1d",
            Layer::Activation(_) => "activation",
            Layer::AvgPool2d(_) => "avg-pool2d",
            Layer::MaxPool2d(_) => "max-pool2d",
            Layer::Flatten => "flatten",
            Layer::BatchNorm(_) => "batch-norm",
            Layer::Residual(_) => "residual",
            Layer::Elman(_) => "elman",
            Layer::GlobalAvgPool => "global-avg-pool",
            Layer::AdaptiveAvgPool2d(_) => "adaptive-avg-pool2d",
            Layer::Dropout(_) => "dropout",
        }
    }

    /// Applies the layer to a batch for inference.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_mode(x, Mode::Eval)
    }

    /// Applies the layer to a batch in `mode`.
    pub fn forward_mode(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(match self {
            Layer::Linear(l) => crate::ops::linear(x, &l.weight, &l.bias)?,
            Layer::Conv2d(c) => crate::ops::add_channel_bias(&c.convolve(x, &c.weight, c.padding)?, &c.bias)?,
            Layer::Conv1d(c) => crate::ops::add_channel_bias(&c.convolve(x, &c.weight, &c.pad_value)?, &c.bias)?,
            Layer::Activation(a) => a.forward(x)?,
            Layer::AvgPool2d(p) => p.average(x, &Tensor::new(0.0, x.device())?.to_dtype(x.dtype())?)?,
            Layer::MaxPool2d(p) => p.maximum(x, lowest(x.dtype()))?,
            Layer::Flatten => x.flatten_from(1)?,
            Layer::BatchNorm(bn) => bn.forward(x, mode)?,
            Layer::Residual(r) => {
                let main = forward_chain(&r.main, x, mode)?;
                let shortcut = forward_chain(&r.shortcut, x, mode)?;
                main.add(&shortcut)?
            }
            Layer::Elman(e) => e.forward(x)?,
            Layer::GlobalAvgPool => x.flatten_from(2)?.mean(2)?,
            Layer::AdaptiveAvgPool2d(size) => adaptive_average(x, *size)?,
            Layer::Dropout(p) => match mode {
                Mode::Train if *p > 0.0 => candle_nn::ops::dropout(x, *p as f32)?,
                _ => x.clone(),
            },
        })
    }

    /// Checks that the layer accepts one sample of `input` shape and returns
    /// the shape it produces.
    pub fn output_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        match self {
            Layer::Linear(l) => {
                if input.len() != 1 || input[0] != l.in_features() {
                    return Err(format!(
                        "expects {} input features, got shape {input:?}",
                        l.in_features()
                    ));
                }
                Ok(vec![l.out_features()])
            }
            Layer::Conv2d(c) => c.output_shape(input),
            Layer::Conv1d(c) => c.output_shape(input),
            Layer::AvgPool2d(p) | Layer::MaxPool2d(p) => p.output_shape(input),
            Layer::Activation(_) => Ok(input.to_vec()),
            Layer::Flatten => Ok(vec![input.iter().product()]),
            Layer::BatchNorm(bn) => {
                if input.is_empty() || input[0] != bn.channels() {
                    return Err(format!("normalises {} channels, got input {input:?}", bn.channels()));
                }
                if !(bn.eps > 0.0 && bn.eps.is_finite() && (0.0..=1.0).contains(&bn.momentum)) {
                    return Err(format!(
                        "eps {} must be finite and > 0, momentum {} in [0, 1]",
                        bn.eps, bn.momentum
                    ));
                }
                Ok(input.to_vec())
            }
            Layer::Residual(r) => {
                let main = chain_shape(&r.main, input).map_err(|m| format!("main branch: {m}"))?;
                let shortcut = chain_shape(&r.shortcut, input).map_err(|m| format!("shortcut: {m}"))?;
                if main != shortcut {
                    return Err(format!(
                        "the main branch produces {main:?} but the shortcut {shortcut:?}; \
                         they must agree to be added"
                    ));
                }
                Ok(main)
            }
            Layer::Elman(e) => e.output_shape(input),
            Layer::GlobalAvgPool => match input {
                [c, _, _] => Ok(vec![*c]),
                _ => Err(format!("expects [channels, height, width] input, got {input:?}")),
            },
            Layer::AdaptiveAvgPool2d([oh, ow]) => match input {
                [c, h, w] if *oh >= 1 && *ow >= 1 && oh <= h && ow <= w => Ok(vec![*c, *oh, *ow]),
                _ => Err(format!(
                    "cannot pool {input:?} to {oh}x{ow}; expects [channels, height, width] \
                     at least that large"
                )),
            },
            Layer::Dropout(p) => {
                if !(0.0..1.0).contains(p) {
                    return Err(format!("drop probability {p} must be in [0, 1)"));
                }
                Ok(input.to_vec())
            }
        }
    }

    /// Returns the weight and bias of an affine layer.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Layer::Linear(l) => Some((&l.weight, &l.bias)),
            Layer::Conv2d(c) => Some((&c.weight, &c.bias)),
            Layer::Conv1d(c) => Some((&c.weight, &c.bias)),
            _ => None,
        }
    }

    /// Returns the weight and bias of an affine layer, mutably.
    pub fn weight_and_bias_mut(&mut self) -> Option<(&mut Tensor, &mut Tensor)> {
        match self {
            Layer::Linear(l) => Some((&mut l.weight, &mut l.bias)),
            Layer::Conv2d(c) => Some((&mut c.weight, &mut c.bias)),
            Layer::Conv1d(c) => Some((&mut c.weight, &mut c.bias)),
            _ => None,
        }
    }

    /// Returns the layer's own trained tensors with their names, not those
    /// of nested layers.
    pub fn parameters_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match self {
            Layer::Linear(Linear { weight, bias })
            | Layer::Conv2d(Conv2d { weight, bias, .. })
            | Layer::Conv1d(Conv1d { weight, bias, .. }) => {
                vec![("weight", weight), ("bias", bias)]
            }
            Layer::BatchNorm(bn) => vec![("weight", &mut bn.weight), ("bias", &mut bn.bias)],
            Layer::Elman(e) => vec![
                ("input_weight", &mut e.input_weight),
                ("recurrent_weight", &mut e.recurrent_weight),
                ("bias", &mut e.bias),
            ],
            _ => Vec::new(),
        }
    }

    /// Returns the nested chains of a block with their names.
    pub fn chains(&self) -> Vec<(&'static str, &[Layer])> {
        match self {
            Layer::Residual(r) => vec![("main", &r.main), ("shortcut", &r.shortcut)],
            _ => Vec::new(),
        }
    }

    /// Returns the nested chains of a block with their names, mutably.
    pub fn chains_mut(&mut self) -> Vec<(&'static str, &mut Vec<Layer>)> {
        match self {
            Layer::Residual(r) => vec![("main", &mut r.main), ("shortcut", &mut r.shortcut)],
            _ => Vec::new(),
        }
    }
}

/// Returns the most negative finite value of `dtype`, the padding of a
/// max pool (PyTorch pads with minus infinity, which gives the same maxima
/// since every window contains an input).
fn lowest(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Applies `layers` in order.
pub fn forward_chain(layers: &[Layer], x: &Tensor, mode: Mode) -> Result<Tensor> {
    let mut h = x.clone();
    let mut i = 0;
    while i < layers.len() {
        // A convolution's bias and the photonic activation after it run as
        // one node (see crate::ops::bias_activation), with the same values.
        if let (Layer::Conv2d(c), Some(Layer::Activation(a))) = (&layers[i], layers.get(i + 1)) {
            if crate::ops::bias_activation_fuses(&h, a) {
                h = crate::ops::bias_activation(&c.convolve(&h, &c.weight, c.padding)?, &c.bias, a.fused_op())?;
                i += 2;
                continue;
            }
        }
        h = layers[i].forward_mode(&h, mode)?;
        i += 1;
    }
    Ok(h)
}

/// Returns the shape `layers` produce from one sample of `input` shape.
pub fn chain_shape(layers: &[Layer], input: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let mut shape = input.to_vec();
    for (i, layer) in layers.iter().enumerate() {
        if let Layer::Activation(a) = layer {
            a.validate().map_err(|m| format!("layer {i} (activation): {m}"))?;
        }
        shape = layer
            .output_shape(&shape)
            .map_err(|m| format!("layer {i} ({}): {m}", layer.kind()))?;
        if shape.contains(&0) {
            return Err(format!(
                "layer {i} ({}) produces an empty output of shape {shape:?}",
                layer.kind()
            ));
        }
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements.is_none_or(|n| n > super::MAX_ACTIVATION_ELEMENTS) {
            return Err(format!(
                "layer {i} ({}) produces an output of shape {shape:?}, more than {} values \
                 per sample; check its padding, stride and sizes",
                layer.kind(),
                super::MAX_ACTIVATION_ELEMENTS
            ));
        }
    }
    Ok(shape)
}

/// Average pooling of `[batch, c, h, w]` to `[batch, c, oh, ow]` with
/// PyTorch's adaptive windows.
pub fn adaptive_average(x: &Tensor, [oh, ow]: [usize; 2]) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let window = |i: usize, out: usize, len: usize| (i * len / out, ((i + 1) * len).div_ceil(out));
    let mut rows = Vec::with_capacity(oh);
    for i in 0..oh {
        let (r0, r1) = window(i, oh, h);
        let band = x.narrow(2, r0, r1 - r0)?;
        let mut cells = Vec::with_capacity(ow);
        for j in 0..ow {
            let (c0, c1) = window(j, ow, w);
            cells.push(band.narrow(3, c0, c1 - c0)?.flatten_from(2)?.mean_keepdim(2)?); // [batch, c, 1]
        }
        rows.push(Tensor::cat(&cells, 2)?.unsqueeze(2)?); // [batch, c, 1, ow]
    }
    Ok(Tensor::cat(&rows, 2)?)
}
