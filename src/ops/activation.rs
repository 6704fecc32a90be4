//! The photonic activations as single autograd nodes.
//!
//! Candle 0.11 evaluates the photonic sigmoid as four elementwise nodes
//! (minimum, affine, sigmoid, affine) and the sinusoidal one as four more
//! (clamp, affine, sin, sqr), each of which allocates its output in the
//! forward pass and its gradient in the backward pass. [`shifted_activation`]
//! computes `f(x + input_offset) - output_offset` in one pass over the data,
//! and its backward pass evaluates `f'` in one more.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::Float;
use super::fastmath::{vectorized, SliceLoop};
use super::linear::contiguous_values;
use crate::activation::{sigmoid_fit, Activation};
use crate::Result;

/// Elements per rayon task; smaller tensors run on the calling thread.
const PARALLEL_CHUNK: usize = 1 << 14;

/// A photonic activation or measured curve operated with shifted input and
/// output, `f(x + input_offset) - output_offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShiftedActivation {
    /// The response `f`: a photonic one or a measured curve.
    pub activation: Activation,
    /// Added to the input before `f`.
    pub input_offset: f64,
    /// Subtracted from `f`'s output.
    pub output_offset: f64,
    /// Clamp `f`'s output to [`Activation::output_bounds`] before the shift.
    pub clamp: bool,
}

