//! Activation functions, including the photonic responses the method uses.

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::curve::TransferCurve;
use crate::error::{Error, Result};

/// Fitted constants of the photonic sigmoid:
/// `f(x) = A2 + (A1 - A2) / (1 + exp((x - X0) / D))`.
pub mod sigmoid_fit {
    /// Output as `x -> -inf`.
    pub const A1: f64 = 0.060;
    /// Output as `x -> +inf`.
    pub const A2: f64 = 1.005;
    /// Centre of the response.
    pub const X0: f64 = 0.145;
    /// Width of the response.
    pub const D: f64 = 0.033;
    /// The input is clamped above at `X0 + CUTOFF`.
    pub const CUTOFF: f64 = 2.0;
}

/// An elementwise activation.
///
/// The photonic ones are bounded, so the transformation can compute the
/// input range of the layer that reads them; plain ReLU is not. Cloning is
/// cheap: a measured curve's points are shared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Activation {
    /// Measured response of a photonic neuron:
    /// `A2 + (A1 - A2) / (1 + exp((min(x, x0 + 2) - x0) / d))`,
    /// values in `[0.060, 1.005]`.
    PhotonicSigmoid,
    /// Mach-Zehnder transfer `sin^2(pi/2 * clamp(x, 0, 1))`, values in `[0, 1]`.
    PhotonicSinusoidal,
    /// `min(max(x, 0), n)`, values in `[0, n]`.
    ReluN {
        /// The upper bound `N`.
        n: f64,
    },
    /// `max(x, 0)`: unbounded, so a network using it cannot be transformed
    /// exactly without a bound.
    Relu,
    /// `tanh(x)`, values in `[-1, 1]`: the usual recurrent activation. Its
    /// range is negative, so the physical signal carries an offset of -1.
    Tanh,
    /// GELU in its exact form `x Phi(x) = x (1 + erf(x / sqrt 2)) / 2`, as
    /// PyTorch's `nn.GELU()` computes it: unbounded above, like ReLU, so a
    /// network using it needs a bound before the transformation.
    Gelu,
    /// `min(gelu(x), n)`: GELU bounded above, values in `[GELU_MIN, n]`.
    /// Its lower bound is negative, so the physical signal carries an
    /// offset, as for tanh.
    GeluN {
        /// The upper bound `N`.
        n: f64,
    },
    /// A measured transfer curve: piecewise-linear between measured
    /// points, held at its end values outside them, values in
    /// `[min y, max y]` of the points (see [`TransferCurve`]).
    Curve(TransferCurve),
}

/// A lower bound of GELU, `min_x x Phi(x) = -0.16997...` at `x = -0.75179...`,
/// rounded down so that `[GELU_MIN, n]` contains every output.
pub const GELU_MIN: f64 = -0.17;

