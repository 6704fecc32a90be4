//! Branch-free `exp`, `sin` and `tanh` that the compiler vectorises, and
//! the dispatch that compiles a loop for the CPU's widest vector unit.
//!
//! The fused activations and the sign-preserving update spent most of
//! their time in libm's scalar `expf`, `sinf` and `tanhf`, one value per
//! call. The f32 functions here are polynomials with no branches and no
//! calls, so a loop over a slice becomes AVX-512 (or AVX2) code, 16 (or 8)
//! values at a time. They are within 2 ulp of libm on their
//! domains (the tests check this on a dense grid). The f64 versions call libm, because
//! f64 serves the equivalence checks, where the last bits matter more than
//! speed.

/// Scalar functions with a fast f32 form.
pub(crate) trait FastMath: Copy {
    /// `e^x`. The f32 form clamps `x` to [-87.3, 88.3], so it returns
    /// about 1e-38 (not 0) below and about 2e38 (not infinity) above.
    fn fast_exp(self) -> Self;

    /// `sin(x)` for `x` in [0, pi/2]; other inputs are outside its contract.
    fn fast_sin_quadrant(self) -> Self;

    /// `tanh(x)`, odd and within [-1, 1].
    fn fast_tanh(self) -> Self;
}

/// 1.5 * 2^23: adding it rounds an f32 of magnitude below 2^22 to an
/// integer, which then sits in the low bits of the sum's mantissa.
const ROUNDING: f32 = 12_582_912.0;

impl FastMath for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        // Cody-Waite reduction x = n ln 2 + r, |r| <= ln 2 / 2, and Cephes'
        // expf polynomial for e^r; 2^n is built in the exponent bits.
        let x = self.clamp(-87.3, 88.3);
        let shifted = x * std::f32::consts::LOG2_E + ROUNDING;
        let n = shifted - ROUNDING;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let mut p = 1.987_569_1e-4_f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 0.166_666_65;
        p = p * r + 0.5;
        let e_r = p * r * r + r + 1.0;
        // The low mantissa bits of `shifted` hold n in two's complement.
        let n_bits = shifted.to_bits().wrapping_sub(ROUNDING.to_bits()) as i32;
        let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
        e_r * scale
    }

    #[inline(always)]
    fn fast_sin_quadrant(self) -> f32 {
        // Taylor series to x^13: the first omitted term is below
        // (pi/2)^15 / 15! = 7e-10 on [0, pi/2].
        let x = self;
        let x2 = x * x;
        let mut p = 1.605_904_4e-10_f32;
        p = p * x2 - 2.505_210_8e-8;
        p = p * x2 + 2.755_731_9e-6;
        p = p * x2 - 1.984_127e-4;
        p = p * x2 + 8.333_333e-3;
        p = p * x2 - 0.166_666_67;
        x + x * x2 * p
    }

    #[inline(always)]
    fn fast_tanh(self) -> f32 {
        // Below 0.625, x P(x^2) with P a least-squares fit of tanh(x) / x
        // on Chebyshev nodes of x^2 in [0, 0.39] (error 1.4e-10); above,
        // 1 - 2 / (e^{2|x|} + 1), which rounds to exactly 1 where tanh does
        // (|x| above about 9).
        let a = self.abs();
        let x2 = self * self;
        let mut p = 2.130_310_1e-3_f32;
        p = p * x2 - 8.161_236_5e-3;
        p = p * x2 + 2.169_276e-2;
        p = p * x2 - 5.394_489e-2;
        p = p * x2 + 0.133_331_85;
        p = p * x2 - 0.333_333_28;
        p = p * x2 + 1.0;
        let small = self * p;
        let large = (1.0 - 2.0 / ((a + a).fast_exp() + 1.0)).copysign(self);
        if a < 0.625 {
            small
        } else {
            large
        }
    }
}