/// Applies `op` as one fused node when it can: a photonic activation or a
/// measured curve on an f32 or f64 CPU tensor. Returns `None` otherwise, so that the caller runs
/// candle's generic ops.
pub fn shifted_activation(x: &Tensor, op: ShiftedActivation) -> Result<Option<Tensor>> {
    let is_photonic = matches!(
        op.activation,
        Activation::PhotonicSigmoid | Activation::PhotonicSinusoidal | Activation::Curve(_)
    );
    let is_fused_dtype = matches!(x.dtype(), DType::F32 | DType::F64);
    if !is_photonic || !is_fused_dtype || !x.device().is_cpu() {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// The constants of a [`ShiftedActivation`] in the dtype `T`, converted
/// once per call rather than once per value.
struct Response<'a, T> {
    form: Form<'a, T>,
    input_offset: T,
    output_offset: T,
    /// Output bounds when the op clamps, else (-inf, inf).
    lo: T,
    hi: T,
}

/// The response `f` with its constants in `T`.
enum Form<'a, T> {
    Sigmoid(Sigmoid<T>),
    Sinusoid,
    Curve(&'a crate::curve::TransferCurve),
}

/// The photonic sigmoid's constants in `T`.
#[derive(Clone, Copy)]
struct Sigmoid<T> {
    cutoff: T,
    x0: T,
    d: T,
    a1: T,
    span: T,
    slope: T,
}

impl<T: Float> Sigmoid<T> {
    /// Returns the sigmoid and its derivative at `x`; 0 above the cutoff.
    #[inline(always)]
    fn eval(&self, x: T) -> (T, T) {
        let t = (x.min(self.cutoff) - self.x0) / self.d;
        let s = T::one() / (T::one() + (-t).fast_exp());
        let dy = self.slope * s * (T::one() - s);
        (
            self.a1 + self.span * s,
            if x < self.cutoff { dy } else { T::zero() },
        )
    }
}

/// Returns the photonic sinusoid `sin^2(pi/2 clamp(x, 0, 1))` and its
/// derivative at `x`; 0 outside (0, 1).
#[inline(always)]
fn sinusoid<T: Float>(x: T) -> (T, T) {
    let half_pi = T::from(std::f64::consts::FRAC_PI_2).unwrap_or_else(T::nan);
    let pi = half_pi + half_pi;
    let u = x.max(T::zero()).min(T::one());
    // sin(pi u) = 2 sin(pi u / 2) cos(pi u / 2), and the cosine is the sine
    // of the other part of the quadrant.
    let s = (half_pi * u).fast_sin_quadrant();
    let c = (half_pi * (T::one() - u)).fast_sin_quadrant();
    let inside = x > T::zero() && x < T::one();
    (s * s, if inside { pi * s * c } else { T::zero() })
}

impl<'a, T: Float> Response<'a, T> {
    /// Converts the constants of `op`, or returns `None` for an activation
    /// that the fused op does not cover.
    fn new(op: &'a ShiftedActivation) -> Option<Self> {
        let c = |v: f64| T::from(v).unwrap_or_else(T::nan);
        let form = match &op.activation {
            Activation::PhotonicSigmoid => {
                use sigmoid_fit::*;
                Form::Sigmoid(Sigmoid {
                    cutoff: c(X0 + CUTOFF),
                    x0: c(X0),
                    d: c(D),
                    a1: c(A1),
                    span: c(A2 - A1),
                    slope: c((A2 - A1) / D),
                })
            }
            Activation::PhotonicSinusoidal => Form::Sinusoid,
            Activation::Curve(curve) => Form::Curve(curve),
            Activation::ReluN { .. }
            | Activation::Relu
            | Activation::Tanh
            | Activation::Gelu
            | Activation::GeluN { .. } => return None,
        };
        let (lo, hi) = match (op.clamp, op.activation.output_bounds()) {
            (true, Some((lo, hi))) => (c(lo), c(hi)),
            _ => (T::neg_infinity(), T::infinity()),
        };
        Some(Response {
            form,
            input_offset: c(op.input_offset),
            output_offset: c(op.output_offset),
            lo,
            hi,
        })
    }

    /// Applies `f(x + bias + input_offset) - output_offset` (without
    /// `gradients`) or `g f'(x + bias + input_offset)` (with them) to each
    /// value of `x`.
    ///
    /// The derivative is 0 where the fitted model clamps the input (above
    /// `X0 + CUTOFF` for the sigmoid, outside `[0, 1]` for the sinusoid), as
    /// candle's `minimum` and `clamp` give it. A curve's derivative is the
    /// slope of the segment on the right of `x`. Clamping the output to the
    /// bounds changes only rounding, so it leaves the derivative as it is.
    #[inline(always)]
    fn apply(&self, x: &[T], bias: T, gradients: Option<&[T]>, out: &mut [T]) {
        match self.form {
            Form::Sigmoid(sigmoid) => self.each(|x| sigmoid.eval(x), x, bias, gradients, out),
            Form::Sinusoid => self.each(sinusoid, x, bias, gradients, out),
            Form::Curve(curve) => self.each(|x| curve.eval_with_slope(x), x, bias, gradients, out),
        }
    }

    /// Runs [`apply`](Self::apply)'s loop for one response `f`, which
    /// returns the value and the derivative.
    #[inline(always)]
    ///
    /// `bias` is added to each value first, rounding as a separate bias
    /// node before the activation would (0 adds nothing).
    #[allow(clippy::too_many_arguments)]
    fn each(&self, f: impl Fn(T) -> (T, T), x: &[T], bias: T, gradients: Option<&[T]>, out: &mut [T]) {
        match gradients {
            None => {
                for (o, &x) in out.iter_mut().zip(x) {
                    let y = f((x + bias) + self.input_offset).0;
                    *o = y.max(self.lo).min(self.hi) - self.output_offset;
                }
            }
            Some(g) => {
                for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                    *o = g * f((x + bias) + self.input_offset).1;
                }
            }
        }
    }
}

/// One chunk of [`Response::apply`], for [`vectorized`].
struct Chunk<'r, 'a, T> {
    response: &'r Response<'a, T>,
    x: &'r [T],
    gradients: Option<&'r [T]>,
    out: &'r mut [T],
}

impl<T: Float> SliceLoop for Chunk<'_, '_, T> {
    #[inline(always)]
    fn run(self) {
        self.response.apply(self.x, T::zero(), self.gradients, self.out)
    }
}

