//! The 1-D convolution layer.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// A 1-D convolution as in PyTorch's `Conv1d`, applied to each row of a
/// `[channels, height, width]` signal; a `[channels, 1, length]` signal is
/// PyTorch's `[channels, length]`. The padding is zeros, or a value per
/// input channel, on both ends of each row only.
#[derive(Debug, Clone)]
pub struct Conv1d {
    /// Kernels, `[out_channels, in_channels / groups, kernel]`.
    pub weight: Tensor,
    /// Biases, `[out_channels]`.
    pub bias: Tensor,
    /// Step between output positions, in input samples.
    pub stride: usize,
    /// Samples added at both ends of each row.
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

impl Conv1d {
    /// Builds a convolution with zero weights (f32, CPU).
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
        Ok(Conv1d {
            weight: Tensor::zeros((out_channels, group_channels, kernel), DType::F32, &Device::Cpu)?,
            bias: Tensor::zeros(out_channels, DType::F32, &Device::Cpu)?,
            stride,
            padding,
            dilation,
            groups,
            pad_value: Vec::new(),
        })
    }

    /// `(out_channels, in_channels / groups, kernel)`.
    pub fn kernel_dims(&self) -> (usize, usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1], d[2])
    }

    /// Applies the convolution with the kernel `weight` (the layer's own
    /// settings, someone else's kernel) and the padding values `pad` (one or
    /// one per channel, empty for zeros); used by the non-negative layer too.
    ///
    /// # Shapes
    /// `x`: `[batch, c, h, w]`, `weight`: `[out, c / groups, k]` ->
    /// `[batch, out, h, w']`.
    pub fn convolve(&self, x: &Tensor, weight: &Tensor, pad: &[f64]) -> Result<Tensor> {
        let padded = if self.padding == 0 {
            x.clone()
        } else {
            let pad = if pad.is_empty() { &[0.0][..] } else { pad };
            let values = Tensor::new(pad, x.device())?.to_dtype(x.dtype())?;
            let values = match pad.len() {
                1 => values.reshape(())?,
                n => values.reshape((1, n, 1, 1))?,
            };
            crate::ops::pad_width_constant(x, self.padding, &values)?
        };
        crate::ops::conv1d_rows(&padded, weight, self.stride, self.dilation, self.groups)
    }

    /// Checks the settings against an input of `[channels, height, width]`
    /// and returns the output shape.
    pub fn output_shape(&self, input: &[usize]) -> std::result::Result<Vec<usize>, String> {
        let (out_c, group_c, k) = self.kernel_dims();
        let [c, h, w] = input else {
            return Err(format!("expects [channels, height, width] input, got {input:?}"));
        };
        if self.groups == 0 || self.stride == 0 || self.dilation == 0 || k == 0 {
            return Err(format!(
                "kernel size {k}, groups {}, stride {} and dilation {} must each be at least 1",
                self.groups, self.stride, self.dilation
            ));
        }
        const LIMIT: usize = 1 << 16;
        if [k, self.stride, self.dilation, self.padding].iter().any(|&v| v > LIMIT) {
            return Err(format!("kernel, stride, dilation and padding must each be at most {LIMIT}"));
        }
        let count = self.pad_value.len();
        if !(count <= 1 || count == *c) || self.pad_value.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "{count} padding values for {c} input channels; give none, one or one per channel, all finite"
            ));
        }
        if group_c * self.groups != *c || out_c % self.groups != 0 {
            return Err(format!(
                "kernel {:?} with {} groups does not fit {c} input channels; in_channels and \
                 out_channels must both be divisible by groups",
                self.weight.dims(),
                self.groups
            ));
        }
        let extent = self.dilation * (k - 1) + 1;
        let padded = w + 2 * self.padding;
        if padded < extent {
            return Err(format!(
                "kernel {k} with dilation {} spans {extent} samples but rows have only {padded} \
                 with padding; use a smaller kernel or more padding",
                self.dilation
            ));
        }
        Ok(vec![out_c, *h, (padded - extent) / self.stride + 1])
    }
}
