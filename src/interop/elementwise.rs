//! Recognition of activations exported as elementwise formulas.
//!
//! PyTorch exports a photonic activation written as a formula (`A2 + (A1 -
//! A2) / (1 + exp(...))`, `sin(pi/2 * clamp(x, 0, 1)) ** 2`) as a chain of
//! elementwise nodes whose other operands are constants, and `nn.GELU` as
//! `x * 0.5 * (1 + erf(x / sqrt 2))` (TorchScript exporter) or one `Gelu`
//! node (dynamo exporter, opset 20). The chain is kept as an expression of
//! one input and compared, point by point, with each isonn activation.

use candle_core::cpu::erf::erf_f64;

use crate::activation::{gelu, Activation};

/// An elementwise expression of one signal `x`, with scalar constants.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// The signal.
    Input,
    /// A scalar constant.
    Constant(f64),
    /// A unary operation (`Relu`, `Sigmoid`, `Tanh`, `Sin`, `Exp`, `Neg`,
    /// `Reciprocal`, `Erf`, `Gelu`).
    Unary(&'static str, Box<Expr>),
    /// A binary operation (`Add`, `Sub`, `Mul`, `Div`, `Pow`, `Min`, `Max`).
    Binary(&'static str, Box<Expr>, Box<Expr>),
}

/// The unary ONNX operators an expression may contain.
/// `Gelu` is the exact form (its `approximate` attribute `none`), which the
/// importer checks before it builds the expression.
pub const UNARY_OPS: [&str; 9] = ["Relu", "Sigmoid", "Tanh", "Sin", "Exp", "Neg", "Reciprocal", "Erf", "Gelu"];
/// The binary ONNX operators an expression may contain.
pub const BINARY_OPS: [&str; 7] = ["Add", "Sub", "Mul", "Div", "Pow", "Min", "Max"];

impl Expr {
    /// Evaluates the expression at `x`.
    pub fn eval(&self, x: f64) -> f64 {
        match self {
            Expr::Input => x,
            Expr::Constant(c) => *c,
            Expr::Unary(op, a) => {
                let a = a.eval(x);
                match *op {
                    "Relu" => a.max(0.0),
                    "Sigmoid" => 1.0 / (1.0 + (-a).exp()),
                    "Tanh" => a.tanh(),
                    "Sin" => a.sin(),
                    "Exp" => a.exp(),
                    "Neg" => -a,
                    "Reciprocal" => 1.0 / a,
                    "Erf" => erf_f64(a),
                    "Gelu" => gelu(a),
                    _ => f64::NAN,
                }
            }
            Expr::Binary(op, a, b) => {
                let (a, b) = (a.eval(x), b.eval(x));
                match *op {
                    "Add" => a + b,
                    "Sub" => a - b,
                    "Mul" => a * b,
                    "Div" => a / b,
                    "Pow" => a.powf(b),
                    "Min" => a.min(b),
                    "Max" => a.max(b),
                    _ => f64::NAN,
                }
            }
        }
    }

    /// Returns the operators of the expression, innermost first, for error
    /// messages.
    pub fn ops(&self) -> Vec<&'static str> {
        match self {
            Expr::Input | Expr::Constant(_) => Vec::new(),
            Expr::Unary(op, a) => {
                let mut out = a.ops();
                out.push(op);
                out
            }
            Expr::Binary(op, a, b) => {
                let mut out = a.ops();
                out.extend(b.ops());
                out.push(op);
                out
            }
        }
    }
}

/// Largest absolute difference at which an expression is taken to be an
/// activation. ONNX stores the constants in float32. Their rounding moves
/// the photonic sigmoid by about 1e-7 at most, because its steepest slope
/// is (A2 - A1) / (4 d), about 7. A formula with any constant off by 1%
/// differs by far more somewhere on the grid (a test checks one).
pub const MATCH_TOLERANCE: f64 = 1e-5;

/// Points where the activations are compared: a fine grid over [-4, 4],
/// where the photonic responses change, and a coarse one out to +-100 for
/// the asymptotes and the cutoffs.
fn sample_points() -> Vec<f64> {
    let fine = (0..=8000).map(|i| -4.0 + i as f64 * 0.001);
    let coarse = (0..=2000).map(|i| -100.0 + i as f64 * 0.1);
    fine.chain(coarse).collect()
}