/// The planes `[H, W]` of a `[B, C, H, W]` tensor, from plane `first` on,
/// each with its channel's bias, for [`vectorized`].
struct Planes<'r, 'a, T> {
    response: &'r Response<'a, T>,
    x: &'r [T],
    biases: &'r [T],
    first: usize,
    area: usize,
    gradients: Option<&'r [T]>,
    out: &'r mut [T],
}

impl<T: Float> SliceLoop for Planes<'_, '_, T> {
    #[inline(always)]
    fn run(self) {
        let channels = self.biases.len();
        for (i, (out, x)) in self.out.chunks_mut(self.area).zip(self.x.chunks(self.area)).enumerate() {
            let offset = i * self.area;
            let gradients = self.gradients.map(|g| &g[offset..offset + self.area]);
            let bias = self.biases[(self.first + i) % channels];
            self.response.apply(x, bias, gradients, out);
        }
    }
}

impl ShiftedActivation {
    fn forward<T: Float>(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_values::<T>(storage, layout, "activation input")?;
        let response = Response::<T>::new(self).ok_or_else(|| not_fused(&self.activation))?;
        let mut out = vec![T::default(); x.len()];
        let apply = |(out, x): (&mut [T], &[T])| {
            vectorized(Chunk {
                response: &response,
                x,
                gradients: None,
                out,
            })
        };
        if x.len() > PARALLEL_CHUNK {
            out.par_chunks_mut(PARALLEL_CHUNK)
                .zip(x.par_chunks(PARALLEL_CHUNK))
                .for_each(apply);
        } else {
            apply((&mut out, x));
        }
        Ok((T::into_storage(out), layout.shape().clone()))
    }

    fn input_grad<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        grad: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if x.1.shape() != grad.1.shape() {
            candle_core::bail!(
                "activation gradient has shape {:?}, but the input has {:?}",
                grad.1.shape(),
                x.1.shape()
            );
        }
        let x_values = contiguous_values::<T>(x.0, x.1, "activation input")?;
        let grad_values = contiguous_values::<T>(grad.0, grad.1, "activation output gradient")?;
        let response = Response::<T>::new(self).ok_or_else(|| not_fused(&self.activation))?;
        let mut out = vec![T::default(); x_values.len()];
        let apply = |((out, x), g): ((&mut [T], &[T]), &[T])| {
            vectorized(Chunk {
                response: &response,
                x,
                gradients: Some(g),
                out,
            })
        };
        if x_values.len() > PARALLEL_CHUNK {
            out.par_chunks_mut(PARALLEL_CHUNK)
                .zip(x_values.par_chunks(PARALLEL_CHUNK))
                .zip(grad_values.par_chunks(PARALLEL_CHUNK))
                .for_each(apply);
        } else {
            apply(((&mut out, x_values), grad_values));
        }
        Ok((T::into_storage(out), x.1.shape().clone()))
    }
}

/// Returns the error for an op built around an activation it does not cover, which
/// [`shifted_activation`] never does.
fn not_fused(activation: &Activation) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "the fused activation op does not cover {activation}"
    ))
}

/// Returns whether [`bias_activation`] computes `activation` on `z` as one node:
/// a photonic activation or a measured curve on an f32 or f64 CPU tensor.
pub fn bias_activation_fuses(z: &Tensor, activation: &Activation) -> bool {
    let is_photonic = matches!(
        activation,
        Activation::PhotonicSigmoid | Activation::PhotonicSinusoidal | Activation::Curve(_)
    );
    is_photonic && matches!(z.dtype(), DType::F32 | DType::F64) && z.device().is_cpu()
}

/// Returns `op` applied to `z + bias`, with `z` `[B, C, H, W]` (a
/// convolution's output) and `bias` `[C]`, as one autograd node.
///
/// It computes what [`super::add_channel_bias`] followed by
/// [`shifted_activation`] computes, with the same rounding, in one pass
/// instead of two, and its backward pass gives the gradients of `z` and
/// `bias` in one pass and a sum. Callers check [`bias_activation_fuses`]
/// first; other cases are an error.
///
/// # Errors
///
/// Returns [`crate::Error::Shape`] when `z` is not 4-D or `bias` is not
/// `[C]` of the same dtype, and an error when the op does not fuse.
pub fn bias_activation(z: &Tensor, bias: &Tensor, op: ShiftedActivation) -> Result<Tensor> {
    super::bias::check_channel_bias(z, bias, "bias and activation expect")?;
    if !bias_activation_fuses(z, &op.activation) {
        return Err(not_fused(&op.activation).into());
    }
    Ok(z.contiguous()?.apply_op2(&bias.contiguous()?, BiasActivation(op))?)
}