impl Activation {
    /// Applies the activation elementwise, as one fused node for the
    /// photonic responses on the CPU (see [`crate::ops::shifted_activation`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match crate::ops::shifted_activation(x, self.fused_op())? {
            Some(y) => Ok(y),
            None => self.forward_generic(x),
        }
    }

    /// Returns the fused op that computes [`forward`](Self::forward): no
    /// offsets and no clamp.
    pub(crate) fn fused_op(&self) -> crate::ops::ShiftedActivation {
        crate::ops::ShiftedActivation {
            activation: self.clone(),
            input_offset: 0.0,
            output_offset: 0.0,
            clamp: false,
        }
    }

    /// Applies the activation elementwise with candle's generic ops, on any
    /// device: the fallback of [`forward`](Self::forward) and its reference.
    pub fn forward_generic(&self, x: &Tensor) -> Result<Tensor> {
        use sigmoid_fit::*;
        let y = match self {
            Activation::PhotonicSigmoid => {
                // A2 + (A1 - A2) / (1 + e^t) = A1 + (A2 - A1) * sigmoid(t), which
                // cannot overflow; the clamp is part of the fitted model.
                let t = x.minimum(X0 + CUTOFF)?.affine(1.0 / D, -X0 / D)?;
                candle_nn::ops::sigmoid(&t)?.affine(A2 - A1, A1)?
            }
            Activation::PhotonicSinusoidal => x
                .clamp(0.0, 1.0)?
                .affine(std::f64::consts::FRAC_PI_2, 0.0)?
                .sin()?
                .sqr()?,
            Activation::ReluN { n } => x.clamp(0.0, *n)?,
            Activation::Relu => x.relu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluN { n } => x.gelu_erf()?.minimum(*n)?,
            Activation::Curve(curve) => curve.forward_generic(x)?,
        };
        Ok(y)
    }

    /// Checks the parameters of an activation read from a file.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Activation::ReluN { n } if !(n.is_finite() && *n > 0.0) => {
                Err(format!("relu-n bound {n} must be a finite number > 0"))
            }
            Activation::GeluN { n } if !(n.is_finite() && *n > 0.0) => {
                Err(format!("gelu-n bound {n} must be a finite number > 0"))
            }
            _ => Ok(()),
        }
    }

    /// Evaluates the activation on one value in f64 (the reference for tests).
    pub fn eval(&self, x: f64) -> f64 {
        use sigmoid_fit::*;
        match self {
            Activation::PhotonicSigmoid => {
                let t = (x.min(X0 + CUTOFF) - X0) / D;
                A2 + (A1 - A2) / (1.0 + t.exp())
            }
            Activation::PhotonicSinusoidal => {
                let s = (std::f64::consts::FRAC_PI_2 * x.clamp(0.0, 1.0)).sin();
                s * s
            }
            Activation::ReluN { n } => x.clamp(0.0, *n),
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
            Activation::Gelu => gelu(x),
            Activation::GeluN { n } => gelu(x).min(*n),
            Activation::Curve(curve) => curve.eval(x),
        }
    }

    /// Returns the bounded version of an unbounded activation with upper
    /// bound `n` (ReLU-N for ReLU, GELU-N for GELU), `None` for an
    /// activation that is bounded already.
    pub fn bounded(&self, n: f64) -> Option<Activation> {
        match self {
            Activation::Relu => Some(Activation::ReluN { n }),
            Activation::Gelu => Some(Activation::GeluN { n }),
            _ => None,
        }
    }

    /// Returns whether the activation has no upper bound (ReLU, GELU).
    pub fn is_unbounded(&self) -> bool {
        self.output_bounds().is_none()
    }

    /// Returns the tight range `[min f, max f]` of the outputs, `None` when unbounded.
    pub fn output_bounds(&self) -> Option<(f64, f64)> {
        match self {
            Activation::PhotonicSigmoid => Some((sigmoid_fit::A1, sigmoid_fit::A2)),
            Activation::PhotonicSinusoidal => Some((0.0, 1.0)),
            Activation::ReluN { n } => Some((0.0, *n)),
            Activation::Relu => None,
            Activation::Tanh => Some((-1.0, 1.0)),
            Activation::Gelu => None,
            Activation::GeluN { n } => Some((GELU_MIN, *n)),
            Activation::Curve(curve) => Some(curve.bounds()),
        }
    }

    /// Returns the input where the response is steepest. The photonic
    /// initialisation centres each unit's pre-activation there, where the
    /// gradient is large.
    pub fn steepest_input(&self) -> f64 {
        match self {
            Activation::PhotonicSigmoid => sigmoid_fit::X0,
            Activation::PhotonicSinusoidal => 0.5,
            Activation::ReluN { n } => n / 2.0,
            Activation::Relu | Activation::Tanh | Activation::Gelu => 0.0,
            Activation::GeluN { n } => n / 2.0,
            Activation::Curve(curve) => curve.steepest_input(),
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Activation::PhotonicSigmoid => write!(f, "photonic-sigmoid"),
            Activation::PhotonicSinusoidal => write!(f, "photonic-sinusoidal"),
            Activation::ReluN { n } => write!(f, "relu-n:{n}"),
            Activation::Relu => write!(f, "relu"),
            Activation::Tanh => write!(f, "tanh"),
            Activation::Gelu => write!(f, "gelu"),
            Activation::GeluN { n } => write!(f, "gelu-n:{n}"),
            Activation::Curve(curve) => write!(f, "curve:{}", curve.points().source),
        }
    }
}

impl FromStr for Activation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let valid = "photonic-sigmoid, photonic-sinusoidal, relu-n:N (N > 0), relu, tanh, gelu, \
                     gelu-n:N or curve:FILE.csv (a measured transfer curve)";
        match s {
            "photonic-sigmoid" => Ok(Activation::PhotonicSigmoid),
            "photonic-sinusoidal" => Ok(Activation::PhotonicSinusoidal),
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
            "gelu" => Ok(Activation::Gelu),
            _ if s.starts_with("curve:") => {
                let path = &s["curve:".len()..];
                if path.is_empty() {
                    return Err(Error::config(
                        "activation",
                        s,
                        "name the CSV file of the measured curve, e.g. curve:transfer.csv",
                    ));
                }
                Ok(Activation::Curve(TransferCurve::from_csv(std::path::Path::new(path))?))
            }
            _ => {
                let (prefix, unbounded) = if s.starts_with("relu-n:") {
                    ("relu-n", Activation::Relu)
                } else if s.starts_with("gelu-n:") {
                    ("gelu-n", Activation::Gelu)
                } else {
                    return Err(Error::config("activation", s, format!("expected {valid}")));
                };
                let bound = &s[prefix.len() + 1..];
                match bound.parse::<f64>() {
                    Ok(n) if n.is_finite() && n > 0.0 => Ok(unbounded.bounded(n).expect("relu and gelu have bounded versions")),
                    _ => Err(Error::config(
                        "activation",
                        s,
                        format!("the bound N of {prefix}:N must be a finite number > 0, e.g. {prefix}:6"),
                    )),
                }
            }
        }
    }
}

