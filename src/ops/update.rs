//! The sign-preserving update `p <- p (1 - lr_out tanh(lr_in g))` in one pass.
//!
//! Candle's generic ops take nine passes over each parameter for this update
//! (scale, tanh, factor, product, two comparisons, their product, a cast and
//! a sum for the count of new zeros), each allocating a tensor. In a profile
//! of the MLP's non-negative training they took longer than the forward
//! pass. [`sign_preserving_update`] computes the same values in one
//! vectorised pass.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

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
        vectorized(Update {
            p: p_values,
            g: g_values,
            lr_in: c(self.lr_in),
            minus_lr_out: c(-self.lr_out),
            out: &mut updated,
            zeroed: &mut zeroed,
        });
        self.zeroed.store(zeroed, Ordering::Relaxed);
        Ok((T::into_storage(updated), p.1.shape().clone()))
    }
}

/// The loop of [`SignPreservingUpdate`], for [`vectorized`].
struct Update<'a, T> {
    p: &'a [T],
    g: &'a [T],
    lr_in: T,
    minus_lr_out: T,
    out: &'a mut [T],
    zeroed: &'a mut usize,
}

impl<T: Float> SliceLoop for Update<'_, T> {
    #[inline(always)]
    fn run(self) {
        let mut zeroed = 0;
        for ((o, &p), &g) in self.out.iter_mut().zip(self.p).zip(self.g) {
            let t = (g * self.lr_in).fast_tanh();
            let updated = p * (t * self.minus_lr_out + T::one());
            zeroed += usize::from(p != T::zero() && updated == T::zero());
            *o = updated;
        }
        *self.zeroed = zeroed;
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
}
