//! Fully connected layer `y = x W^T + b` as one autograd node on the `gemm` crate.
//!
//! Candle 0.11 builds `x.matmul(&w.t())?.broadcast_add(&b)?` from three nodes,
//! and its backward pass materialises the broadcast bias gradient, a transpose
//! and an addition for every node. [`linear`] computes the forward pass as one
//! GEMM that accumulates into rows initialised with the bias, and its backward
//! pass as two GEMMs (`dx = g W`, `dW = g^T x`) plus a column sum (`db`), all
//! reading the row-major operands through strides instead of copies.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::conv::Float;
use crate::{Error, Result};

/// Applies `y = x W^T + b` with `x` `[batch, in]`, `weight` `[out, in]` and
/// `bias` `[out]`, returning `[batch, out]`.
///
/// The fused path runs for f32 and f64 tensors on the CPU and supports
/// first-order gradients only. Other devices and dtypes use candle's generic
/// `matmul` and `broadcast_add`.
///
/// # Errors
///
/// Returns [`Error::Shape`] when the shapes do not fit together or the three
/// tensors differ in dtype.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_linear_args(x, weight, bias)?;
    let is_fused_dtype = matches!(x.dtype(), DType::F32 | DType::F64);
    if !x.device().is_cpu() || !is_fused_dtype {
        return linear_generic(x, weight, bias);
    }
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.contiguous()?;
    Ok(x.apply_op3(&weight, &bias, Linear)?)
}

/// Computes `y = x W^T + b` with candle's generic ops: the fallback of
/// [`linear`] and the reference that its tests compare with.
pub fn linear_generic(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&weight.t()?)?.broadcast_add(bias)?)
}

fn check_linear_args(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let (&[batch, inputs], &[outputs, weight_inputs], &[bias_len]) =
        (x.dims(), weight.dims(), bias.dims())
    else {
        return Err(Error::Shape(format!(
            "linear expects input [batch, in], weight [out, in] and bias [out], got {:?}, {:?} and {:?}",
            x.dims(),
            weight.dims(),
            bias.dims()
        )));
    };
    if inputs != weight_inputs || outputs != bias_len {
        return Err(Error::Shape(format!(
            "linear input [{batch}, {inputs}], weight [{outputs}, {weight_inputs}] and bias [{bias_len}] \
             do not fit: the input width must equal the weight's columns and the bias length its rows"
        )));
    }
    if x.dtype() != weight.dtype() || x.dtype() != bias.dtype() {
        return Err(Error::Shape(format!(
            "linear input, weight and bias must share one dtype, got {:?}, {:?} and {:?}",
            x.dtype(),
            weight.dtype(),
            bias.dtype()
        )));
    }
    Ok(())
}

/// A row-major matrix operand of a GEMM, possibly read transposed.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, T> {
    pub values: &'a [T],
    /// Rows and columns as stored.
    pub rows: usize,
    pub cols: usize,
    /// Read as its transpose.
    pub transposed: bool,
}

impl<T> Operand<'_, T> {
    /// Returns (rows, cols, row stride, column stride) as the GEMM reads it.
    fn strides(&self) -> (usize, usize, isize, isize) {
        let (rows, cols) = (self.rows, self.cols);
        if self.transposed {
            (cols, rows, 1, cols as isize)
        } else {
            (rows, cols, cols as isize, 1)
        }
    }
}

/// Computes `dst = lhs rhs`, or `dst += lhs rhs` when `accumulate`, with `dst`
/// row-major `[m, n]`. It uses rayon's threads when the product is large
/// enough to pay for them.
///
/// # Panics
///
/// Panics when the operand shapes do not agree or a slice is shorter than
/// its shape, which the callers check first.
pub(crate) fn gemm_into<T: Float>(
    dst: &mut [T],
    lhs: Operand<T>,
    rhs: Operand<T>,
    accumulate: bool,
) {
    let (m, k, lhs_rs, lhs_cs) = lhs.strides();
    let (rhs_k, n, rhs_rs, rhs_cs) = rhs.strides();
    assert_eq!(k, rhs_k, "GEMM inner dimensions differ");
    assert!(dst.len() >= m * n, "GEMM destination too short");
    assert!(
        lhs.values.len() >= m * k && rhs.values.len() >= k * n,
        "GEMM operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::default());
        }
        return;
    }
    // NOTE: the threshold (about 2^17 multiply-adds per thread) is an estimate,
    // not tuned; below it the GEMM runs on the calling thread.
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= threads << 17 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index that the strides reach:
    // lhs reads m x k, rhs k x n and dst m x n elements of their slices, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.values.as_ptr(),
            rhs_cs,
            rhs_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Returns the contiguous values of a tensor's storage, or an error naming `what`.
pub(crate) fn contiguous_values<'a, T: Float>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::values(storage)?[start..end]),
        None => candle_core::bail!(
            "{what} must be contiguous, got strides {:?}",
            layout.stride()
        ),
    }
}

/// The forward node: input `[batch, in]`, weight `[out, in]`, bias `[out]`.
struct Linear;

