//! The sign-preserving update `p <- p (1 - lr_out tanh(lr_in g))` in one pass.
//!
//! Candle's generic ops take nine passes over each parameter for this update
//! (scale, tanh, factor, product, two comparisons, their product, a cast and
//! a sum for the count of new zeros), each allocating a tensor. In a profile
//! of the MLP's non-negative training they took longer than the forward
//! pass. [`sign_preserving_update`] computes the same values in one
//! vectorised pass, and [`sign_preserving_update_in_place`] writes them
//! into the parameter's storage, split over rayon's threads, without a
//! new tensor and a copy. [`subtract_scaled_in_place`] does the same for
//! the SGD step.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backend::BackendStorage;
use rayon::prelude::*;
use candle_core::{CpuStorage, CustomOp2, DType, InplaceOp2, Layout, Shape, Tensor};

use super::conv::Float;
use super::fastmath::{vectorized, SliceLoop};
use super::linear::contiguous_values;
use crate::Result;

/// Returns `p (1 - lr_out tanh(lr_in g))` and the number of entries that
/// were non-zero in `p` and are exactly 0 in the result. It returns `None`
/// for tensors that the fused path does not cover (other devices and
/// dtypes), so that the caller runs candle's generic ops.
///
/// In f64 the result matches the generic
/// `g.affine(lr_in, 0)?.tanh()?.affine(-lr_out, 1)?` and `p.mul(..)` bit for
/// bit, because each step rounds to the dtype in the same order. In f32 the
/// tanh is [`FastMath::fast_tanh`](super::fastmath::FastMath), within 2 ulp
/// of libm's, and it is exactly 1 where libm's is.
pub fn sign_preserving_update(
    p: &Tensor,
    g: &Tensor,
    lr_in: f64,
    lr_out: f64,
) -> Result<Option<(Tensor, usize)>> {
    let is_fused_dtype = matches!(p.dtype(), DType::F32 | DType::F64);
    if !p.device().is_cpu() || !is_fused_dtype || p.dtype() != g.dtype() || p.shape() != g.shape() {
        return Ok(None);
    }
    let op = SignPreservingUpdate {
        lr_in,
        lr_out,
        zeroed: AtomicUsize::new(0),
    };
    let updated = p.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &op)?;
    Ok(Some((updated, op.zeroed.into_inner())))
}

/// Applies `p <- p (1 - lr_out tanh(lr_in g))` to the storage of `p` in
/// place, with the values of [`sign_preserving_update`], and returns the
/// number of entries it turned from non-zero to exactly 0. Every tensor
/// that shares the storage (a `Var` and its clones) reads the new values.
///
/// It returns `None`, and changes nothing, where [`sign_preserving_update`]
/// returns `None` or `p` is not contiguous.
pub fn sign_preserving_update_in_place(p: &Tensor, g: &Tensor, lr_in: f64, lr_out: f64) -> Result<Option<usize>> {
    if !fits_in_place(p, g) {
        return Ok(None);
    }
    let op = SignPreservingUpdate {
        lr_in,
        lr_out,
        zeroed: AtomicUsize::new(0),
    };
    p.inplace_op2(&g.contiguous()?, &op)?;
    Ok(Some(op.zeroed.into_inner()))
}

/// Applies `p <- p - lr v` to the storage of `p` in place: the SGD step,
/// rounded like candle's `p - v.affine(lr, 0)` (a product, then a
/// difference). It returns `false`, and changes nothing, for other devices
/// and dtypes, for `p` and `v` of different dtypes or shapes, and for a `p`
/// that is not contiguous.
pub fn subtract_scaled_in_place(p: &Tensor, v: &Tensor, lr: f64) -> Result<bool> {
    if !fits_in_place(p, v) {
        return Ok(false);
    }
    p.inplace_op2(&v.contiguous()?, &SubtractScaled { lr })?;
    Ok(true)
}

