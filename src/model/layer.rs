//! The layers of a regular network.

use candle_core::{DType, Device, Tensor};

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

/// A 2-D convolution with zero padding, as in PyTorch's `Conv2d`.
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
        crate::ops::conv2d(x, weight, padding, self.stride, self.dilation, self.groups)
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

/// Settings of a pooling layer (no padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pool {
    /// Window size, square.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
}

impl Pool {
    fn output_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let [c, h, w] = input else {
            return Err(format!("expects [channels, height, width] input, got {input:?}"));
        };
        if self.kernel == 0 || self.stride == 0 || *h < self.kernel || *w < self.kernel || self.stride > *h {
            return Err(format!(
                "window {} with stride {} does not fit a {h}x{w} input",
                self.kernel, self.stride
            ));
        }
        Ok(vec![
            *c,
            (h - self.kernel) / self.stride + 1,
            (w - self.kernel) / self.stride + 1,
        ])
    }
}

/// One step of a regular network.
#[derive(Debug, Clone)]
pub enum Layer {
    /// Fully connected.
    Linear(Linear),
    /// 2-D convolution.
    Conv2d(Conv2d),
    /// Elementwise activation.
    Activation(Activation),
    /// Average over each window.
    AvgPool2d(Pool),
    /// Maximum over each window.
    MaxPool2d(Pool),
    /// `[batch, c, h, w]` -> `[batch, c * h * w]`.
    Flatten,
}

impl Layer {
    /// Returns the layer's type as written in `model.json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Linear(_) => "linear",
            Layer::Conv2d(_) => "conv2d",
            Layer::Activation(_) => "activation",
            Layer::AvgPool2d(_) => "avg-pool2d",
            Layer::MaxPool2d(_) => "max-pool2d",
            Layer::Flatten => "flatten",
        }
    }

    /// Applies the layer to a batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Layer::Linear(l) => crate::ops::linear(x, &l.weight, &l.bias)?,
            Layer::Conv2d(c) => crate::ops::add_channel_bias(&c.convolve(x, &c.weight, c.padding)?, &c.bias)?,
            Layer::Activation(a) => a.forward(x)?,
            Layer::AvgPool2d(p) => x.avg_pool2d_with_stride(p.kernel, p.stride)?,
            Layer::MaxPool2d(p) => x.max_pool2d_with_stride(p.kernel, p.stride)?,
            Layer::Flatten => x.flatten_from(1)?,
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
            Layer::AvgPool2d(p) | Layer::MaxPool2d(p) => p.output_shape(input),
            Layer::Activation(_) => Ok(input.to_vec()),
            Layer::Flatten => Ok(vec![input.iter().product()]),
        }
    }

    /// Returns the weight and bias of an affine layer.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Layer::Linear(l) => Some((&l.weight, &l.bias)),
            Layer::Conv2d(c) => Some((&c.weight, &c.bias)),
            _ => None,
        }
    }

    /// Returns the weight and bias of an affine layer, mutably.
    pub fn weight_and_bias_mut(&mut self) -> Option<(&mut Tensor, &mut Tensor)> {
        match self {
            Layer::Linear(l) => Some((&mut l.weight, &mut l.bias)),
            Layer::Conv2d(c) => Some((&mut c.weight, &mut c.bias)),
            _ => None,
        }
    }
}
