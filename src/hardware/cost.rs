//! The hardware each way of handling signed weights needs, per layer.
//!
//! A layer is counted as weight-stationary hardware that computes one output
//! position per cycle: a linear layer takes one cycle, a convolution takes
//! one cycle per output position (its kernels are applied to one input patch
//! at a time). The three schemes:
//!
//! - `nonneg`: the non-negative isomorphic network. Each modulator drives its
//!   signal and its complement, every port meets every output through a
//!   weight element (`P` on the signal, `N` on the complement), one detector
//!   per output, and no subtraction: the shift is part of the bias.
//! - `balanced`: one element per signed weight routes its light to the
//!   positive or negative detector of a balanced pair, whose photocurrents
//!   subtract before one ADC.
//! - `differential`: two elements per signed weight (`W = W+ - W-`) on two
//!   output lines, each detected and digitised, subtracted electronically.

use std::path::Path;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Layer, Network};

/// Device counts of one scheme for one layer. Each cycle uses every device once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SchemeCount {
    /// Optical input lines into the weight bank.
    pub optical_inputs: usize,
    /// Modulators (a dual-output modulator counts once).
    pub modulators: usize,
    /// Programmable weight elements.
    pub weight_elements: usize,
    /// Elements set to a transmission > 0 (a fixed-weight design needs only these).
    pub nonzero_elements: usize,
    /// Photodetectors.
    pub photodetectors: usize,
    /// Analog-to-digital conversions.
    pub adcs: usize,
    /// Subtractions, photocurrent or electronic.
    pub subtractions: usize,
}

impl SchemeCount {
    fn add(&mut self, other: &SchemeCount, times: usize) {
        self.optical_inputs += other.optical_inputs * times;
        self.modulators += other.modulators * times;
        self.weight_elements += other.weight_elements * times;
        self.nonzero_elements += other.nonzero_elements * times;
        self.photodetectors += other.photodetectors * times;
        self.adcs += other.adcs * times;
        self.subtractions += other.subtractions * times;
    }
}

/// One of the three schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// The non-negative isomorphic network.
    Nonneg,
    /// Balanced detection of signed weights.
    Balanced,
    /// Differential weight pairs.
    Differential,
}

impl Scheme {
    /// The three schemes in table order.
    pub const ALL: [Scheme; 3] = [Scheme::Nonneg, Scheme::Balanced, Scheme::Differential];

    /// Returns the column name of the scheme.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Nonneg => "non-negative isomorphic",
            Scheme::Balanced => "balanced detection",
            Scheme::Differential => "differential pairs",
        }
    }
}

/// The counts of one affine layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostRow {
    /// Index of the layer in the network.
    pub layer: usize,
    /// `linear`, `conv2d` or `conv1d`.
    pub kind: String,
    /// Inputs per cycle (features, or channels times kernel taps).
    pub inputs: usize,
    /// Outputs per cycle.
    pub outputs: usize,
    /// Cycles per sample: output positions of a convolution, 1 otherwise.
    pub cycles: usize,
    /// Counts of the non-negative isomorphic network.
    pub nonneg: SchemeCount,
    /// Counts of balanced detection.
    pub balanced: SchemeCount,
    /// Counts of differential pairs.
    pub differential: SchemeCount,
}

impl CostRow {
    /// Returns the counts of `scheme`.
    pub fn scheme(&self, scheme: Scheme) -> &SchemeCount {
        match scheme {
            Scheme::Nonneg => &self.nonneg,
            Scheme::Balanced => &self.balanced,
            Scheme::Differential => &self.differential,
        }
    }
}

/// Per-use energies in joules, supplied by the user; there are no defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Energies {
    /// Energy of one modulator symbol (DAC included).
    pub modulator_j: f64,
    /// Energy of one weight element per cycle (static tuning power times
    /// the cycle time).
    pub weight_element_j: f64,
    /// Energy of one photodetector reading (transimpedance amplifier included).
    pub photodetector_j: f64,
    /// Energy of one analog-to-digital conversion.
    pub adc_j: f64,
    /// Energy of one subtraction.
    pub subtraction_j: f64,
}

impl Energies {
    /// Reads energies from a JSON or TOML file (by its extension).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read, [`Error::Data`] when it
    /// is not valid JSON or TOML, misses a key or has a negative or
    /// non-finite value.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_toml = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        let energies: Energies = if is_toml {
            toml::from_str(&text).map_err(|e| Error::data(path, format!("invalid TOML energies: {e}")))?
        } else {
            serde_json::from_str(&text).map_err(|e| Error::data(path, format!("invalid JSON energies: {e}")))?
        };
        let values = [
            ("modulator_j", energies.modulator_j),
            ("weight_element_j", energies.weight_element_j),
            ("photodetector_j", energies.photodetector_j),
            ("adc_j", energies.adc_j),
            ("subtraction_j", energies.subtraction_j),
        ];
        for (key, value) in values {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::data(
                    path,
                    format!("{key} = {value} is not an energy; give a finite number of joules >= 0"),
                ));
            }
        }
        Ok(energies)
    }

    /// Returns the energy per sample of `count` used `cycles` times, in joules.
    pub fn per_sample(&self, count: &SchemeCount, cycles: usize) -> f64 {
        let per_cycle = count.modulators as f64 * self.modulator_j
            + count.weight_elements as f64 * self.weight_element_j
            + count.photodetectors as f64 * self.photodetector_j
            + count.adcs as f64 * self.adc_j
            + count.subtractions as f64 * self.subtraction_j;
        per_cycle * cycles as f64
    }
}

