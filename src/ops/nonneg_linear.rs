//! The training form of a non-negative fully connected layer,
//! `z = u (P - N)^T + N alpha + bias`, as two autograd nodes.
//!
//! Built from candle's generic ops, the form takes five nodes (`P - N`, the
//! product `N alpha`, a squeeze, the bias sum and the product with `u`).
//! Their backward passes negate, outer-multiply and accumulate the
//! gradients of `P` and `N` in several passes over the weights, on one
//! thread. [`nonneg_linear`] computes `P - N` and `N alpha` in one pass over
//! the rows, split over rayon's threads, and its backward pass returns the
//! gradients of `P` and `N` from one GEMM and one more pass. The bias is
//! added by a second node whose gradient is a column sum.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::Float;
use super::fastmath::{vectorized, SliceLoop};
use super::linear::{contiguous_values, gemm_into, ColumnSum, MatMul, Operand};
use crate::{Error, Result};

/// Weight rows per rayon task of the row passes. An estimate, not tuned.
const ROWS_PER_TASK: usize = 16;

/// Returns `u (P - N)^T + N alpha + bias`, with `u` `[batch, in]`, `P` and
/// `N` `[out, in]`, `bias` `[out]`, and `alpha` one value per input or one
/// for all of them.
///
/// The fused path runs for f32 and f64 tensors on the CPU and supports
/// first-order gradients only. Other devices and dtypes use
/// [`nonneg_linear_generic`].
///
/// # Errors
///
/// Returns [`Error::Shape`] when the shapes do not fit together, the
/// tensors differ in dtype, or `alpha` has neither one value nor one per
/// input.
pub fn nonneg_linear(u: &Tensor, positive: &Tensor, negative: &Tensor, bias: &Tensor, alpha: &[f64]) -> Result<Tensor> {
    check_args(u, positive, negative, bias, alpha)?;
    let is_fused_dtype = matches!(u.dtype(), DType::F32 | DType::F64);
    if !u.device().is_cpu() || !is_fused_dtype {
        return nonneg_linear_generic(u, positive, negative, bias, alpha);
    }
    let op = NonnegLinear {
        alpha: alpha.to_vec(),
    };
    let z = u
        .contiguous()?
        .apply_op3(&positive.contiguous()?, &negative.contiguous()?, op)?;
    // Candle's gradient of a broadcast bias is a slow strided sum.
    Ok(z.apply_op2(&bias.contiguous()?, RowBias)?)
}

/// Computes [`nonneg_linear`] with candle's generic ops: the fallback and
/// the reference that its tests compare with.
pub fn nonneg_linear_generic(
    u: &Tensor,
    positive: &Tensor,
    negative: &Tensor,
    bias: &Tensor,
    alpha: &[f64],
) -> Result<Tensor> {
    check_args(u, positive, negative, bias, alpha)?;
    let weight = positive.sub(negative)?;
    let inputs = negative.dims()[1];
    let alpha_column = Tensor::new(alpha, u.device())?.to_dtype(u.dtype())?;
    let alpha_column = match alpha.len() {
        1 => alpha_column.broadcast_as((inputs, 1))?,
        _ => alpha_column.reshape((inputs, 1))?,
    };
    let bias = negative.matmul(&alpha_column)?.squeeze(1)?.add(bias)?;
    super::linear(u, &weight, &bias)
}

fn check_args(u: &Tensor, positive: &Tensor, negative: &Tensor, bias: &Tensor, alpha: &[f64]) -> Result<()> {
    let (&[batch, inputs], &[outputs, weight_inputs], &[bias_len]) = (u.dims(), positive.dims(), bias.dims()) else {
        return Err(Error::Shape(format!(
            "non-negative linear expects input [batch, in], P and N [out, in] and bias [out], got {:?}, {:?} and {:?}",
            u.dims(),
            positive.dims(),
            bias.dims()
        )));
    };
    if negative.dims() != positive.dims() || inputs != weight_inputs || outputs != bias_len {
        return Err(Error::Shape(format!(
            "non-negative linear input [{batch}, {inputs}], P {:?}, N {:?} and bias [{bias_len}] do not fit: \
             P and N must have one shape, their columns the input width and their rows the bias length",
            positive.dims(),
            negative.dims()
        )));
    }
    if alpha.len() != 1 && alpha.len() != inputs {
        return Err(Error::Shape(format!(
            "non-negative linear alpha has {} values for {inputs} inputs; expected 1 or {inputs}",
            alpha.len()
        )));
    }
    let dtypes = [positive.dtype(), negative.dtype(), bias.dtype()];
    if dtypes.iter().any(|&dtype| dtype != u.dtype()) {
        return Err(Error::Shape(format!(
            "non-negative linear input, P, N and bias must share one dtype, got {:?}, {:?}, {:?} and {:?}",
            u.dtype(),
            dtypes[0],
            dtypes[1],
            dtypes[2]
        )));
    }
    Ok(())
}

