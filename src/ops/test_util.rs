//! Helpers for the tests that compare the fused ops with candle's generic ones.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Returns a tensor of `shape` with values uniform in `[lo, hi)`, seeded.
pub fn random_tensor(seed: u64, shape: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let len: usize = shape.iter().product();
    let values: Vec<f64> = (0..len).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Returns the largest difference between `actual` and `expected`, divided
/// by the largest magnitude in `expected` (or by 1 when that is smaller).
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shapes differ");
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (actual, expected) = (values(actual), values(expected));
    let scale = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let max_diff = actual
        .iter()
        .zip(&expected)
        .fold(0.0f64, |m, (a, e)| m.max((a - e).abs()));
    max_diff / scale
}

/// Returns `sum(out * weights)` with random weights in [-1, 1) from `seed`,
/// a scalar whose gradient sends a different weight to every output.
pub fn weighted_sum(seed: u64, out: &Tensor) -> Tensor {
    let weights = random_tensor(seed, out.dims(), -1.0, 1.0, out.dtype());
    (out * weights).unwrap().sum_all().unwrap()
}

/// Relative tolerance for comparing two computations of one value in `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        _ => 1e-5,
    }
}
