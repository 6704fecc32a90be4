//! Constant padding of images.

use candle_core::Tensor;

use crate::error::Result;

/// Pads the last two dimensions of `x` by `pad` on every side with `value`
/// (a scalar or `[1, c, 1, 1]` per channel).
pub fn pad_constant(x: &Tensor, pad: usize, value: &Tensor) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let padded = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    let (h, w) = (x.dims()[2], x.dims()[3]);
    let inside = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?
        .pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?;
    let border = inside.affine(-1.0, 1.0)?; // 1 on the border, 0 inside
    Ok(padded.broadcast_add(&border.broadcast_mul(value)?)?)
}

/// Pads the last dimension of `x` by `pad` on both ends with `value` (a
/// scalar or `[1, c, 1, 1]` per channel), leaving the rows alone: the
/// padding of a 1-D convolution over each row.
pub fn pad_width_constant(x: &Tensor, pad: usize, value: &Tensor) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let padded = x.pad_with_zeros(3, pad, pad)?;
    let (h, w) = (x.dims()[2], x.dims()[3]);
    let inside = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?.pad_with_zeros(3, pad, pad)?;
    let border = inside.affine(-1.0, 1.0)?; // 1 in the padding, 0 inside
    Ok(padded.broadcast_add(&border.broadcast_mul(value)?)?)
}
