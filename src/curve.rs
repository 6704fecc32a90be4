//! A measured activation transfer curve: monotone piecewise-linear
//! interpolation between measured input and output pairs.
//!
//! Between two measured inputs the output is the straight line through the
//! two points. Outside the measured input range the curve is held at its
//! end values, so its range is `[min y, max y]` of the data. The slope is
//! the right-hand derivative: at a measured input it is the slope of the
//! segment to its right, and it is 0 from the last measured input on and
//! below the first one.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The measured points of a [`TransferCurve`], as model files store them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoints {
    /// The CSV file the points were read from, as given on the command
    /// line. It names the curve in messages and is not read again.
    pub source: String,
    /// Strictly increasing inputs.
    pub inputs: Vec<f64>,
    /// The outputs at `inputs`: all non-decreasing or all non-increasing.
    pub outputs: Vec<f64>,
}

/// A monotone piecewise-linear activation measured on a device.
///
/// Cloning is cheap: clones share the points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "CurvePoints", into = "CurvePoints")]
pub struct TransferCurve {
    points: Arc<CurvePoints>,
}

impl From<TransferCurve> for CurvePoints {
    fn from(curve: TransferCurve) -> Self {
        (*curve.points).clone()
    }
}

impl TryFrom<CurvePoints> for TransferCurve {
    type Error = String;

    /// Checks points read from a model file.
    fn try_from(points: CurvePoints) -> std::result::Result<Self, String> {
        let CurvePoints {
            source,
            inputs,
            outputs,
        } = points;
        if inputs.len() != outputs.len() {
            return Err(format!(
                "transfer curve {source}: {} inputs but {} outputs; each input needs one output",
                inputs.len(),
                outputs.len()
            ));
        }
        let lines: Vec<usize> = (1..=inputs.len()).collect();
        let pairs: Vec<(f64, f64, usize)> = inputs
            .into_iter()
            .zip(outputs)
            .zip(lines)
            .map(|((x, y), line)| (x, y, line))
            .collect();
        if pairs.windows(2).any(|w| w[0].0 > w[1].0) {
            return Err(format!(
                "transfer curve {source}: the inputs must be in increasing order"
            ));
        }
        check_points(&pairs, "point").map_err(|e| format!("transfer curve {source}: {e}"))?;
        Ok(TransferCurve::from_sorted(source, pairs))
    }
}

/// Checks finiteness, the number of points, distinct inputs and monotone
/// outputs of `(input, output, number)` triples sorted by input. `unit`
/// (`line` or `point`) says what the numbers count, for the messages.
fn check_points(pairs: &[(f64, f64, usize)], unit: &str) -> std::result::Result<(), String> {
    for &(x, y, line) in pairs {
        if !(x.is_finite() && y.is_finite()) {
            return Err(format!(
                "{unit} {line}: input {x} and output {y} must both be finite numbers"
            ));
        }
    }
    if pairs.len() < 2 {
        return Err(format!(
            "a transfer curve needs at least 2 points, found {}",
            pairs.len()
        ));
    }
    for w in pairs.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(format!(
                "{unit}s {} and {} both have input {}; measure each input once \
                 or average the repeated measurements",
                w[0].2, w[1].2, w[0].0
            ));
        }
    }
    let rise = pairs.windows(2).find(|w| w[1].1 > w[0].1);
    let fall = pairs.windows(2).find(|w| w[1].1 < w[0].1);
    if let (Some(r), Some(f)) = (rise, fall) {
        return Err(format!(
            "the outputs must be monotone in the input, but they rise from {unit} {} to {} \
             and fall from {unit} {} to {}; smooth or trim the measurement",
            r[0].2, r[1].2, f[0].2, f[1].2
        ));
    }
    Ok(())
}