/// Returns `alpha` as one value of `T` per input.
fn alpha_per_input<T: Float>(alpha: &[f64], inputs: usize) -> Vec<T> {
    let value = |v: f64| T::from(v).unwrap_or_else(T::nan);
    match alpha {
        [single] => vec![value(*single); inputs],
        _ => alpha.iter().map(|&v| value(v)).collect(),
    }
}

/// The forward node: `u` `[batch, in]`, `P` and `N` `[out, in]`; returns
/// `u (P - N)^T + N alpha`, `[batch, out]`.
struct NonnegLinear {
    alpha: Vec<f64>,
}

impl NonnegLinear {
    fn forward<T: Float>(
        &self,
        u: (&CpuStorage, &Layout),
        positive: (&CpuStorage, &Layout),
        negative: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, inputs) = u.1.shape().dims2()?;
        let (outputs, _) = positive.1.shape().dims2()?;
        let u_values = contiguous_values::<T>(u.0, u.1, "non-negative linear input")?;
        let positive = contiguous_values::<T>(positive.0, positive.1, "P")?;
        let negative = contiguous_values::<T>(negative.0, negative.1, "N")?;
        let alpha = alpha_per_input::<T>(&self.alpha, inputs);

        // One pass over the rows: W = P - N and c = N alpha.
        let mut weight = vec![T::default(); outputs * inputs];
        let mut offset = vec![T::default(); outputs];
        weight
            .par_chunks_mut(inputs.max(1))
            .zip(offset.par_iter_mut())
            .zip(positive.par_chunks(inputs.max(1)).zip(negative.par_chunks(inputs.max(1))))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|((weight, offset), (positive, negative))| {
                vectorized(RowPass {
                    weight,
                    offset,
                    positive,
                    negative,
                    alpha: &alpha,
                })
            });

        // Rows that start as c, then u W^T added by the GEMM.
        let mut out = Vec::with_capacity(batch * outputs);
        for _ in 0..batch {
            out.extend_from_slice(&offset);
        }
        let lhs = Operand {
            values: u_values,
            rows: batch,
            cols: inputs,
            transposed: false,
        };
        let rhs = Operand {
            values: &weight,
            rows: outputs,
            cols: inputs,
            transposed: true,
        };
        gemm_into(&mut out, lhs, rhs, true);
        Ok((T::into_storage(out), Shape::from((batch, outputs))))
    }
}

/// One row of the forward pass: `W = P - N` and `c = N alpha`.
struct RowPass<'a, T> {
    weight: &'a mut [T],
    offset: &'a mut T,
    positive: &'a [T],
    negative: &'a [T],
    alpha: &'a [T],
}

/// Partial sums of the dot product `N alpha`: independent accumulators, so
/// that the additions neither wait for each other nor stop vectorisation.
const LANES: usize = 16;

impl<T: Float> SliceLoop for RowPass<'_, T> {
    #[inline(always)]
    fn run(self) {
        for ((w, &p), &n) in self.weight.iter_mut().zip(self.positive).zip(self.negative) {
            *w = p - n;
        }
        let mut lanes = [T::default(); LANES];
        let negative_chunks = self.negative.chunks_exact(LANES);
        let alpha_chunks = self.alpha.chunks_exact(LANES);
        let tail: T = negative_chunks
            .remainder()
            .iter()
            .zip(alpha_chunks.remainder())
            .fold(T::default(), |sum, (&n, &a)| sum + n * a);
        for (n, a) in negative_chunks.zip(alpha_chunks) {
            for ((lane, &n), &a) in lanes.iter_mut().zip(n).zip(a) {
                *lane += n * a;
            }
        }
        *self.offset = lanes.iter().fold(tail, |sum, &lane| sum + lane);
    }
}