/// Returns whether the in-place ops cover `p` and `g`: CPU f32 or f64
/// tensors of one dtype and shape, `p` contiguous.
fn fits_in_place(p: &Tensor, g: &Tensor) -> bool {
    p.device().is_cpu()
        && matches!(p.dtype(), DType::F32 | DType::F64)
        && p.dtype() == g.dtype()
        && p.shape() == g.shape()
        && p.is_contiguous()
}

/// Entries per rayon task of the in-place update. A task takes about 4
/// microseconds on Zen 5 (an estimate from the measured step), several
/// times rayon's cost of starting it. With
/// `1 << 15`, the MLP's first layer (78,400 weights) made three tasks, so
/// at two threads one thread ran two of them. With `1 << 13`, the
/// non-negative MLP step at two threads went from 0.70-0.75 to 0.66 ms.
const PARALLEL_CHUNK: usize = 1 << 13;

struct SignPreservingUpdate {
    lr_in: f64,
    lr_out: f64,
    /// Entries that the last call turned from non-zero to exactly 0.
    zeroed: AtomicUsize,
}

impl SignPreservingUpdate {
    fn update<T: Float>(
        &self,
        p: (&CpuStorage, &Layout),
        g: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p_values = contiguous_values::<T>(p.0, p.1, "parameter")?;
        let g_values = contiguous_values::<T>(g.0, g.1, "gradient")?;
        let c = |v: f64| T::from(v).unwrap_or_else(T::nan);
        let mut updated = vec![T::default(); p_values.len()];
        let mut zeroed = 0;
        let chunks = updated
            .chunks_mut(PARALLEL_CHUNK)
            .zip(p_values.chunks(PARALLEL_CHUNK).zip(g_values.chunks(PARALLEL_CHUNK)));
        for (out, (p, g)) in chunks {
            let mut chunk_zeroed = 0;
            vectorized(Update {
                p,
                g,
                lr_in: c(self.lr_in),
                minus_lr_out: c(-self.lr_out),
                out,
                zeroed: &mut chunk_zeroed,
            });
            zeroed += chunk_zeroed as usize;
        }
        self.zeroed.store(zeroed, Ordering::Relaxed);
        Ok((T::into_storage(updated), p.1.shape().clone()))
    }

    fn update_in_place<T: Float>(
        &self,
        p: (&mut CpuStorage, &Layout),
        g: (&CpuStorage, &Layout),
    ) -> candle_core::Result<()> {
        let p_values = contiguous_values_mut::<T>(p.0, p.1, "parameter")?;
        let g_values = contiguous_values::<T>(g.0, g.1, "gradient")?;
        let c = |v: f64| T::from(v).unwrap_or_else(T::nan);
        let (lr_in, minus_lr_out) = (c(self.lr_in), c(-self.lr_out));
        // Chunks over rayon's threads: each entry depends on its own `p` and
        // `g` only, so the values do not depend on the split.
        let zeroed = p_values
            .par_chunks_mut(PARALLEL_CHUNK)
            .zip(g_values.par_chunks(PARALLEL_CHUNK))
            .map(|(p, g)| {
                let mut zeroed = 0;
                vectorized(UpdateInPlace { p, g, lr_in, minus_lr_out, zeroed: &mut zeroed });
                zeroed as usize
            })
            .sum();
        self.zeroed.store(zeroed, Ordering::Relaxed);
        Ok(())
    }
}

/// The loop of [`SignPreservingUpdate`], for [`vectorized`].
struct Update<'a, T> {
    p: &'a [T],
    g: &'a [T],
    lr_in: T,
    minus_lr_out: T,
    out: &'a mut [T],
    /// Count of new zeros. A 32-bit count lets the loop use 16 f32 lanes on
    /// AVX-512 (a 64-bit one used 8), and callers pass at most `PARALLEL_CHUNK` entries.
    zeroed: &'a mut u32,
}