/// The cost table of a network: one row per affine layer and the totals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostTable {
    /// One row per affine layer.
    pub rows: Vec<CostRow>,
    /// Sums over the layers of each scheme, in [`Scheme::ALL`] order.
    pub totals: Vec<SchemeCount>,
    /// Energy per sample of each scheme in joules, when energies were given.
    pub energy_per_sample_j: Option<Vec<f64>>,
}

/// Counts the hardware of every affine layer of the regular network
/// `network` (use [`crate::nonneg::inverse`] for a non-negative one).
pub fn cost_table(network: &Network, energies: Option<&Energies>) -> Result<CostTable> {
    let mut shape = network.input_shape.clone();
    let mut rows = Vec::new();
    for (i, layer) in network.layers.iter().enumerate() {
        let output = layer.output_shape(&shape).map_err(|e| Error::Shape(format!("layer {i}: {e}")))?;
        if let Some((weight, _)) = layer.weight_and_bias() {
            let dims = weight.dims();
            let outputs = dims[0];
            let (inputs, cycles, kind) = match layer {
                // The patch of all input channels is modulated once per
                // cycle, including for a grouped kernel.
                Layer::Conv2d(_) => {
                    let taps: usize = dims[2..].iter().product();
                    (shape[0] * taps, output[1] * output[2], "conv2d")
                }
                Layer::Conv1d(_) => (shape[0] * dims[2], output[1] * output[2], "conv1d"),
                _ => (dims[1], 1, "linear"),
            };
            let weights = weight.elem_count();
            let values: Vec<f64> = weight.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            let nonzero = values.iter().filter(|w| **w != 0.0).count();
            rows.push(CostRow {
                layer: i,
                kind: kind.into(),
                inputs,
                outputs,
                cycles,
                nonneg: SchemeCount {
                    optical_inputs: 2 * inputs,
                    modulators: inputs,
                    weight_elements: 2 * weights,
                    nonzero_elements: nonzero,
                    photodetectors: outputs,
                    adcs: outputs,
                    subtractions: 0,
                },
                balanced: SchemeCount {
                    optical_inputs: inputs,
                    modulators: inputs,
                    weight_elements: weights,
                    nonzero_elements: nonzero,
                    photodetectors: 2 * outputs,
                    adcs: outputs,
                    subtractions: outputs,
                },
                differential: SchemeCount {
                    optical_inputs: inputs,
                    modulators: inputs,
                    weight_elements: 2 * weights,
                    nonzero_elements: nonzero,
                    photodetectors: 2 * outputs,
                    adcs: 2 * outputs,
                    subtractions: outputs,
                },
            });
        }
        shape = output;
    }
    let totals = Scheme::ALL
        .iter()
        .map(|&s| {
            let mut total = SchemeCount::default();
            for row in &rows {
                total.add(row.scheme(s), 1);
            }
            total
        })
        .collect();
    let energy_per_sample_j = energies.map(|e| {
        Scheme::ALL
            .iter()
            .map(|&s| rows.iter().map(|r| e.per_sample(r.scheme(s), r.cycles)).sum())
            .collect()
    });
    Ok(CostTable {
        rows,
        totals,
        energy_per_sample_j,
    })
}

impl CostTable {
    /// Renders the table as Markdown: one row per layer and scheme, then
    /// the totals and, when known, the energy per sample.
    pub fn to_markdown(&self) -> String {
        let mut out = String::from(
            "| layer | kind | inputs | outputs | cycles | scheme | optical inputs | modulators | \
             weight elements | nonzero elements | photodetectors | ADCs | subtractions |\n\
             |---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let cells = |c: &SchemeCount| {
            format!(
                "{} | {} | {} | {} | {} | {} | {}",
                c.optical_inputs, c.modulators, c.weight_elements, c.nonzero_elements, c.photodetectors, c.adcs, c.subtractions
            )
        };
        for row in &self.rows {
            for scheme in Scheme::ALL {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} |\n",
                    row.layer,
                    row.kind,
                    row.inputs,
                    row.outputs,
                    row.cycles,
                    scheme.name(),
                    cells(row.scheme(scheme))
                ));
            }
        }
        for (scheme, total) in Scheme::ALL.iter().zip(&self.totals) {
            out.push_str(&format!("| total | | | | | {} | {} |\n", scheme.name(), cells(total)));
        }
        if let Some(energy) = &self.energy_per_sample_j {
            out.push_str("\n| scheme | energy per sample (J) |\n|---|---:|\n");
            for (scheme, e) in Scheme::ALL.iter().zip(energy) {
                out.push_str(&format!("| {} | {e:.4e} |\n", scheme.name()));
            }
        }
        out
    }
}