impl CustomOp3 for NonnegLinear {
    fn name(&self) -> &'static str {
        "nonneg-linear"
    }

    fn cpu_fwd(
        &self,
        u: &CpuStorage,
        u_layout: &Layout,
        positive: &CpuStorage,
        positive_layout: &Layout,
        negative: &CpuStorage,
        negative_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.forward((u, u_layout), (positive, positive_layout), (negative, negative_layout)),
            u.dtype(),
            "fused non-negative linear (supports f32 and f64)"
        )
    }

    // NOTE: the gradients come from ops without a backward pass, so a second
    // backward pass through this node treats them as constants.
    fn bwd(
        &self,
        u: &Tensor,
        positive: &Tensor,
        negative: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let u_grad = if u.track_op() {
            let weight = positive.apply_op2_no_bwd(negative, &Difference)?;
            let product = MatMul {
                lhs_transposed: false,
                rhs_transposed: false,
            };
            Some(grad.apply_op2_no_bwd(&weight, &product)?)
        } else {
            None
        };
        if !positive.track_op() && !negative.track_op() {
            return Ok((u_grad, None, None));
        }
        // dW = g^T u is the gradient of P, and dc alpha^T - dW that of N.
        let product = MatMul {
            lhs_transposed: true,
            rhs_transposed: false,
        };
        let weight_grad = grad.apply_op2_no_bwd(u, &product)?;
        let negative_grad = if negative.track_op() {
            let offset_grad = grad.apply_op1_no_bwd(&ColumnSum)?;
            let op = NegativeGradient {
                alpha: self.alpha.clone(),
            };
            Some(weight_grad.apply_op2_no_bwd(&offset_grad, &op)?)
        } else {
            None
        };
        let positive_grad = positive.track_op().then_some(weight_grad);
        Ok((u_grad, positive_grad, negative_grad))
    }
}

/// `z + bias` with `z` `[batch, out]` and `bias` `[out]` added to each row;
/// the bias gradient is the column sum of the output's.
struct RowBias;

impl RowBias {
    fn add<T: Float>(&self, z: (&CpuStorage, &Layout), bias: (&CpuStorage, &Layout)) -> candle_core::Result<(CpuStorage, Shape)> {
        let z_values = contiguous_values::<T>(z.0, z.1, "non-negative linear product")?;
        let bias = contiguous_values::<T>(bias.0, bias.1, "bias")?;
        let mut out = z_values.to_vec();
        for row in out.chunks_exact_mut(bias.len().max(1)) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        Ok((T::into_storage(out), z.1.shape().clone()))
    }
}

impl CustomOp2 for RowBias {
    fn name(&self) -> &'static str {
        "row-bias"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        z_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.add((z, z_layout), (bias, bias_layout)),
            z.dtype(),
            "fused non-negative linear (supports f32 and f64)"
        )
    }

    fn bwd(
        &self,
        z: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let bias_grad = if bias.track_op() {
            Some(grad.apply_op1_no_bwd(&ColumnSum)?)
        } else {
            None
        };
        Ok((z.track_op().then_some(grad), bias_grad))
    }
}

/// `P - N` of two contiguous tensors of one shape.
struct Difference;

impl Difference {
    fn difference<T: Float>(
        &self,
        positive: (&CpuStorage, &Layout),
        negative: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = contiguous_values::<T>(positive.0, positive.1, "P")?;
        let n = contiguous_values::<T>(negative.0, negative.1, "N")?;
        let out: Vec<T> = p.par_iter().zip(n).with_min_len(1 << 14).map(|(&p, &n)| p - n).collect();
        Ok((T::into_storage(out), positive.1.shape().clone()))
    }
}