impl<T: Float> SliceLoop for Update<'_, T> {
    #[inline(always)]
    fn run(self) {
        let mut zeroed = 0;
        for ((o, &p), &g) in self.out.iter_mut().zip(self.p).zip(self.g) {
            let updated = sign_preserving(p, g, self.lr_in, self.minus_lr_out);
            zeroed += u32::from(p != T::zero() && updated == T::zero());
            *o = updated;
        }
        *self.zeroed = zeroed;
    }
}

/// The in-place loop of [`SignPreservingUpdate`], for [`vectorized`].
struct UpdateInPlace<'a, T> {
    p: &'a mut [T],
    g: &'a [T],
    lr_in: T,
    minus_lr_out: T,
    /// Count of new zeros, 32-bit as in [`Update`].
    zeroed: &'a mut u32,
}

impl<T: Float> SliceLoop for UpdateInPlace<'_, T> {
    #[inline(always)]
    fn run(self) {
        let mut zeroed = 0;
        for (p, &g) in self.p.iter_mut().zip(self.g) {
            let updated = sign_preserving(*p, g, self.lr_in, self.minus_lr_out);
            zeroed += u32::from(*p != T::zero() && updated == T::zero());
            *p = updated;
        }
        *self.zeroed = zeroed;
    }
}

/// Returns `p (1 - lr_out tanh(lr_in g))`, rounded step by step like
/// candle's generic ops.
#[inline(always)]
fn sign_preserving<T: Float>(p: T, g: T, lr_in: T, minus_lr_out: T) -> T {
    let t = (g * lr_in).fast_tanh();
    p * (t * minus_lr_out + T::one())
}

/// `p <- p - lr v` in place, for [`subtract_scaled_in_place`].
struct SubtractScaled {
    lr: f64,
}

impl SubtractScaled {
    fn apply<T: Float>(&self, p: (&mut CpuStorage, &Layout), v: (&CpuStorage, &Layout)) -> candle_core::Result<()> {
        let p_values = contiguous_values_mut::<T>(p.0, p.1, "parameter")?;
        let v_values = contiguous_values::<T>(v.0, v.1, "step")?;
        let lr = T::from(self.lr).unwrap_or_else(T::nan);
        for (p, &v) in p_values.iter_mut().zip(v_values) {
            *p = *p - v * lr;
        }
        Ok(())
    }
}

impl InplaceOp2 for SubtractScaled {
    fn name(&self) -> &'static str {
        "subtract-scaled-in-place"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, p_layout: &Layout, v: &CpuStorage, v_layout: &Layout) -> candle_core::Result<()> {
        let dtype = p.dtype();
        dispatch_float!(self.apply((p, p_layout), (v, v_layout)), dtype, "in-place SGD step (supports f32 and f64)")
    }
}

impl InplaceOp2 for SignPreservingUpdate {
    fn name(&self) -> &'static str {
        "sign-preserving-update-in-place"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, p_layout: &Layout, g: &CpuStorage, g_layout: &Layout) -> candle_core::Result<()> {
        let dtype = p.dtype();
        dispatch_float!(
            self.update_in_place((p, p_layout), (g, g_layout)),
            dtype,
            "fused sign-preserving update (supports f32 and f64)"
        )
    }
}

/// Returns the contiguous values of a mutable storage, or an error naming `what`.
fn contiguous_values_mut<'a, T: Float>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut T::values_mut(storage)?[start..end]),
        None => candle_core::bail!("{what} must be contiguous, got strides {:?}", layout.stride()),
    }
}

impl CustomOp2 for SignPreservingUpdate {
    fn name(&self) -> &'static str {
        "sign-preserving-update"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        p_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.update((p, p_layout), (g, g_layout)),
            p.dtype(),
            "fused sign-preserving update (supports f32 and f64)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::random_tensor;
    use proptest::prelude::*;