/// Returns GELU `x Phi(x) = x (1 + erf(x / sqrt 2)) / 2` in f64, with
/// candle's `erf`, the function its `gelu_erf` kernel uses.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    const ALL: [Activation; 7] = [
        Activation::PhotonicSigmoid,
        Activation::PhotonicSinusoidal,
        Activation::ReluN { n: 2.5 },
        Activation::Relu,
        Activation::Tanh,
        Activation::Gelu,
        Activation::GeluN { n: 0.9 },
    ];

    /// Inputs that avoid the kinks (clamp points), where the derivative is
    /// not defined.
    fn sample_inputs() -> Vec<f64> {
        (0..400)
            .map(|i| -1.3 + i as f64 * 0.011 + 0.0007)
            .filter(|x| {
                let kinks = [0.0, 1.0, 2.5, sigmoid_fit::X0 + sigmoid_fit::CUTOFF];
                // GELU-N 0.9 has its kink where gelu(x) = 0.9, near x = 1.053.
                kinks.iter().all(|k| (x - k).abs() > 1e-4) && (gelu(*x) - 0.9).abs() > 1e-3
            })
            .collect()
    }

    #[test]
    fn forward_matches_formula_f32_and_f64() {
        let xs = sample_inputs();
        for act in ALL {
            for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
                let t = Tensor::new(xs.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let y: Vec<f64> = act
                    .forward(&t)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (x, got) in xs.iter().zip(y) {
                    let want = act.eval(*x);
                    assert!(
                        (got - want).abs() <= tolerance,
                        "{act} at {x} in {dtype:?}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let xs = sample_inputs();
        let h = 1e-6;
        for act in ALL {
            let var = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
            let y = act.forward(var.as_tensor()).unwrap().sum_all().unwrap();
            let grads = y.backward().unwrap();
            let got: Vec<f64> = grads.get(&var).unwrap().to_vec1().unwrap();
            for (x, g) in xs.iter().zip(got) {
                let numeric = (act.eval(x + h) - act.eval(x - h)) / (2.0 * h);
                let tolerance = 1e-5 * (1.0 + numeric.abs());
                assert!(
                    (g - numeric).abs() <= tolerance,
                    "{act} at {x}: autograd {g} vs finite difference {numeric}"
                );
            }
        }
    }

    #[test]
    fn outputs_lie_in_stated_bounds() {
        for act in ALL {
            let Some((lo, hi)) = act.output_bounds() else {
                continue;
            };
            for i in 0..2000 {
                let x = -50.0 + i as f64 * 0.05;
                let y = act.eval(x);
                assert!(y >= lo - 1e-12, "{act}({x}) = {y} below {lo}");
                assert!(y <= hi + 1e-12, "{act}({x}) = {y} above {hi}");
            }
        }
    }

    /// Reference values `0.5 x (1 + math.erf(x / math.sqrt(2)))` from Python
    /// 3.11's `math.erf`.
    #[test]
    fn gelu_matches_reference_values() {
        let cases = [
            (1.0, 0.841_344_746_068_542_9),
            (-1.0, -0.158_655_253_931_457_05),
            (0.5, 0.345_731_230_637_006_56),
            (-3.0, -0.004_049_694_094_890_31),
        ];
        for (x, want) in cases {
            let got = gelu(x);
            assert!((got - want).abs() <= 1e-12, "gelu({x}) = {got}, expected {want}");
        }
    }

    #[test]
    fn gelu_min_is_tight_lower_bound() {
        let lowest = (0..200_000)
            .map(|i| -3.0 + i as f64 * 2e-5)
            .map(gelu)
            .fold(f64::INFINITY, f64::min);
        assert!(lowest >= GELU_MIN, "gelu reaches {lowest} below GELU_MIN {GELU_MIN}");
        assert!(lowest - GELU_MIN <= 1e-3, "GELU_MIN {GELU_MIN} is loose: gelu's minimum is {lowest}");
    }

    #[test]
    fn bounded_versions_of_unbounded() {
        assert_eq!(Activation::Relu.bounded(3.0), Some(Activation::ReluN { n: 3.0 }));
        assert_eq!(Activation::Gelu.bounded(3.0), Some(Activation::GeluN { n: 3.0 }));
        assert_eq!(Activation::Tanh.bounded(3.0), None);
        let unbounded: Vec<_> = ALL.iter().filter(|a| a.is_unbounded()).collect();
        assert_eq!(unbounded, [&Activation::Relu, &Activation::Gelu]);
    }

    #[test]
    fn parse_round_trips_and_rejects() {
        for act in ALL {
            assert_eq!(act.to_string().parse::<Activation>().unwrap(), act);
        }
        for bad in ["sigmoid", "relu-n:", "relu-n:-1", "relu-n:nan", "relu-n:inf", "gelu-n:0", "gelu-n:x"] {
            let message = bad.parse::<Activation>().unwrap_err().to_string();
            assert!(message.contains(bad), "{message}");
        }
    }
}