impl CustomOp2 for Difference {
    fn name(&self) -> &'static str {
        "nonneg-weight-difference"
    }

    fn cpu_fwd(
        &self,
        positive: &CpuStorage,
        positive_layout: &Layout,
        negative: &CpuStorage,
        negative_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.difference((positive, positive_layout), (negative, negative_layout)),
            positive.dtype(),
            "fused non-negative linear (supports f32 and f64)"
        )
    }
}

/// The gradient of `N`, `dc alpha^T - dW`, from `dW` `[out, in]` and
/// `dc` `[out]`.
struct NegativeGradient {
    alpha: Vec<f64>,
}

impl NegativeGradient {
    fn gradient<T: Float>(
        &self,
        weight_grad: (&CpuStorage, &Layout),
        offset_grad: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (outputs, inputs) = weight_grad.1.shape().dims2()?;
        let weight_grad_values = contiguous_values::<T>(weight_grad.0, weight_grad.1, "weight gradient")?;
        let offset_grad = contiguous_values::<T>(offset_grad.0, offset_grad.1, "offset gradient")?;
        let alpha = alpha_per_input::<T>(&self.alpha, inputs);
        let mut out = vec![T::default(); outputs * inputs];
        out.par_chunks_mut(inputs.max(1))
            .zip(weight_grad_values.par_chunks(inputs.max(1)))
            .zip(offset_grad.par_iter())
            .with_min_len(ROWS_PER_TASK)
            .for_each(|((out_row, dw_row), &dc)| {
                for ((out, &dw), &a) in out_row.iter_mut().zip(dw_row).zip(&alpha) {
                    *out = dc * a - dw;
                }
            });
        Ok((T::into_storage(out), weight_grad.1.shape().clone()))
    }
}