impl FastMath for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }

    #[inline(always)]
    fn fast_sin_quadrant(self) -> f64 {
        self.sin()
    }

    #[inline(always)]
    fn fast_tanh(self) -> f64 {
        self.tanh()
    }
}

/// A loop over slices that [`vectorized`] compiles for the CPU's widest
/// vector unit. `run` and everything it calls must be
/// `#[inline(always)]` (closures are inlined by the optimiser), so that
/// the loop's code is generated inside the dispatching function with its
/// target features.
pub(crate) trait SliceLoop {
    /// Runs the loop.
    fn run(self);
}

/// Runs `body` compiled for AVX-512 or AVX2 with FMA when the CPU has
/// them, and for the build's baseline otherwise.
pub(crate) fn vectorized<L: SliceLoop>(body: L) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        unsafe fn wide<L: SliceLoop>(body: L) {
            body.run()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn narrow<L: SliceLoop>(body: L) {
            body.run()
        }
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            // SAFETY: the CPU has every feature that `wide` enables.
            return unsafe { wide(body) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has every feature that `narrow` enables.
            return unsafe { narrow(body) };
        }
    }
    body.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 values
    /// of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// `count` evenly spaced points on [lo, hi].
    fn grid(lo: f32, hi: f32, count: usize) -> impl Iterator<Item = f32> {
        (0..count).map(move |i| lo + (hi - lo) * i as f32 / (count - 1) as f32)
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm() {
        for x in grid(-87.0, 88.0, 1_000_001) {
            let (fast, exact) = (x.fast_exp(), (x as f64).exp() as f32);
            assert!(
                ulps(fast, exact) <= 2,
                "exp({x}) = {fast}, libm gives {exact}"
            );
        }
        assert!(1000f32.fast_exp().is_finite(), "exp overflowed");
        assert!((-1000f32).fast_exp() >= 0.0, "exp went negative");
    }

    #[test]
    fn sin_is_within_2_ulp_of_libm() {
        for x in grid(0.0, std::f32::consts::FRAC_PI_2, 1_000_001) {
            let (fast, exact) = (x.fast_sin_quadrant(), (x as f64).sin() as f32);
            assert!(
                ulps(fast, exact) <= 2,
                "sin({x}) = {fast}, libm gives {exact}"
            );
        }
    }

    #[test]
    fn tanh_is_within_2_ulp_of_libm() {
        for x in grid(-12.0, 12.0, 1_000_001).chain(grid(-1e-3, 1e-3, 10_001)) {
            let (fast, exact) = (x.fast_tanh(), (x as f64).tanh() as f32);
            assert!(
                ulps(fast, exact) <= 2,
                "tanh({x}) = {fast}, libm gives {exact}"
            );
        }
        assert_eq!(0f32.fast_tanh(), 0.0, "tanh(0)");
        assert_eq!(100f32.fast_tanh(), 1.0, "tanh(100)");
        // libm's tanh rounds to exactly 1 from about 9.01 on; so must this,
        // or the sign-preserving update with lr_out = 1 would zero fewer
        // weights than the generic one.
        for x in grid(9.02, 20.0, 10_001) {
            assert_eq!(x.fast_tanh(), 1.0, "tanh({x})");
        }
    }

    struct NegativeExp<'a> {
        x: &'a [f32],
        y: &'a mut [f32],
    }

    impl SliceLoop for NegativeExp<'_> {
        #[inline(always)]
        fn run(self) {
            for (y, &x) in self.y.iter_mut().zip(self.x) {
                *y = (-x).fast_exp();
            }
        }
    }

    #[test]
    fn vectorized_runs_the_body() {
        let x: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
        let mut y = vec![0f32; x.len()];
        vectorized(NegativeExp { x: &x, y: &mut y });
        for (y, x) in y.iter().zip(&x) {
            assert!(ulps(*y, (-(*x as f64)).exp() as f32) <= 2, "e^-{x} = {y}");
        }
    }
}