/// Returns the isonn activation that `expr` computes, or `None`.
///
/// The candidates are the photonic sigmoid and sinusoidal, tanh, ReLU,
/// GELU, ReLU-N and GELU-N, with `N` read off as the value at `x = 1e6`.
/// The unbounded activations come before the bounded ones, whose `N` is
/// then 1e6 and would match on the grid as well. An expression
/// matches when it differs from the candidate by at most
/// [`MATCH_TOLERANCE`] at every sample point.
pub fn recognise(expr: &Expr) -> Option<Activation> {
    let points = sample_points();
    let mut candidates = vec![
        Activation::PhotonicSigmoid,
        Activation::PhotonicSinusoidal,
        Activation::Tanh,
        Activation::Relu,
        Activation::Gelu,
    ];
    let n = expr.eval(1e6);
    if n.is_finite() && n > 0.0 {
        // The bound is rounded to float32 in the file; read it back at
        // that precision so that relu-n:6 imports as 6.
        let n = n as f32 as f64;
        candidates.push(Activation::ReluN { n });
        candidates.push(Activation::GeluN { n });
    }
    candidates.into_iter().find(|activation| {
        points.iter().all(|&x| {
            let (got, want) = (expr.eval(x), activation.eval(x));
            (got - want).abs() <= MATCH_TOLERANCE
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::sigmoid_fit::*;

    fn c(v: f64) -> Box<Expr> {
        Box::new(Expr::Constant(v as f32 as f64))
    }

    fn b(op: &'static str, a: Expr, b: Box<Expr>) -> Expr {
        Expr::Binary(op, Box::new(a), b)
    }

    #[test]
    fn torch_style_photonic_sigmoid_is_recognised() {
        // A2 + (A1 - A2) / (1 + exp((min(x, X0 + 2) - X0) / D)), constants in f32.
        let t = b("Div", b("Sub", b("Min", Expr::Input, c(X0 + CUTOFF)), c(X0)), c(D));
        let denominator = b("Add", Expr::Unary("Exp", Box::new(t)), c(1.0));
        let expr = b("Add", Expr::Binary("Div", c(A1 - A2), Box::new(denominator)), c(A2));
        assert_eq!(recognise(&expr), Some(Activation::PhotonicSigmoid));
    }

    #[test]
    fn sinusoidal_with_pow_is_recognised() {
        let clamped = b("Max", b("Min", Expr::Input, c(1.0)), c(0.0));
        let sine = Expr::Unary("Sin", Box::new(b("Mul", clamped, c(std::f64::consts::FRAC_PI_2))));
        let expr = b("Pow", sine, c(2.0));
        assert_eq!(recognise(&expr), Some(Activation::PhotonicSinusoidal));
    }

    #[test]
    fn relu_n_bound_is_read() {
        let expr = b("Min", Expr::Unary("Relu", Box::new(Expr::Input)), c(6.0));
        assert_eq!(recognise(&expr), Some(Activation::ReluN { n: 6.0 }));
        assert_eq!(recognise(&Expr::Unary("Relu", Box::new(Expr::Input))), Some(Activation::Relu));
    }

    /// `x * (0.5 * (1 + erf(x / sqrt 2)))`, as the TorchScript exporter
    /// writes `nn.GELU()`.
    fn torch_gelu() -> Expr {
        let erf = Expr::Unary("Erf", Box::new(b("Div", Expr::Input, c(std::f64::consts::SQRT_2))));
        b("Mul", b("Mul", Expr::Input, Box::new(b("Add", erf, c(1.0)))), c(0.5))
    }

    #[test]
    fn gelu_chain_and_node_are_recognised() {
        assert_eq!(recognise(&torch_gelu()), Some(Activation::Gelu));
        assert_eq!(recognise(&Expr::Unary("Gelu", Box::new(Expr::Input))), Some(Activation::Gelu));
        // clamp(gelu(x), max=2.5) as Clip without a lower bound, or Min.
        assert_eq!(recognise(&b("Min", torch_gelu(), c(2.5))), Some(Activation::GeluN { n: 2.5 }));
        let node = Expr::Unary("Gelu", Box::new(Expr::Input));
        assert_eq!(recognise(&b("Min", node, c(2.5))), Some(Activation::GeluN { n: 2.5 }));
    }

    #[test]
    fn gelu_with_wrong_scale_is_rejected() {
        // erf(x / 2) in place of erf(x / sqrt 2), and the tanh form's
        // x * sigmoid(1.702 x), differ from GELU by more than the tolerance.
        let erf = Expr::Unary("Erf", Box::new(b("Div", Expr::Input, c(2.0))));
        let wrong = b("Mul", b("Mul", Expr::Input, Box::new(b("Add", erf, c(1.0)))), c(0.5));
        assert_eq!(recognise(&wrong), None);
        let sigmoid = Expr::Unary("Sigmoid", Box::new(b("Mul", Expr::Input, c(1.702))));
        assert_eq!(recognise(&b("Mul", Expr::Input, Box::new(sigmoid))), None);
    }

    #[test]
    fn near_miss_formulas_are_rejected() {
        // A plain sigmoid, and a photonic sigmoid whose width is off by 1%.
        assert_eq!(recognise(&Expr::Unary("Sigmoid", Box::new(Expr::Input))), None);
        let t = b("Div", b("Sub", b("Min", Expr::Input, c(X0 + CUTOFF)), c(X0)), c(D * 1.01));
        let expr = b("Add", b("Mul", Expr::Unary("Sigmoid", Box::new(t)), c(A2 - A1)), c(A1));
        assert_eq!(recognise(&expr), None);
        // ReLU-N without its lower clamp.
        assert_eq!(recognise(&b("Min", Expr::Input, c(6.0))), None);
    }
}
