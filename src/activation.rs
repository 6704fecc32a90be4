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
    /// A measured transfer curve: piecewise-linear between measured
    /// points, held at its end values outside them, values in
    /// `[min y, max y]` of the points (see [`TransferCurve`]).
    Curve(TransferCurve),
}

impl Activation {
    /// Applies the activation elementwise, as one fused node for the
    /// photonic responses on the CPU (see [`crate::ops::shifted_activation`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = crate::ops::ShiftedActivation {
            activation: self.clone(),
            input_offset: 0.0,
            output_offset: 0.0,
            clamp: false,
        };
        match crate::ops::shifted_activation(x, op)? {
            Some(y) => Ok(y),
            None => self.forward_generic(x),
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
            Activation::Curve(curve) => curve.eval(x),
        }
    }

    /// Returns the tight range `[min f, max f]` of the outputs, `None` when unbounded.
    pub fn output_bounds(&self) -> Option<(f64, f64)> {
        match self {
            Activation::PhotonicSigmoid => Some((sigmoid_fit::A1, sigmoid_fit::A2)),
            Activation::PhotonicSinusoidal => Some((0.0, 1.0)),
            Activation::ReluN { n } => Some((0.0, *n)),
            Activation::Relu => None,
            Activation::Tanh => Some((-1.0, 1.0)),
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
            Activation::Relu | Activation::Tanh => 0.0,
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
            Activation::Curve(curve) => write!(f, "curve:{}", curve.points().source),
        }
    }
}

impl FromStr for Activation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let valid = "photonic-sigmoid, photonic-sinusoidal, relu-n:N (N > 0), relu, tanh \
                     or curve:FILE.csv (a measured transfer curve)";
        match s {
            "photonic-sigmoid" => Ok(Activation::PhotonicSigmoid),
            "photonic-sinusoidal" => Ok(Activation::PhotonicSinusoidal),
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
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
                let Some(bound) = s.strip_prefix("relu-n:") else {
                    return Err(Error::config("activation", s, format!("expected {valid}")));
                };
                match bound.parse::<f64>() {
                    Ok(n) if n.is_finite() && n > 0.0 => Ok(Activation::ReluN { n }),
                    _ => Err(Error::config(
                        "activation",
                        s,
                        "the bound N of relu-n:N must be a finite number > 0, e.g. relu-n:6",
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    const ALL: [Activation; 5] = [
        Activation::PhotonicSigmoid,
        Activation::PhotonicSinusoidal,
        Activation::ReluN { n: 2.5 },
        Activation::Relu,
        Activation::Tanh,
    ];

    /// Inputs that avoid the kinks (clamp points), where the derivative is
    /// not defined.
    fn sample_inputs() -> Vec<f64> {
        (0..400)
            .map(|i| -1.3 + i as f64 * 0.011 + 0.0007)
            .filter(|x| {
                let kinks = [0.0, 1.0, 2.5, sigmoid_fit::X0 + sigmoid_fit::CUTOFF];
                kinks.iter().all(|k| (x - k).abs() > 1e-4)
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

    #[test]
    fn parse_round_trips_and_rejects() {
        for act in ALL {
            assert_eq!(act.to_string().parse::<Activation>().unwrap(), act);
        }
        for bad in ["sigmoid", "relu-n:", "relu-n:-1", "relu-n:nan", "relu-n:inf"] {
            let message = bad.parse::<Activation>().unwrap_err().to_string();
            assert!(message.contains(bad), "{message}");
        }
    }
}