/// The node of [`bias_activation`]: `z` (first argument) and `bias`.
struct BiasActivation(ShiftedActivation);

impl BiasActivation {
    /// Applies the activation to `z + bias`, or with `grad` its input
    /// gradient `grad f'(z + bias)`, plane by plane.
    fn planes<T: Float>(
        &self,
        z: (&CpuStorage, &Layout),
        bias: (&CpuStorage, &Layout),
        grad: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let values = contiguous_values::<T>(z.0, z.1, "activation input")?;
        let biases = contiguous_values::<T>(bias.0, bias.1, "bias")?;
        let gradients = match grad {
            Some((storage, layout)) => {
                if layout.shape() != z.1.shape() {
                    candle_core::bail!(
                        "activation gradient has shape {:?}, but the input has {:?}",
                        layout.shape(),
                        z.1.shape()
                    );
                }
                Some(contiguous_values::<T>(storage, layout, "activation output gradient")?)
            }
            None => None,
        };
        let response = Response::<T>::new(&self.0).ok_or_else(|| not_fused(&self.0.activation))?;
        let (_, _, height, width) = z.1.shape().dims4()?;
        let area = height * width;
        let mut out = vec![T::default(); values.len()];
        if area > 0 {
            let per_task = (PARALLEL_CHUNK / area).max(1) * area;
            out.par_chunks_mut(per_task).enumerate().for_each(|(task, out)| {
                let start = task * per_task;
                vectorized(Planes {
                    response: &response,
                    x: &values[start..start + out.len()],
                    biases,
                    first: start / area,
                    area,
                    gradients: gradients.map(|g| &g[start..start + out.len()]),
                    out,
                })
            });
        }
        Ok((T::into_storage(out), z.1.shape().clone()))
    }
}

impl CustomOp2 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-photonic-activation"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        z_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.planes((z, z_layout), (bias, bias_layout), None),
            z.dtype(),
            "fused bias and photonic activation (supports f32 and f64)"
        )
    }

    // NOTE: the gradients come from ops without a backward pass, so a
    // second backward pass through this node treats them as constants.
    fn bwd(
        &self,
        z: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let z_grad = z.apply_op3_no_bwd(bias, &grad, &BiasActivationGrad(self.0.clone()))?;
        let bias_grad = if bias.track_op() {
            Some(super::bias::channel_sum(&z_grad)?)
        } else {
            None
        };
        Ok((z.track_op().then_some(z_grad), bias_grad))
    }
}

/// The input gradient of [`BiasActivation`] from `z`, `bias` and the
/// output gradient.
struct BiasActivationGrad(ShiftedActivation);

impl candle_core::CustomOp3 for BiasActivationGrad {
    fn name(&self) -> &'static str {
        "bias-photonic-activation-grad"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        z_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = BiasActivation(self.0.clone());
        dispatch_float!(
            op.planes((z, z_layout), (bias, bias_layout), Some((grad, grad_layout))),
            z.dtype(),
            "fused bias and photonic activation (supports f32 and f64)"
        )
    }
}

impl CustomOp1 for ShiftedActivation {
    fn name(&self) -> &'static str {
        "photonic-activation"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.forward(storage, layout),
            storage.dtype(),
            "fused photonic activation (supports f32 and f64)"
        )
    }

    // NOTE: the gradient comes from an op without a backward pass, so a
    // second backward pass through this node treats it as a constant.
    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(
            x.apply_op2_no_bwd(&grad, &ActivationGrad(self.clone()))?,
        ))
    }
}