impl Linear {
    fn forward<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, inputs) = x.1.shape().dims2()?;
        let (outputs, _) = weight.1.shape().dims2()?;
        let x_values = contiguous_values::<T>(x.0, x.1, "linear input")?;
        let weight_values = contiguous_values::<T>(weight.0, weight.1, "linear weight")?;
        let bias_values = contiguous_values::<T>(bias.0, bias.1, "linear bias")?;
        let mut out = Vec::with_capacity(batch * outputs);
        for _ in 0..batch {
            out.extend_from_slice(bias_values);
        }
        let lhs = Operand {
            values: x_values,
            rows: batch,
            cols: inputs,
            transposed: false,
        };
        let rhs = Operand {
            values: weight_values,
            rows: outputs,
            cols: inputs,
            transposed: true,
        };
        gemm_into(&mut out, lhs, rhs, true);
        Ok((T::into_storage(out), Shape::from((batch, outputs))))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear-gemm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.forward((x, x_layout), (weight, weight_layout), (bias, bias_layout)),
            x.dtype(),
            "fused linear (supports f32 and f64)"
        )
    }

    // NOTE: the gradients come from ops without a backward pass, so a second
    // backward pass through this node treats them as constants.
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let x_grad = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                weight,
                &MatMul {
                    lhs_transposed: false,
                    rhs_transposed: false,
                },
            )?)
        } else {
            None
        };
        let weight_grad = if weight.track_op() {
            Some(grad.apply_op2_no_bwd(
                x,
                &MatMul {
                    lhs_transposed: true,
                    rhs_transposed: false,
                },
            )?)
        } else {
            None
        };
        let bias_grad = if bias.track_op() {
            Some(grad.apply_op1_no_bwd(&ColumnSum)?)
        } else {
            None
        };
        Ok((x_grad, weight_grad, bias_grad))
    }
}

/// `op(lhs) op(rhs)` of two contiguous 2-D tensors, where `op` transposes
/// an operand whose flag is set.
pub(crate) struct MatMul {
    pub lhs_transposed: bool,
    pub rhs_transposed: bool,
}

impl MatMul {
    fn product<T: Float>(
        &self,
        lhs: (&CpuStorage, &Layout),
        rhs: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (lhs_rows, lhs_cols) = lhs.1.shape().dims2()?;
        let (rhs_rows, rhs_cols) = rhs.1.shape().dims2()?;
        let lhs = Operand {
            values: contiguous_values::<T>(lhs.0, lhs.1, "matmul left operand")?,
            rows: lhs_rows,
            cols: lhs_cols,
            transposed: self.lhs_transposed,
        };
        let rhs = Operand {
            values: contiguous_values::<T>(rhs.0, rhs.1, "matmul right operand")?,
            rows: rhs_rows,
            cols: rhs_cols,
            transposed: self.rhs_transposed,
        };
        let (m, k, _, _) = lhs.strides();
        let (rhs_k, n, _, _) = rhs.strides();
        if k != rhs_k {
            candle_core::bail!(
                "matmul operands {lhs_rows}x{lhs_cols} and {rhs_rows}x{rhs_cols} do not fit"
            );
        }
        let mut out = vec![T::default(); m * n];
        gemm_into(&mut out, lhs, rhs, false);
        Ok((T::into_storage(out), Shape::from((m, n))))
    }
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "matmul-gemm"
    }

    fn cpu_fwd(
        &self,
        lhs: &CpuStorage,
        lhs_layout: &Layout,
        rhs: &CpuStorage,
        rhs_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.product((lhs, lhs_layout), (rhs, rhs_layout)),
            lhs.dtype(),
            "fused linear (supports f32 and f64)"
        )
    }
}

/// The sum over the rows of a contiguous `[rows, cols]` tensor, `[cols]`.
pub(crate) struct ColumnSum;

impl ColumnSum {
    fn sum<T: Float>(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = layout.shape().dims2()?;
        let values = contiguous_values::<T>(storage, layout, "column sum input")?;
        let mut out = vec![T::default(); cols];
        for row in values.chunks_exact(cols.max(1)).take(rows) {
            for (sum, &v) in out.iter_mut().zip(row) {
                *sum += v;
            }
        }
        Ok((T::into_storage(out), Shape::from(cols)))
    }
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.sum(storage, layout),
            storage.dtype(),
            "fused linear (supports f32 and f64)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{random_tensor, relative_error, tolerance, weighted_sum};
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    /// Returns (output, dx, dW, db) of `sum(linear(x, W, b) * weights)`.
    fn run(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        (batch, inputs, outputs): (usize, usize, usize),
        seed: u64,
        dtype: DType,
    ) -> [Tensor; 4] {
        let x = Var::from_tensor(&random_tensor(seed, &[batch, inputs], -1.0, 1.0, dtype)).unwrap();
        let w = Var::from_tensor(&random_tensor(
            seed + 1,
            &[outputs, inputs],
            -1.0,
            1.0,
            dtype,
        ))
        .unwrap();
        let b = Var::from_tensor(&random_tensor(seed + 2, &[outputs], -1.0, 1.0, dtype)).unwrap();
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let grads = weighted_sum(seed + 3, &y).backward().unwrap();
        let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
        [y.clone(), grad(&x), grad(&w), grad(&b)]
    }

