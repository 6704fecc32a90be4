//! 1-D convolution over each row of an image, on the 2-D GEMM kernels.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Convolves each row of `x` with the 1-D `kernel`, without padding (pad
/// first with [`super::pad_width_constant`]).
///
/// Each row is a PyTorch `Conv1d` input `[channels, width]`; the rows are
/// stacked into the batch and run as a 2-D convolution with a `1 x k`
/// kernel, so the forward and backward passes are those of
/// [`super::conv2d`].
///
/// # Shapes
/// `x`: `[batch, channels, height, width]`, `kernel`:
/// `[out, channels / groups, k]` -> `[batch, out, height, width']` with
/// `width' = (width - dilation (k - 1) - 1) / stride + 1`.
pub fn conv1d_rows(x: &Tensor, kernel: &Tensor, stride: usize, dilation: usize, groups: usize) -> Result<Tensor> {
    let &[batch, channels, height, width] = x.dims() else {
        return Err(Error::Shape(format!(
            "conv1d input must have shape [batch, channels, height, width], got {:?}",
            x.dims()
        )));
    };
    let &[out, group_channels, k] = kernel.dims() else {
        return Err(Error::Shape(format!(
            "conv1d kernel must have shape [out_channels, in_channels / groups, kernel], got {:?}",
            kernel.dims()
        )));
    };
    let kernel = kernel.reshape((out, group_channels, 1, k))?;
    if height == 1 {
        return super::conv2d(x, &kernel, 0, stride, dilation, groups);
    }
    // [batch, c, h, w] -> [batch * h, c, 1, w]: one 1-D signal per row.
    let rows = x.transpose(1, 2)?.contiguous()?.reshape((batch * height, channels, 1, width))?;
    let y = super::conv2d(&rows, &kernel, 0, stride, dilation, groups)?; // [batch * h, out, 1, w']
    let out_width = y.dims()[3];
    Ok(y.reshape((batch, height, out, out_width))?.transpose(1, 2)?.contiguous()?)
}