    /// Returns the update and its new zeros as candle's generic ops compute them.
    fn generic(p: &Tensor, g: &Tensor, lr_in: f64, lr_out: f64) -> (Tensor, usize) {
        let t = g.affine(lr_in, 0.0).unwrap().tanh().unwrap();
        let updated = p.mul(&t.affine(-lr_out, 1.0).unwrap()).unwrap();
        let newly_zero = p.ne(0.0).unwrap().mul(&updated.eq(0.0).unwrap()).unwrap();
        let count = newly_zero
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        (updated, count as usize)
    }

    /// Compares the fused update with the generic one: bit for bit in f64;
    /// in f32 within 4 ulp of the factor `1 - lr_out tanh(lr_in g)` times
    /// `p`, which is the fast tanh's error. The count of new zeros is
    /// checked against the fused values themselves, because a tanh that
    /// rounds to 1 in one form and to 1 - 1 ulp in the other zeroes an
    /// entry in only one of them.
    fn check_against_generic(len: usize, lr_in: f64, lr_out: f64, seed: u64, dtype: DType) {
        let p = random_tensor(seed, &[len], 0.0, 2.0, dtype);
        // Gradients up to 1e3 drive tanh to exactly 1, which zeroes entries when lr_out = 1.
        let g = random_tensor(seed + 1, &[len], -1e3, 1e3, dtype);
        let (updated, zeroed) = sign_preserving_update(&p, &g, lr_in, lr_out)
            .unwrap()
            .unwrap();
        let (expected, expected_zeroed) = generic(&p, &g, lr_in, lr_out);
        let values =
            |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).unwrap().to_vec1().unwrap() };
        let (updated, expected, p) = (values(&updated), values(&expected), values(&p));
        if dtype == DType::F64 {
            let bits = |v: &[f64]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&updated), bits(&expected), "values differ in f64");
            assert_eq!(zeroed, expected_zeroed, "zero counts differ in f64");
            return;
        }
        let ulp = f64::from(f32::EPSILON);
        for i in 0..len {
            let limit = 4.0 * ulp * p[i] * (1.0 + lr_out);
            let difference = (updated[i] - expected[i]).abs();
            assert!(
                difference <= limit,
                "entry {i}: fused {} and generic {} differ by {difference:e} (limit {limit:e})",
                updated[i],
                expected[i]
            );
        }
        let counted = (0..len)
            .filter(|&i| p[i] != 0.0 && updated[i] == 0.0)
            .count();
        assert_eq!(zeroed, counted, "zero count in f32");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn update_matches_generic(
            len in 1usize..500,
            lr_in in 0.0f64..2.0,
            lr_out in prop_oneof![Just(1.0f64), 0.01f64..1.0],
            seed in 0u64..1000,
        ) {
            check_against_generic(len, lr_in, lr_out, seed, DType::F32);
            check_against_generic(len, lr_in, lr_out, seed, DType::F64);
        }
    }

    #[test]
    fn update_counts_new_zeros() {
        let p = Tensor::new(&[1.0f32, 0.0, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
        let g = Tensor::new(&[1e4f32, 1e4, 0.0, -1e4], &candle_core::Device::Cpu).unwrap();
        let (updated, zeroed) = sign_preserving_update(&p, &g, 1.0, 1.0).unwrap().unwrap();
        assert_eq!(updated.to_vec1::<f32>().unwrap(), [0.0, 0.0, 2.0, 6.0]);
        assert_eq!(zeroed, 1, "only the first entry was non-zero and became 0");
    }

    #[test]
    fn update_other_dtypes_are_not_fused() {
        let p = random_tensor(1, &[3], 0.0, 1.0, DType::F16);
        assert!(
            sign_preserving_update(&p, &p, 0.1, 0.5).unwrap().is_none(),
            "f16 was fused"
        );
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        let values: Vec<f64> = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Checks that the in-place update writes the out-of-place one's values,
    /// bit for bit, into the storage that a `Var` and its clones share, and counts
    /// the same new zeros.
    fn check_in_place(len: usize, lr_in: f64, lr_out: f64, seed: u64, dtype: DType) {
        let p = candle_core::Var::from_tensor(&random_tensor(seed, &[len], 0.0, 2.0, dtype)).unwrap();
        let g = random_tensor(seed + 1, &[len], -1e3, 1e3, dtype);
        let (expected, expected_zeroed) = sign_preserving_update(p.as_tensor(), &g, lr_in, lr_out).unwrap().unwrap();
        let clone = p.as_tensor().clone();
        let zeroed = sign_preserving_update_in_place(p.as_tensor(), &g, lr_in, lr_out).unwrap();
        assert_eq!(zeroed, Some(expected_zeroed), "zero count, {dtype:?}");
        assert_eq!(bits(p.as_tensor()), bits(&expected), "values, {dtype:?}");
        assert_eq!(bits(&clone), bits(&expected), "a clone of the parameter, {dtype:?}");
    }

    /// Checks that the in-place SGD step rounds like `p - v.affine(lr, 0)`.
    fn check_subtract_scaled(len: usize, lr: f64, seed: u64, dtype: DType) {
        let p = random_tensor(seed, &[len], -1.0, 1.0, dtype);
        let v = random_tensor(seed + 1, &[len], -10.0, 10.0, dtype);
        let expected = (&p - v.affine(lr, 0.0).unwrap()).unwrap();
        assert!(subtract_scaled_in_place(&p, &v, lr).unwrap(), "{dtype:?} was not updated in place");
        assert_eq!(bits(&p), bits(&expected), "values, {dtype:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn in_place_update_matches_out_of_place(
            len in 1usize..500,
            lr_in in 0.0f64..2.0,
            lr_out in prop_oneof![Just(1.0f64), 0.01f64..1.0],
            seed in 0u64..1000,
        ) {
            check_in_place(len, lr_in, lr_out, seed, DType::F32);
            check_in_place(len, lr_in, lr_out, seed, DType::F64);
        }

        #[test]
        fn in_place_sgd_step_matches_generic(len in 1usize..500, lr in 0.0f64..2.0, seed in 0u64..1000) {
            check_subtract_scaled(len, lr, seed, DType::F32);
            check_subtract_scaled(len, lr, seed, DType::F64);
        }
    }

    /// Tensors of several `PARALLEL_CHUNK`s and a partial one: both
    /// updates count new zeros per chunk and add the counts up.
    #[test]
    fn updates_over_several_chunks_match() {
        let len = 3 * PARALLEL_CHUNK + 5;
        for (seed, lr_out) in [(1, 1.0), (2, 0.3)] {
            for dtype in [DType::F32, DType::F64] {
                check_against_generic(len, 0.5, lr_out, seed, dtype);
                check_in_place(len, 0.5, lr_out, seed, dtype);
            }
        }
    }

    /// f16 parameters and transposed (non-contiguous) ones are left to
    /// candle's generic ops, unchanged.
    #[test]
    fn in_place_ops_skip_f16_and_transposed() {
        let half = random_tensor(1, &[3], 0.0, 1.0, DType::F16);
        let before = bits(&half);
        assert_eq!(sign_preserving_update_in_place(&half, &half, 0.1, 0.5).unwrap(), None, "f16 update");
        assert!(!subtract_scaled_in_place(&half, &half, 0.1).unwrap(), "f16 SGD step");
        assert_eq!(bits(&half), before, "f16 values changed");
        let square = random_tensor(2, &[4, 4], 0.0, 1.0, DType::F32);
        let transposed = square.t().unwrap();
        let before = bits(&square);
        assert_eq!(sign_preserving_update_in_place(&transposed, &square, 0.1, 0.5).unwrap(), None, "transposed update");
        assert!(!subtract_scaled_in_place(&transposed, &square, 0.1).unwrap(), "transposed SGD step");
        assert_eq!(bits(&square), before, "transposed values changed");
    }
}
