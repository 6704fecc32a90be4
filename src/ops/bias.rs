//! Per-channel bias of a convolution output as one autograd node.
//!
//! Candle 0.11 computes the gradient of `x.broadcast_add(&bias.reshape((1, C, 1, 1)))`
//! by a strided sum over the batch and both spatial dimensions, which on the
//! CPU took longer than the convolution's GEMMs for the MNIST-size CNN.
//! [`add_channel_bias`] sums each contiguous `H * W` plane instead.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::conv::Float;
use super::linear::contiguous_values;
use crate::{Error, Result};

/// Returns `x + bias` with `x` `[B, C, H, W]` and `bias` `[C]` added to every
/// position of its channel.
///
/// The fused path runs for f32 and f64 tensors on the CPU and supports
/// first-order gradients only. Other devices and dtypes use candle's
/// `broadcast_add`.
///
/// # Errors
///
/// Returns [`Error::Shape`] when `x` is not 4-D, `bias` is not `[C]`, or the
/// dtypes differ.
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let channels = check_channel_bias(x, bias, "channel bias expects")?;
    let is_fused_dtype = matches!(x.dtype(), DType::F32 | DType::F64);
    if !x.device().is_cpu() || !is_fused_dtype {
        return Ok(x.broadcast_add(&bias.reshape((1, channels, 1, 1))?)?);
    }
    Ok(x.contiguous()?
        .apply_op2(&bias.contiguous()?, ChannelBias)?)
}

/// Checks that `x` is `[B, C, H, W]` and `bias` is `[C]` of the same dtype
/// and returns `C`. `subject` starts the shape error, e.g. "channel bias
/// expects".
pub(crate) fn check_channel_bias(x: &Tensor, bias: &Tensor, subject: &str) -> Result<usize> {
    let (&[_, channels, _, _], &[bias_len]) = (x.dims(), bias.dims()) else {
        return Err(Error::Shape(format!(
            "{subject} input [batch, channels, height, width] and bias [channels], got {:?} and {:?}",
            x.dims(),
            bias.dims()
        )));
    };
    if channels != bias_len || x.dtype() != bias.dtype() {
        return Err(Error::Shape(format!(
            "channel bias {:?} ({:?}) does not fit input {:?} ({:?}): it needs one value per channel and the same dtype",
            bias.dims(),
            bias.dtype(),
            x.dims(),
            x.dtype()
        )));
    }
    Ok(channels)
}

struct ChannelBias;

impl ChannelBias {
    fn forward<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        bias: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = contiguous_values::<T>(x.0, x.1, "channel bias input")?;
        let bias_values = contiguous_values::<T>(bias.0, bias.1, "channel bias")?;
        let (_, channels, height, width) = x.1.shape().dims4()?;
        let area = height * width;
        let mut out = values.to_vec();
        if area > 0 {
            for (i, plane) in out.chunks_exact_mut(area).enumerate() {
                let b = bias_values[i % channels];
                plane.iter_mut().for_each(|v| *v += b);
            }
        }
        Ok((T::into_storage(out), x.1.shape().clone()))
    }
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.forward((x, x_layout), (bias, bias_layout)),
            x.dtype(),
            "fused channel bias (supports f32 and f64)"
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let x_grad = x.track_op().then(|| grad_res.clone());
        let bias_grad = if bias.track_op() {
            Some(grad_res.contiguous()?.apply_op1_no_bwd(&ChannelSum)?)
        } else {
            None
        };
        Ok((x_grad, bias_grad))
    }
}

/// Returns the sum of a contiguous f32 or f64 CPU tensor `[B, C, H, W]`
/// over all but the channels, `[C]`, without a backward pass.
pub(crate) fn channel_sum(x: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1_no_bwd(&ChannelSum)
}

/// The sum of a contiguous `[B, C, H, W]` tensor over all but the channels, `[C]`.
struct ChannelSum;

impl ChannelSum {
    fn sum<T: Float>(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = contiguous_values::<T>(storage, layout, "channel sum input")?;
        let (_, channels, height, width) = layout.shape().dims4()?;
        let area = height * width;
        let mut out = vec![T::default(); channels];
        if area > 0 {
            for (i, plane) in values.chunks_exact(area).enumerate() {
                let mut sum = T::default();
                plane.iter().for_each(|&v| sum += v);
                out[i % channels] += sum;
            }
        }
        Ok((T::into_storage(out), Shape::from(channels)))
    }
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.sum(storage, layout),
            storage.dtype(),
            "fused channel bias (supports f32 and f64)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{random_tensor, relative_error, tolerance, weighted_sum};
    use candle_core::Var;
    use proptest::prelude::*;

    /// Returns the output and the gradients for `x` and `bias` of `sum(f(x, bias) * weights)`.
    fn run(
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
        dims: [usize; 4],
        seed: u64,
        dtype: DType,
    ) -> [Tensor; 3] {
        let x = Var::from_tensor(&random_tensor(seed, &dims, -1.0, 1.0, dtype)).unwrap();
        let bias =
            Var::from_tensor(&random_tensor(seed + 1, &[dims[1]], -1.0, 1.0, dtype)).unwrap();
        let y = f(x.as_tensor(), bias.as_tensor());
        let grads = weighted_sum(seed + 2, &y).backward().unwrap();
        let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
        [y.clone(), grad(&x), grad(&bias)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn channel_bias_matches_generic(dims in prop::array::uniform4(1usize..9), seed in 0u64..1000) {
            for dtype in [DType::F32, DType::F64] {
                let ours = run(|x, b| add_channel_bias(x, b).unwrap(), dims, seed, dtype);
                let generic = run(|x, b| x.broadcast_add(&b.reshape((1, dims[1], 1, 1)).unwrap()).unwrap(), dims, seed, dtype);
                let limit = tolerance(dtype) * (dims[0] * dims[2] * dims[3]) as f64;
                for (name, (a, b)) in ["output", "dx", "dbias"].iter().zip(ours.iter().zip(&generic)) {
                    let error = relative_error(a, b);
                    prop_assert!(error <= limit, "{} of {:?} in {:?}: relative error {:e}", name, dims, dtype, error);
                }
            }
        }
    }

    #[test]
    fn channel_bias_rejects_bad_arguments() {
        let x = random_tensor(1, &[2, 3, 2, 2], -1.0, 1.0, DType::F32);
        let wrong_len = random_tensor(2, &[4], -1.0, 1.0, DType::F32);
        let not_4d = random_tensor(3, &[2, 3], -1.0, 1.0, DType::F32);
        let bias = random_tensor(4, &[3], -1.0, 1.0, DType::F32);
        let cases = [
            (add_channel_bias(&x, &wrong_len), "one value per channel"),
            (
                add_channel_bias(&not_4d, &bias),
                "expects input [batch, channels",
            ),
            (
                add_channel_bias(&x, &bias.to_dtype(DType::F64).unwrap()),
                "same dtype",
            ),
        ];
        for (i, (result, expected)) in cases.into_iter().enumerate() {
            let message = result.unwrap_err().to_string();
            assert!(message.contains(expected), "case {i}: {message}");
        }
    }
}