    fn check_against_generic(shape: (usize, usize, usize), seed: u64, dtype: DType) {
        let ours = run(linear, shape, seed, dtype);
        let generic = run(linear_generic, shape, seed, dtype);
        // Each entry sums `inputs` (or `batch`) products, so the rounding grows with them.
        let limit = tolerance(dtype) * (shape.0 + shape.1) as f64;
        for (name, (a, b)) in ["output", "dx", "dW", "db"]
            .iter()
            .zip(ours.iter().zip(&generic))
        {
            let error = relative_error(a, b);
            assert!(
                error <= limit,
                "{name} of {shape:?} in {dtype:?}: relative error {error:e} > {limit:e}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn linear_matches_generic_f32(batch in 1usize..40, inputs in 1usize..70, outputs in 1usize..50, seed in 0u64..1000) {
            check_against_generic((batch, inputs, outputs), seed, DType::F32);
        }

        #[test]
        fn linear_matches_generic_f64(batch in 1usize..40, inputs in 1usize..70, outputs in 1usize..50, seed in 0u64..1000) {
            check_against_generic((batch, inputs, outputs), seed, DType::F64);
        }
    }

    #[test]
    fn linear_mlp_shapes_match_generic() {
        // Wide enough for the threaded GEMM when rayon has several threads.
        check_against_generic((256, 784, 100), 7, DType::F32);
        check_against_generic((257, 101, 199), 8, DType::F64);
    }

    #[test]
    fn linear_non_contiguous_input() {
        let x = random_tensor(1, &[5, 3], -1.0, 1.0, DType::F32)
            .t()
            .unwrap();
        let w = random_tensor(2, &[4, 5], -1.0, 1.0, DType::F32);
        let b = random_tensor(3, &[4], -1.0, 1.0, DType::F32);
        let error = relative_error(
            &linear(&x, &w, &b).unwrap(),
            &linear_generic(&x, &w, &b).unwrap(),
        );
        assert!(error <= 1e-6, "relative error {error:e}");
    }

    #[test]
    fn linear_gradient_of_weight_only() {
        let x = random_tensor(1, &[6, 3], -1.0, 1.0, DType::F64);
        let w = Var::from_tensor(&random_tensor(2, &[2, 3], -1.0, 1.0, DType::F64)).unwrap();
        let b = random_tensor(3, &[2], -1.0, 1.0, DType::F64);
        let grads = linear(&x, w.as_tensor(), &b)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let expected = x
            .sum(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((2, 3))
            .unwrap();
        let error = relative_error(grads.get(w.as_tensor()).unwrap(), &expected);
        assert!(error <= 1e-12, "relative error {error:e}");
        assert!(grads.get(&x).is_none(), "an untracked input got a gradient");
    }

    #[test]
    fn linear_empty_batch() {
        let x = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let w = random_tensor(2, &[2, 3], -1.0, 1.0, DType::F32);
        let b = random_tensor(3, &[2], -1.0, 1.0, DType::F32);
        assert_eq!(linear(&x, &w, &b).unwrap().dims(), [0, 2]);
    }

    #[test]
    fn linear_other_dtypes_fall_back_to_candle() {
        let x = random_tensor(1, &[3, 2], -1.0, 1.0, DType::BF16);
        let w = random_tensor(2, &[4, 2], -1.0, 1.0, DType::BF16);
        let b = random_tensor(3, &[4], -1.0, 1.0, DType::BF16);
        let error = relative_error(
            &linear(&x, &w, &b).unwrap(),
            &linear_generic(&x, &w, &b).unwrap(),
        );
        assert!(error <= 1e-2, "relative error {error:e}");
    }

    #[test]
    fn linear_rejects_bad_arguments() {
        let x = random_tensor(1, &[3, 2], -1.0, 1.0, DType::F32);
        let w = random_tensor(2, &[4, 2], -1.0, 1.0, DType::F32);
        let b = random_tensor(3, &[4], -1.0, 1.0, DType::F32);
        let wrong_width = random_tensor(4, &[4, 3], -1.0, 1.0, DType::F32);
        let wrong_bias = random_tensor(5, &[5], -1.0, 1.0, DType::F32);
        let not_matrix = random_tensor(6, &[3, 2, 1], -1.0, 1.0, DType::F32);
        let cases = [
            (linear(&x, &wrong_width, &b), "do not fit"),
            (linear(&x, &w, &wrong_bias), "do not fit"),
            (linear(&not_matrix, &w, &b), "expects input [batch, in]"),
            (
                linear(&x, &w.to_dtype(DType::F64).unwrap(), &b),
                "share one dtype",
            ),
        ];
        for (i, (result, expected)) in cases.into_iter().enumerate() {
            let message = result.unwrap_err().to_string();
            assert!(message.contains(expected), "case {i}: {message}");
        }
    }
}