/// The input gradient `g * f'(x + input_offset)` of [`ShiftedActivation`],
/// from the input (first argument) and the output gradient (second).
struct ActivationGrad(ShiftedActivation);

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "photonic-activation-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = &self.0;
        dispatch_float!(
            op.input_grad((x, x_layout), (grad, grad_layout)),
            x.dtype(),
            "fused photonic activation (supports f32 and f64)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nonneg::NonnegActivation;
    use crate::ops::test_util::{random_tensor, relative_error, tolerance, weighted_sum};
    use candle_core::Var;
    use proptest::prelude::*;

    const PHOTONIC: [Activation; 2] = [Activation::PhotonicSigmoid, Activation::PhotonicSinusoidal];

    /// Returns the output and the input gradient of `sum(f(x) * weights)`.
    fn run(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor, seed: u64) -> (Tensor, Tensor) {
        let x = Var::from_tensor(x).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let grads = weighted_sum(seed, &y).backward().unwrap();
        (y, grads.get(x.as_tensor()).unwrap().clone())
    }

    /// Compares the fused and the generic forms of a shifted device, as the
    /// non-negative network runs it, and of the plain activation.
    fn check_against_generic(
        len: usize,
        activation: Activation,
        offsets: (f64, f64),
        seed: u64,
        dtype: DType,
    ) {
        // Inputs across the response and both clamp regions.
        let x = random_tensor(seed, &[len], -1.0, 3.0, dtype);
        let device = NonnegActivation {
            activation: activation.clone(),
            input_offset: offsets.0,
            output_offset: offsets.1,
        };
        let cases: [(&str, (Tensor, Tensor), (Tensor, Tensor)); 2] = [
            (
                "device",
                run(|v| device.forward(v), &x, seed),
                run(|v| device.forward_generic(v), &x, seed),
            ),
            (
                "plain",
                run(|v| activation.forward(v), &x, seed),
                run(|v| activation.forward_generic(v), &x, seed),
            ),
        ];
        // The sigmoid's slope is up to (A2 - A1) / (4 D), about 7, so its
        // gradient carries a few times the rounding of its argument.
        let limit = 10.0 * tolerance(dtype);
        for (name, (y, dy), (y_generic, dy_generic)) in cases {
            let error = relative_error(&y, &y_generic);
            assert!(
                error <= limit,
                "{name} {activation} values, {dtype:?}: relative error {error:e}"
            );
            let error = relative_error(&dy, &dy_generic);
            assert!(
                error <= limit,
                "{name} {activation} gradients, {dtype:?}: relative error {error:e}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn activation_matches_generic(
            len in 1usize..300,
            which in 0usize..2,
            input_offset in -0.5f64..0.5,
            output_offset in 0.0f64..0.2,
            seed in 0u64..1000,
        ) {
            for dtype in [DType::F32, DType::F64] {
                check_against_generic(len, PHOTONIC[which].clone(), (input_offset, output_offset), seed, dtype);
            }
        }
    }

    /// Returns `y` and the gradients for `z` and `bias` of
    /// `sum(f(z, bias) * weights)`.
    fn run_with_bias(f: impl Fn(&Tensor, &Tensor) -> Tensor, z: &Tensor, bias: &Tensor, seed: u64) -> [Tensor; 3] {
        let (z, bias) = (Var::from_tensor(z).unwrap(), Var::from_tensor(bias).unwrap());
        let y = f(z.as_tensor(), bias.as_tensor());
        let grads = weighted_sum(seed, &y).backward().unwrap();
        let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
        [y.clone(), grad(&z), grad(&bias)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The fused bias and activation give the values and gradients of
        /// the channel bias node followed by the activation node.
        #[test]
        fn bias_activation_matches_two_nodes(
            dims in prop::array::uniform4(1usize..7),
            which in 0usize..2,
            offsets in (-0.5f64..0.5, 0.0f64..0.2),
            seed in 0u64..1000,
        ) {
            for dtype in [DType::F32, DType::F64] {
                let z = random_tensor(seed, &dims, -1.0, 2.0, dtype);
                let bias = random_tensor(seed + 1, &[dims[1]], -0.5, 0.5, dtype);
                let op = ShiftedActivation {
                    activation: PHOTONIC[which].clone(),
                    input_offset: offsets.0,
                    output_offset: offsets.1,
                    clamp: true,
                };
                let fused = run_with_bias(|z, b| bias_activation(z, b, op.clone()).unwrap(), &z, &bias, seed);
                let two_nodes = run_with_bias(
                    |z, b| shifted_activation(&crate::ops::add_channel_bias(z, b).unwrap(), op.clone()).unwrap().unwrap(),
                    &z,
                    &bias,
                    seed,
                );
                // The same rounding in the same order: the values and the
                // gradient of z agree exactly; the bias gradient sums in
                // another order.
                let limit = tolerance(dtype) * (dims[0] * dims[2] * dims[3]) as f64;
                for (name, (a, b)) in ["output", "dz", "dbias"].iter().zip(fused.iter().zip(&two_nodes)) {
                    let error = relative_error(a, b);
                    let bound = if *name == "dbias" { limit } else { 0.0 };
                    prop_assert!(error <= bound, "{} of {:?} in {:?}: relative error {:e}", name, dims, dtype, error);
                }
            }
        }
    }

    #[test]
    fn bias_activation_rejects_bad_arguments() {
        let z = random_tensor(1, &[2, 3, 2, 2], -1.0, 1.0, DType::F32);
        let op = |activation: Activation| ShiftedActivation {
            activation,
            input_offset: 0.0,
            output_offset: 0.0,
            clamp: false,
        };
        let sigmoid = op(Activation::PhotonicSigmoid);
        let cases = [
            (bias_activation(&z, &random_tensor(2, &[4], -1.0, 1.0, DType::F32), sigmoid.clone()), "one value per channel"),
            (bias_activation(&z.flatten_from(1).unwrap(), &random_tensor(2, &[3], -1.0, 1.0, DType::F32), sigmoid.clone()), "expect input [batch"),
            (bias_activation(&z, &random_tensor(2, &[3], -1.0, 1.0, DType::F32), op(Activation::Relu)), "does not cover relu"),
        ];
        for (i, (result, expected)) in cases.into_iter().enumerate() {
            let message = result.unwrap_err().to_string();
            assert!(message.contains(expected), "case {i}: {message}");
        }
    }

    #[test]
    fn activation_parallel_chunks_match_generic() {
        for activation in PHOTONIC {
            check_against_generic(
                3 * PARALLEL_CHUNK + 17,
                activation,
                (0.1, 0.06),
                5,
                DType::F32,
            );
        }
    }

    #[test]
    fn activation_other_kinds_are_not_fused() {
        let x = random_tensor(1, &[4], -1.0, 1.0, DType::F32);
        for activation in [Activation::Relu, Activation::ReluN { n: 2.0 }] {
            let op = ShiftedActivation {
                activation: activation.clone(),
                input_offset: 0.0,
                output_offset: 0.0,
                clamp: false,
            };
            assert!(
                shifted_activation(&x, op).unwrap().is_none(),
                "{activation} was fused"
            );
        }
        let op = ShiftedActivation {
            activation: Activation::PhotonicSigmoid,
            input_offset: 0.0,
            output_offset: 0.0,
            clamp: false,
        };
        let half = x.to_dtype(DType::F16).unwrap();
        assert!(
            shifted_activation(&half, op).unwrap().is_none(),
            "f16 was fused"
        );
    }

    #[test]
    fn activation_non_contiguous_input() {
        let x = random_tensor(1, &[5, 3], -1.0, 2.0, DType::F64)
            .t()
            .unwrap();
        for activation in PHOTONIC {
            let error = relative_error(
                &activation.forward(&x).unwrap(),
                &activation.forward_generic(&x).unwrap(),
            );
            assert!(error <= 1e-12, "{activation}: relative error {error:e}");
        }
    }
}