impl TransferCurve {
    /// Reads a curve from a CSV file of `input,output` rows.
    ///
    /// A header row is optional, as are blank lines and lines starting
    /// with `#`. The rows may come in any order. The file needs at least 2
    /// rows of finite numbers with distinct inputs, and the outputs must be
    /// monotone in the input. Errors name the file and the line.
    pub fn from_csv(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let message = format!(
                "cannot read the transfer curve ({e}); pass an existing CSV file of \
                 input,output rows as curve:FILE.csv"
            );
            Error::data(path, message)
        })?;
        Self::parse_csv(&text, &path.display().to_string())
            .map_err(|message| Error::data(path, format!("transfer curve: {message}")))
    }

    /// Parses the text of a CSV file (see [`from_csv`](Self::from_csv));
    /// `source` names the curve.
    pub fn parse_csv(text: &str, source: &str) -> std::result::Result<Self, String> {
        // Spreadsheet programs often start a UTF-8 CSV file with a byte order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut pairs = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let row = raw.trim();
            if row.is_empty() || row.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = row.split(',').map(str::trim).collect();
            if fields.len() != 2 {
                return Err(format!(
                    "line {line}: expected 2 comma-separated columns (input, output), found {}",
                    fields.len()
                ));
            }
            let parsed = (fields[0].parse::<f64>(), fields[1].parse::<f64>());
            match parsed {
                (Ok(x), Ok(y)) => pairs.push((x, y, line)),
                // The first row may name the columns.
                (Err(_), Err(_)) if pairs.is_empty() && !is_header_seen(text, index) => {}
                _ => {
                    let bad = if parsed.0.is_err() { fields[0] } else { fields[1] };
                    return Err(format!("line {line}: `{bad}` is not a number"));
                }
            }
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        check_points(&pairs, "line")?;
        Ok(Self::from_sorted(source.to_string(), pairs))
    }

    fn from_sorted(source: String, pairs: Vec<(f64, f64, usize)>) -> Self {
        let points = CurvePoints {
            source,
            inputs: pairs.iter().map(|p| p.0).collect(),
            outputs: pairs.iter().map(|p| p.1).collect(),
        };
        TransferCurve {
            points: Arc::new(points),
        }
    }

    /// Returns the measured points, sorted by input.
    pub fn points(&self) -> &CurvePoints {
        &self.points
    }

    /// Returns the output range `[min y, max y]`.
    pub fn bounds(&self) -> (f64, f64) {
        let y = &self.points.outputs;
        let first = y[0];
        let last = y[y.len() - 1];
        (first.min(last), first.max(last))
    }

    /// Returns the middle of the steepest segment, where the photonic
    /// initialisation centres pre-activations.
    pub fn steepest_input(&self) -> f64 {
        let CurvePoints { inputs, outputs, .. } = &*self.points;
        let slope = |k: usize| ((outputs[k + 1] - outputs[k]) / (inputs[k + 1] - inputs[k])).abs();
        let steepest = (0..inputs.len() - 1)
            .max_by(|&a, &b| slope(a).total_cmp(&slope(b)))
            .expect("a curve has at least 2 points, so at least 1 segment");
        0.5 * (inputs[steepest] + inputs[steepest + 1])
    }

    /// Returns the output and the right-hand slope at `x`, in the
    /// precision `T`.
    ///
    /// The segment is found by binary search. A NaN input gives a NaN
    /// output.
    #[inline]
    pub fn eval_with_slope<T: num_traits::Float>(&self, x: T) -> (T, T) {
        let c = |v: f64| T::from(v).unwrap_or_else(T::nan);
        let CurvePoints { inputs, outputs, .. } = &*self.points;
        let last = inputs.len() - 1;
        if x.is_nan() {
            return (x, x);
        }
        if x < c(inputs[0]) {
            return (c(outputs[0]), T::zero());
        }
        if x >= c(inputs[last]) {
            return (c(outputs[last]), T::zero());
        }
        // The segment k with inputs[k] <= x < inputs[k + 1].
        let k = inputs.partition_point(|&knot| c(knot) <= x) - 1;
        let (x0, x1) = (c(inputs[k]), c(inputs[k + 1]));
        let (y0, y1) = (c(outputs[k]), c(outputs[k + 1]));
        let slope = (y1 - y0) / (x1 - x0);
        (y0 + slope * (x - x0), slope)
    }

    /// Evaluates the curve on one value in f64.
    pub fn eval(&self, x: f64) -> f64 {
        self.eval_with_slope(x).0
    }

    /// Applies the curve with candle's generic ops, on any device, as
    /// `y0 + sum_k slope_k (clamp(x, x_k, x_k+1) - x_k)`.
    ///
    /// One clamp per segment makes it slow for many points; the CPU uses
    /// the fused node of [`crate::ops::shifted_activation`]. At a measured
    /// input candle's clamp passes half the gradient to each side, so there
    /// the gradient is the mean of the two slopes instead of the right one.
    pub fn forward_generic(&self, x: &Tensor) -> Result<Tensor> {
        let CurvePoints { inputs, outputs, .. } = &*self.points;
        let mut y = x.zeros_like()?.affine(0.0, outputs[0])?;
        for k in 0..inputs.len() - 1 {
            let slope = (outputs[k + 1] - outputs[k]) / (inputs[k + 1] - inputs[k]);
            let part = x
                .clamp(inputs[k], inputs[k + 1])?
                .affine(slope, -slope * inputs[k])?;
            y = y.add(&part)?;
        }
        Ok(y)
    }
}

/// Returns whether a row before line `index` (0-based) held data or a
/// header, so that only the first row can be a header.
fn is_header_seen(text: &str, index: usize) -> bool {
    text.lines()
        .take(index)
        .any(|l| !(l.trim().is_empty() || l.trim().starts_with('#')))
}
