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
    if threads < 2 || m * n * k < threads << 17 {
        // SAFETY: the asserts above bound every index that the strides reach:
        // lhs reads m x k, rhs k x n and dst m x n elements of their slices,
        // and `dst` is borrowed mutably, so it aliases neither operand.
        unsafe {
            gemm_block(
                (m, n, k),
                (dst.as_mut_ptr(), n as isize),
                lhs.values.as_ptr(),
                (lhs_rs, lhs_cs),
                rhs.values.as_ptr(),
                (rhs_rs, rhs_cs),
                accumulate,
            );
        }
        return;
    }
    // One block of the result per thread, each a single-threaded GEMM. On
    // the MLP's shapes at two threads this reached 193 to 209 GFLOP/s, and
    // the gemm crate's own split 118 to 179 (docs/BENCHMARKS.md, second and
    // third rounds, on one Zen 4 machine). The
    // longer side of the result is cut, in multiples of 16 rows or columns
    // so that every block but the last fills whole micro-kernel tiles.
    let split_rows = m >= n;
    let side = if split_rows { m } else { n };
    let block = side.div_ceil(threads).div_ceil(16) * 16;
    let (dst_addr, lhs_addr, rhs_addr) = (
        dst.as_mut_ptr() as usize,
        lhs.values.as_ptr() as usize,
        rhs.values.as_ptr() as usize,
    );
    let run_block = move |start: usize| {
        let len = block.min(side - start);
        let (dst, lhs, rhs) = (dst_addr as *mut T, lhs_addr as *const T, rhs_addr as *const T);
        // SAFETY: as in the single-threaded call above. In addition, each
        // block writes only rows (or columns) `start..start + len` of `dst`,
        // which no other block touches. Every offset stays inside the bounds
        // that the asserts checked.
        unsafe {
            if split_rows {
                gemm_block(
                    (len, n, k),
                    (dst.add(start * n), n as isize),
                    lhs.offset(start as isize * lhs_rs),
                    (lhs_rs, lhs_cs),
                    rhs,
                    (rhs_rs, rhs_cs),
                    accumulate,
                );
            } else {
                gemm_block(
                    (m, len, k),
                    (dst.add(start), n as isize),
                    lhs,
                    (lhs_rs, lhs_cs),
                    rhs.offset(start as isize * rhs_cs),
                    (rhs_rs, rhs_cs),
                    accumulate,
                );
            }
        }
    };
    // A caller outside rayon's pool sleeps here while the pool works, so
    // training runs inside the pool (`crate::ops::on_compute_threads`).
    rayon::scope(|scope| {
        for start in (0..side).step_by(block) {
            scope.spawn(move |_| run_block(start));
        }
    });
}

/// Computes the `[m, n]` block at `dst`, whose rows lie `dst_rs` elements
/// apart, on the calling thread.
///
/// # Safety
///
/// Every element that the sizes and strides reach must lie inside live
/// allocations, and the `dst` elements must not alias the operands or be
/// written by another thread during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, isize),
    lhs: *const T,
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (isize, isize),
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
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

    /// Computes `lhs rhs` (plus `start` when accumulating) through
    /// `gemm_into` on a pool of `threads` rayon threads, with each operand
    /// stored transposed or not.
    fn gemm_on_pool<T: Float>(
        threads: usize,
        (m, k, n): (usize, usize, usize),
        (lhs, rhs, start): (&[T], &[T], &[T]),
        (lhs_transposed, rhs_transposed, accumulate): (bool, bool, bool),
    ) -> Vec<T> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut dst = start.to_vec();
        let (lhs_rows, lhs_cols) = if lhs_transposed { (k, m) } else { (m, k) };
        let (rhs_rows, rhs_cols) = if rhs_transposed { (n, k) } else { (k, n) };
        pool.install(|| {
            gemm_into(
                &mut dst,
                Operand { values: lhs, rows: lhs_rows, cols: lhs_cols, transposed: lhs_transposed },
                Operand { values: rhs, rows: rhs_rows, cols: rhs_cols, transposed: rhs_transposed },
                accumulate,
            )
        });
        dst
    }

    /// Checks that the GEMM split over two or three threads, by rows
    /// (m >= n) or by columns, with sizes that leave a partial last block,
    /// gives each element of `lhs rhs` within the dot product's rounding
    /// bound `2 k eps sum |a b|` of an f64 reference and of the one-thread
    /// result.
    fn check_split_gemm<T: Float>(seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // (m, k, n): above the split threshold at 3 threads, 2^17 x 3.
        for (m, k, n) in [(257, 131, 19), (23, 97, 301), (256, 784, 100), (100, 256, 784), (33, 1000, 17)] {
            let mut values = |len: usize| -> Vec<T> {
                (0..len).map(|_| T::from(rng.gen_range(-1.0..1.0)).unwrap()).collect()
            };
            let (lhs, rhs, start) = (values(m * k), values(k * n), values(m * n));
            for (lhs_transposed, rhs_transposed, accumulate) in
                [(false, false, false), (true, false, true), (false, true, false), (true, true, true)]
            {
                let flags = (lhs_transposed, rhs_transposed, accumulate);
                let at = |values: &[T], transposed: bool, row: usize, col: usize, cols: usize, rows: usize| {
                    let index = if transposed { col * rows + row } else { row * cols + col };
                    values[index].to_f64().unwrap()
                };
                let single_thread = gemm_on_pool(1, (m, k, n), (&lhs, &rhs, &start), flags);
                for threads in [2, 3] {
                    let split = gemm_on_pool(threads, (m, k, n), (&lhs, &rhs, &start), flags);
                    for i in 0..m {
                        for j in 0..n {
                            let (mut exact, mut magnitude) = (0.0f64, 0.0f64);
                            for p in 0..k {
                                let product = at(&lhs, lhs_transposed, i, p, k, m) * at(&rhs, rhs_transposed, p, j, n, k);
                                exact += product;
                                magnitude += product.abs();
                            }
                            let first = start[i * n + j].to_f64().unwrap();
                            if accumulate {
                                exact += first;
                                magnitude += first.abs();
                            }
                            let bound = 2.0 * k as f64 * T::epsilon().to_f64().unwrap() * magnitude;
                            let got = split[i * n + j].to_f64().unwrap();
                            let single = single_thread[i * n + j].to_f64().unwrap();
                            let case = format!("[{m}, {k}] x [{k}, {n}], flags {flags:?}, {threads} threads, element ({i}, {j})");
                            assert!(
                                (got - exact).abs() <= bound,
                                "{case}: split {got}, f64 reference {exact}, bound {bound}"
                            );
                            assert!(
                                (got - single).abs() <= bound,
                                "{case}: split {got}, one thread {single}, bound {bound}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn split_gemm_matches_reference_f32() {
        check_split_gemm::<f32>(11);
    }

    #[test]
    fn split_gemm_matches_reference_f64() {
        check_split_gemm::<f64>(12);
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