impl CustomOp2 for NegativeGradient {
    fn name(&self) -> &'static str {
        "nonneg-negative-gradient"
    }

    fn cpu_fwd(
        &self,
        weight_grad: &CpuStorage,
        weight_grad_layout: &Layout,
        offset_grad: &CpuStorage,
        offset_grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.gradient((weight_grad, weight_grad_layout), (offset_grad, offset_grad_layout)),
            weight_grad.dtype(),
            "fused non-negative linear (supports f32 and f64)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{random_tensor, relative_error, tolerance, weighted_sum};
    use candle_core::Var;
    use proptest::prelude::*;

    type Gradients = [Option<Tensor>; 4];

    /// Returns the output and the gradients of `u`, `P`, `N` and the bias
    /// of `sum(f(u, P, N, bias) * weights)`, each tensor a variable when
    /// its flag in `trained` is set.
    fn run(
        f: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor, &[f64]) -> Result<Tensor>,
        (batch, inputs, outputs): (usize, usize, usize),
        alpha: &[f64],
        trained: [bool; 4],
        (seed, dtype): (u64, DType),
    ) -> (Tensor, Gradients) {
        let shapes = [vec![batch, inputs], vec![outputs, inputs], vec![outputs, inputs], vec![outputs]];
        let tensors: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, shape)| random_tensor(seed + i as u64, shape, 0.0, 1.0, dtype))
            .collect();
        let vars: Vec<Option<Var>> = tensors
            .iter()
            .zip(trained)
            .map(|(t, trained)| trained.then(|| Var::from_tensor(t).unwrap()))
            .collect();
        let inputs: Vec<Tensor> = tensors
            .iter()
            .zip(&vars)
            .map(|(t, var)| var.as_ref().map_or_else(|| t.clone(), |v| v.as_tensor().clone()))
            .collect();
        let z = f(&inputs[0], &inputs[1], &inputs[2], &inputs[3], alpha).unwrap();
        let grads = weighted_sum(seed + 9, &z).backward().unwrap();
        let gradient = |var: &Option<Var>| var.as_ref().map(|v| grads.get(v.as_tensor()).unwrap().clone());
        (z.clone(), [gradient(&vars[0]), gradient(&vars[1]), gradient(&vars[2]), gradient(&vars[3])])
    }

    /// Checks that the fused op gives the generic ops' output and
    /// gradients within [`tolerance`] (1e-5 relative in f32, 1e-12 in f64).
    fn check_against_generic(shape: (usize, usize, usize), per_input_alpha: bool, trained: [bool; 4], seed: u64, dtype: DType) {
        let alpha: Vec<f64> = if per_input_alpha {
            (0..shape.1).map(|i| 0.5 + i as f64 / 7.0).collect()
        } else {
            vec![1.25]
        };
        let (fused, fused_grads) = run(nonneg_linear, shape, &alpha, trained, (seed, dtype));
        let (generic, generic_grads) = run(nonneg_linear_generic, shape, &alpha, trained, (seed, dtype));
        let limit = tolerance(dtype);
        let error = relative_error(&fused, &generic);
        assert!(error <= limit, "output differs by {error:e} for shape {shape:?}, {dtype:?}");
        let names = ["u", "P", "N", "bias"];
        for ((name, fused), generic) in names.iter().zip(&fused_grads).zip(&generic_grads) {
            match (fused, generic) {
                (Some(fused), Some(generic)) => {
                    let error = relative_error(fused, generic);
                    assert!(error <= limit, "gradient of {name} differs by {error:e} for shape {shape:?}, {dtype:?}");
                }
                (None, None) => {}
                _ => panic!("gradient of {name}: present in one form only"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn nonneg_linear_matches_generic(
            batch in 1usize..40,
            inputs in 1usize..70,
            outputs in 1usize..50,
            per_input_alpha in any::<bool>(),
            seed in 0u64..1000,
        ) {
            for dtype in [DType::F32, DType::F64] {
                check_against_generic((batch, inputs, outputs), per_input_alpha, [true; 4], seed, dtype);
            }
        }
    }

    /// The MLP's first layer at batch 256, large enough for the threaded
    /// row passes and the split GEMMs.
    #[test]
    fn nonneg_linear_mlp_shape_matches_generic() {
        for dtype in [DType::F32, DType::F64] {
            check_against_generic((256, 784, 100), true, [true; 4], 3, dtype);
        }
    }

    /// Only some of `u`, `P`, `N` and the bias are trained, as when the
    /// first layer reads the constant modulator output.
    #[test]
    fn nonneg_linear_partial_gradients_match_generic() {
        for trained in [[false, true, true, true], [true, false, true, false], [true, true, false, true], [true, false, false, false]] {
            check_against_generic((9, 13, 5), true, trained, 4, DType::F64);
        }
    }

    #[test]
    fn nonneg_linear_rejects_bad_arguments() {
        let t = |shape: &[usize]| random_tensor(1, shape, 0.0, 1.0, DType::F32);
        let (u, p, bias) = (t(&[2, 3]), t(&[4, 3]), t(&[4]));
        let message = |result: Result<Tensor>| result.unwrap_err().to_string();
        assert!(message(nonneg_linear(&u, &p, &t(&[4, 2]), &bias, &[1.0])).contains("do not fit"), "N of another shape");
        assert!(message(nonneg_linear(&t(&[2, 5]), &p, &p, &bias, &[1.0])).contains("do not fit"), "input width");
        assert!(message(nonneg_linear(&u, &p, &p, &t(&[3]), &[1.0])).contains("do not fit"), "bias length");
        assert!(message(nonneg_linear(&u, &p, &p, &bias, &[1.0, 2.0])).contains("expected 1 or 3"), "alpha length");
        assert!(message(nonneg_linear(&t(&[3]), &p, &p, &bias, &[1.0])).contains("expects input"), "1-D input");
        let p64 = p.to_dtype(DType::F64).unwrap();
        assert!(message(nonneg_linear(&u, &p64, &p, &bias, &[1.0])).contains("one dtype"), "mixed dtypes");
    }

    #[test]
    fn nonneg_linear_other_dtypes_fall_back_to_candle() {
        let t = |shape: &[usize]| random_tensor(2, shape, 0.0, 1.0, DType::BF16);
        let (u, p, n, bias) = (t(&[2, 3]), t(&[4, 3]), t(&[4, 3]), t(&[4]));
        let fused = nonneg_linear(&u, &p, &n, &bias, &[1.0]).unwrap();
        let generic = nonneg_linear_generic(&u, &p, &n, &bias, &[1.0]).unwrap();
        assert_eq!(fused.dims(), [2, 4], "shape");
        assert_eq!(relative_error(&fused, &generic), 0.0, "bf16 values");
    }
}
