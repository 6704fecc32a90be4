//! `isonn reproduce`: the method's published experiments, run on real data
//! and tabulated beside the published figures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::data::Dataset;
use crate::error::Result;
use crate::fsio;
use crate::model::{Arch, Init};
use crate::nonneg::TransformOptions;
use crate::progress::Progress;
use crate::scenario::{run_scenario, settings, NonnegOptimizerKind as Opt, Pretrained, Scenario, ScenarioResult};
use crate::store::{self, Model};

/// Settings of a reproduction run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReproduceConfig {
    /// Output directory.
    pub out: PathBuf,
    /// Architectures to run.
    pub models: Vec<Arch>,
    /// Activations to run.
    pub activations: Vec<Activation>,
    /// Scenarios to run.
    pub scenarios: Vec<Scenario>,
    /// Epochs of the long scenarios (transformation, from scratch, exp init).
    pub budget: usize,
    /// Regular and then non-negative epochs of post-training and the clip baseline.
    pub post_epochs: usize,
    /// Seeds `0..seeds`.
    pub seeds: u64,
    /// Seeds of the baselines (regular + clip, exp init), at most `seeds`.
    #[serde(default)]
    pub baseline_seeds: Option<u64>,
    /// Initialisation of the regular networks.
    pub init: Init,
    /// Shuffle the training set every epoch (the reference code does not).
    #[serde(default = "crate::train::yes")]
    pub shuffle: bool,
    /// Transformation settings.
    pub transform: TransformOptions,
    /// Continue a run in `out`, keeping the cells it finished.
    pub resume: bool,
    /// Tabulate the finished cells in `out` without running the missing ones.
    #[serde(default)]
    pub report_only: bool,
}

/// One finished (model, activation, scenario, seed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    /// Architecture.
    pub model: Arch,
    /// Activation.
    pub activation: Activation,
    /// Scenario.
    pub scenario: Scenario,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// Initialisation.
    pub init: Init,
    /// The data set and its source, as `name from source (train/test)`;
    /// empty in cells written before isonn recorded it.
    #[serde(default)]
    pub data: String,
    /// Figures the scenario measured.
    pub result: ScenarioResult,
    /// Wall time, in seconds.
    pub seconds: f64,
}

/// Returns the activation's name with every character other than an ASCII
/// letter, digit, `-` or `.` replaced by `-`, for file names: a curve's
/// name `curve:FILE` contains the path of its CSV file.
fn file_name_part(activation: &Activation) -> String {
    activation
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .collect()
}

impl Cell {
    fn name(model: Arch, activation: &Activation, scenario: Scenario, seed: u64) -> String {
        format!("{model}-{}-{}-seed{seed}", file_name_part(activation), scenario.name())
    }
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// isonn version that produced the file.
    pub isonn_version: String,
    /// The data set.
    pub dataset: String,
    /// Origin of the data.
    pub data_source: String,
    /// Training set size.
    pub train_samples: usize,
    /// Test set size.
    pub test_samples: usize,
    /// The run's settings.
    pub config: ReproduceConfig,
    /// Every cell of the grid.
    pub cells: Vec<Cell>,
    /// Wall time of the cells run in this invocation, in seconds.
    pub seconds: f64,
}

/// Runs the grid of `config` and writes `results.json`, `results.md` and
/// the plots to `config.out`.
///
/// Each finished cell is saved under `out/cells/`, and with `resume` a cell
/// found there is read back instead of being run again.
pub fn reproduce(config: &ReproduceConfig, data: &Dataset, progress: &Progress) -> Result<Results> {
    let start = Instant::now();
    if config.scenarios.is_empty() || config.models.is_empty() || config.activations.is_empty() {
        return Err(crate::Error::config(
            "--scenarios, --models or --activations",
            "(empty)",
            "name at least one scenario, model and activation",
        ));
    }
    let data_label = format!(
        "{} from {} ({}/{})",
        data.name,
        data.source,
        data.train.len(),
        data.test.len()
    );
    fsio::create_dir_all(&config.out.join("cells"))?;
    // The method's own scenarios first, the baselines after them.
    let mut grid = Vec::new();
    for baselines in [false, true] {
        for &model in &config.models {
            for activation in &config.activations {
                for &scenario in &config.scenarios {
                    if scenario.is_baseline() != baselines {
                        continue;
                    }
                    let seeds = match baselines {
                        true => config.baseline_seeds.unwrap_or(config.seeds).min(config.seeds),
                        false => config.seeds,
                    };
                    for seed in 0..seeds {
                        grid.push((model, activation.clone(), scenario, seed));
                    }
                }
            }
        }
    }
    let bar = progress.bar(grid.len() as u64, "grid");
    let mut cells = Vec::new();
    let mut pretrained = Pretrained::default();
    for (model, activation, scenario, seed) in grid {
        let name = Cell::name(model, &activation, scenario, seed);
        let cell_path = config.out.join("cells").join(format!("{name}.json"));
        let s = settings(model, &activation, scenario, config.budget, config.post_epochs, config.shuffle);
        if (config.resume || config.report_only) && cell_path.exists() {
            let bytes = fsio::read(&cell_path)?;
            match serde_json::from_slice::<Cell>(&bytes) {
                Ok(cell) => {
                    let same_data = cell.data.is_empty() || cell.data == data_label;
                    if cell.result.settings != s || cell.init != config.init || !same_data {
                        return Err(crate::Error::config(
                            "--resume",
                            cell_path.display(),
                            format!(
                                "this cell was run with other settings or data ({:?}, init {}, data \"{}\") \
                                 than requested now ({s:?}, init {}, data \"{data_label}\"); use another \
                                 --out, or remove the cell file to run it again",
                                cell.result.settings, cell.init, cell.data, config.init
                            ),
                        ));
                    }
                    if cell.data.is_empty() {
                        tracing::warn!("{name}: the cell records no data source; kept as it is");
                    }
                    tracing::info!("{name}: kept from the earlier run");
                    cells.push(cell);
                    bar.inc(1);
                    continue;
                }
                Err(e) => tracing::warn!("{}: unreadable ({e}), running the cell again", cell_path.display()),
            }
        }
        if config.report_only {
            tracing::warn!("{name}: not finished, left out of the table");
            bar.inc(1);
            continue;
        }
        let cell_start = Instant::now();
        tracing::info!(
            "{name}: {} regular + {} non-negative epochs, regular lr {}, optimizer {:?}",
            s.regular_epochs,
            s.nonneg_epochs,
            s.regular_lr,
            s.optimizer
        );
        let (result, models) =
            run_scenario(
            model,
            activation.clone(),
            scenario,
            &s,
            config.init,
            seed,
            data,
            &config.transform,
            &mut pretrained,
            progress,
        )?;
        tracing::info!("{name}: test accuracy {:.4}", result.test_accuracy);
        let dir = config.out.join("models").join(&name);
        let provenance = serde_json::json!({
            "isonn_version": env!("CARGO_PKG_VERSION"),
            "arch": model, "activation": activation, "scenario": scenario, "seed": seed,
            "settings": s, "dataset": data.name, "data_source": data.source.to_string(),
            "test_accuracy": result.test_accuracy,
        });
        if let Some(regular) = &models.regular {
            // After non-negative training the regular network is the one the
            // training started from, not an equivalent of the result.
            let folder = match scenario {
                Scenario::PostTraining(_) | Scenario::FromScratch(_) => "regular-before-nonneg-training",
                _ => "regular",
            };
            store::save(&dir.join(folder), &Model::Regular(regular.clone()), &provenance)?;
        }
        if let Some(nonneg) = &models.nonneg {
            store::save(&dir.join("nonneg"), &Model::Nonneg(nonneg.clone()), &provenance)?;
        }
        if seed == 0 && scenario == Scenario::Transformation {
            if let (Some(regular), Some(nonneg)) = (&models.regular, &models.transformed) {
                plot_histograms(config, model, &activation, regular, nonneg)?;
            }
        }
        let cell = Cell {
            model,
            activation,
            scenario,
            seed,
            init: config.init,
            data: data_label.clone(),
            result,
            seconds: cell_start.elapsed().as_secs_f64(),
        };
        fsio::write_json_atomic(&cell_path, &cell)?;
        cells.push(cell);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let results = Results {
        isonn_version: env!("CARGO_PKG_VERSION").into(),
        dataset: data.name.to_string(),
        data_source: data.source.to_string(),
        train_samples: data.train.len(),
        test_samples: data.test.len(),
        config: config.clone(),
        cells,
        seconds: start.elapsed().as_secs_f64(),
    };
    fsio::write_json_atomic(&config.out.join("results.json"), &results)?;
    fsio::write_atomic(&config.out.join("results.md"), markdown(&results).as_bytes())?;
    plot_curves(&results)?;
    Ok(results)
}

/// Writes, for each model and activation, the test accuracy per epoch of
/// every scenario (seed 0).
fn plot_curves(results: &Results) -> Result<()> {
    let config = &results.config;
    for &model in &config.models {
        for activation in &config.activations {
            let series: Vec<crate::report::Series> = results
                .cells
                .iter()
                .filter(|c| c.model == model && &c.activation == activation && c.seed == 0)
                .map(|c| crate::report::Series {
                    label: c.scenario.name(),
                    points: c
                        .result
                        .curve
                        .iter()
                        .filter_map(|e| e.test_accuracy.map(|a| (e.epoch as f64, 100.0 * a)))
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            if series.is_empty() {
                continue;
            }
            let path = config.out.join(format!("curves-{model}-{}.png", file_name_part(activation)));
            crate::report::line_chart(
                &path,
                &format!("{model}, {activation}: test accuracy per epoch (seed 0)"),
                "epoch",
                "test accuracy (%)",
                &series,
                &[],
            )?;
        }
    }
    Ok(())
}

/// Writes the magnitudes of the first affine layer's weights before (`|W|`)
/// and after the transformation (the non-zero entries of `P` and `N`).
fn plot_histograms(
    config: &ReproduceConfig,
    model: Arch,
    activation: &Activation,
    regular: &crate::model::Network,
    nonneg: &crate::nonneg::NonnegNetwork,
) -> Result<()> {
    let Some((_, weight)) = regular.parameters().into_iter().next() else {
        return Ok(());
    };
    let Some((_, affine)) = nonneg.affine_layers().next() else {
        return Ok(());
    };
    let values = |t: &candle_core::Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
    };
    let magnitudes: Vec<f64> = values(&weight)?.iter().map(|v| v.abs()).collect();
    let positive: Vec<f64> = values(&affine.positive)?.into_iter().filter(|v| *v > 0.0).collect();
    let negative: Vec<f64> = values(&affine.negative)?.into_iter().filter(|v| *v > 0.0).collect();
    let path = config.out.join(format!("histogram-{model}-{}.png", file_name_part(activation)));
    crate::report::histogram(
        &path,
        &format!("{model}, {activation}: first layer before and after the transformation"),
        "weight magnitude",
        &[
            ("regular |W|".into(), magnitudes),
            ("P (signal), non-zero".into(), positive),
            ("N (complement), non-zero".into(), negative),
        ],
        60,
        false,
    )
}

/// A published figure: mean test accuracy in percent and its spread.
type Figure = (f64, Option<f64>);

/// Returns the authors' journal figure for a Fashion-MNIST cell.
pub fn published(model: Arch, activation: &Activation, scenario: Scenario) -> Option<Figure> {
    use Activation::{PhotonicSigmoid as Sig, PhotonicSinusoidal as Sin};
    let value = match (model, activation, scenario) {
        (Arch::Mlp, Sig, Scenario::Transformation) => (85.64, Some(0.22)),
        (Arch::Mlp, Sin, Scenario::Transformation) => (86.30, Some(0.52)),
        (Arch::Cnn, Sig, Scenario::Transformation) => (87.59, Some(0.47)),
        (Arch::Cnn, Sin, Scenario::Transformation) => (89.22, Some(0.18)),
        (Arch::Mlp, Sig, Scenario::RegularClip) => (10.00, None),
        (Arch::Mlp, Sin, Scenario::RegularClip) => (10.00, None),
        (Arch::Mlp, Sig, Scenario::PostTraining(Opt::Projected)) => (84.77, None),
        (Arch::Mlp, Sig, Scenario::PostTraining(Opt::SignPreserving)) => (85.01, None),
        (Arch::Mlp, Sin, Scenario::PostTraining(Opt::Projected)) => (86.62, None),
        (Arch::Mlp, Sin, Scenario::PostTraining(Opt::SignPreserving)) => (86.95, None),
        (Arch::Cnn, Sig, Scenario::PostTraining(Opt::Projected)) => (83.90, None),
        (Arch::Cnn, Sig, Scenario::PostTraining(Opt::SignPreserving)) => (84.87, None),
        (Arch::Cnn, Sin, Scenario::PostTraining(Opt::Projected)) => (87.59, None),
        (Arch::Cnn, Sin, Scenario::PostTraining(Opt::SignPreserving)) => (87.63, None),
        (Arch::Mlp, Sig, Scenario::ExpInit(Opt::Projected)) => (10.00, None),
        (Arch::Mlp, Sig, Scenario::FromScratch(Opt::Projected)) => (82.31, None),
        (Arch::Mlp, Sig, Scenario::ExpInit(Opt::SignPreserving)) => (10.00, None),
        (Arch::Mlp, Sig, Scenario::FromScratch(Opt::SignPreserving)) => (84.09, None),
        (Arch::Mlp, Sin, Scenario::ExpInit(Opt::Projected)) => (68.95, None),
        (Arch::Mlp, Sin, Scenario::FromScratch(Opt::Projected)) => (82.91, None),
        (Arch::Mlp, Sin, Scenario::ExpInit(Opt::SignPreserving)) => (9.97, None),
        (Arch::Mlp, Sin, Scenario::FromScratch(Opt::SignPreserving)) => (83.57, None),
        (Arch::Cnn, Sig, Scenario::FromScratch(Opt::Projected)) => (83.81, None),
        (Arch::Cnn, Sig, Scenario::FromScratch(Opt::SignPreserving)) => (83.87, None),
        (Arch::Cnn, Sin, Scenario::FromScratch(Opt::Projected)) => (87.77, None),
        (Arch::Cnn, Sin, Scenario::FromScratch(Opt::SignPreserving)) => (87.86, None),
        _ => return None,
    };
    Some(value)
}

/// Returns the figure of the method's public PyTorch code run with the same protocol on the full
/// Fashion-MNIST on a machine of this kind (seeds 0-2 for the
/// non-negative scenarios, one seed for the transformation).
pub fn pytorch_reference(model: Arch, activation: &Activation, scenario: Scenario) -> Option<Figure> {
    use Activation::{PhotonicSigmoid as Sig, PhotonicSinusoidal as Sin};
    if model != Arch::Mlp {
        return None;
    }
    let value = match (activation, scenario) {
        (Sig, Scenario::Transformation) => (86.25, None),
        (Sin, Scenario::Transformation) => (87.54, None),
        (Sig, Scenario::PostTraining(Opt::Projected)) => (82.66, Some(0.49)),
        (Sig, Scenario::PostTraining(Opt::SignPreserving)) => (82.65, Some(0.43)),
        (Sin, Scenario::PostTraining(Opt::Projected)) => (86.80, Some(0.12)),
        (Sin, Scenario::PostTraining(Opt::SignPreserving)) => (86.86, Some(0.19)),
        (Sig, Scenario::FromScratch(Opt::Projected)) => (83.97, Some(0.62)),
        (Sig, Scenario::FromScratch(Opt::SignPreserving)) => (85.28, Some(0.54)),
        (Sin, Scenario::FromScratch(Opt::Projected)) => (86.34, Some(0.50)),
        (Sin, Scenario::FromScratch(Opt::SignPreserving)) => (87.02, Some(0.42)),
        _ => return None,
    };
    Some(value)
}

/// Mean and sample standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn format_figure(figure: Option<Figure>) -> String {
    match figure {
        Some((mean, Some(std))) => format!("{mean:.2} +- {std:.2}"),
        Some((mean, None)) => format!("{mean:.2}"),
        None => "-".into(),
    }
}

fn group<'a>(results: &'a Results, model: Arch, activation: &Activation, scenario: Scenario) -> Vec<&'a Cell> {
    results
        .cells
        .iter()
        .filter(|c| c.model == model && &c.activation == activation && c.scenario == scenario)
        .collect()
}

fn ours(cells: &[&Cell]) -> String {
    if cells.is_empty() {
        return "not run".into();
    }
    let values: Vec<f64> = cells.iter().map(|c| 100.0 * c.result.test_accuracy).collect();
    let (mean, std) = mean_std(&values);
    if values.len() > 1 {
        format!("**{mean:.2} +- {std:.2}**")
    } else {
        format!("**{mean:.2}**")
    }
}

/// Renders `results.md`: each figure of ours beside the published one.
pub fn markdown(results: &Results) -> String {
    let config = &results.config;
    let mut md = String::new();
    md.push_str("# isonn reproduction\n\n");
    md.push_str(&format!(
        "Data: {} from {} ({} training, {} test images). isonn {}. Seeds: {}. \
         Long scenarios: {} epochs; post-training and the clip baseline: {} regular + {} \
         non-negative epochs. Test accuracy in %, after the last epoch (no checkpoint is \
         selected on the test set), **ours** then the published figure then the method's \
         PyTorch code run with the same protocol (seeds 0-2, mean +- std, for the \
         non-negative scenarios; one seed for the transformation).\n\n",
        results.dataset,
        results.data_source.trim_end_matches(')').replacen(" (", ", ", 1),
        results.train_samples,
        results.test_samples,
        results.isonn_version,
        config.seeds,
        config.budget,
        config.post_epochs,
        config.post_epochs
    ));

    let transformation: Vec<(Arch, Activation)> = keys(results, |s| s == Scenario::Transformation);
    if !transformation.is_empty() {
        md.push_str("## Transformation of a regularly trained network\n\n");
        md.push_str(
            "The non-negative network must match the regular one exactly. Agreement is the \
             fraction of test images where both predict the same class (worst seed); the \
             relative difference is the largest logit difference over the largest logit \
             (worst seed), for the stored f32 models and for both networks recomputed in f64.\n\n",
        );
        md.push_str("| model | activation | regular | non-negative | published | PyTorch run | agreement | max rel diff f32 | max rel diff f64 | negative params | min signal |\n");
        md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for (model, activation) in transformation {
            let cells = group(results, model, &activation, Scenario::Transformation);
            let reports: Vec<_> = cells.iter().filter_map(|c| c.result.equivalence.as_ref()).collect();
            let reports64: Vec<_> = cells.iter().filter_map(|c| c.result.equivalence_f64.as_ref()).collect();
            let regular: Vec<f64> = reports.iter().map(|r| 100.0 * r.accuracy_original).collect();
            let (mean, std) = mean_std(&regular);
            let agreement = reports.iter().map(|r| r.argmax_agreement).fold(1.0f64, f64::min);
            let rel32 = reports.iter().map(|r| r.max_rel_diff).fold(0.0f64, f64::max);
            let rel64 = reports64.iter().map(|r| r.max_rel_diff).fold(0.0f64, f64::max);
            let negative: usize = reports.iter().map(|r| r.negative_weights + r.negative_biases).sum();
            let min_signal = reports.iter().map(|r| r.min_signal).fold(f64::INFINITY, f64::min);
            md.push_str(&format!(
                "| {model} | {activation} | {} | {} | {} | {} | {agreement:.4} | {rel32:.1e} | {rel64:.1e} | {negative} | {min_signal:.1e} |\n",
                if regular.len() > 1 { format!("{mean:.2} +- {std:.2}") } else { format!("{mean:.2}") },
                ours(&cells),
                format_figure(published(model, &activation, Scenario::Transformation)),
                format_figure(pytorch_reference(model, &activation, Scenario::Transformation)),
            ));
        }
        md.push('\n');
    }

    let post = [
        ("regular + clip", Scenario::RegularClip),
        ("proposed + projected", Scenario::PostTraining(Opt::Projected)),
        ("proposed + sign-preserving", Scenario::PostTraining(Opt::SignPreserving)),
    ];
    let scratch = [
        ("exp init + projected", Scenario::ExpInit(Opt::Projected)),
        ("proposed + projected", Scenario::FromScratch(Opt::Projected)),
        ("exp init + sign-preserving", Scenario::ExpInit(Opt::SignPreserving)),
        ("proposed + sign-preserving", Scenario::FromScratch(Opt::SignPreserving)),
    ];
    for (title, columns) in [
        ("Non-negative post-training (regular pre-training, then non-negative)", &post[..]),
        ("Non-negative training from scratch", &scratch[..]),
    ] {
        let rows = keys(results, |s| columns.iter().any(|(_, c)| *c == s));
        if rows.is_empty() {
            continue;
        }
        md.push_str(&format!("## {title}\n\nEach cell: ours / published / PyTorch run.\n\n"));
        md.push_str("| model | activation |");
        for (name, _) in columns {
            md.push_str(&format!(" {name} |"));
        }
        md.push_str("\n| --- | --- |");
        md.push_str(&" --- |".repeat(columns.len()));
        md.push('\n');
        for (model, activation) in rows {
            md.push_str(&format!("| {model} | {activation} |"));
            for (_, scenario) in columns {
                let cells = group(results, model, &activation, *scenario);
                md.push_str(&format!(
                    " {} / {} / {} |",
                    ours(&cells),
                    format_figure(published(model, &activation, *scenario)),
                    format_figure(pytorch_reference(model, &activation, *scenario))
                ));
            }
            md.push('\n');
        }
        md.push('\n');
    }

    let comparisons: Vec<String> = keys(results, |s| matches!(s, Scenario::FromScratch(_)))
        .into_iter()
        .filter_map(|(model, activation)| {
            let mean = |kind| {
                let cells = group(results, model, &activation, Scenario::FromScratch(kind));
                let values: Vec<f64> = cells.iter().map(|c| 100.0 * c.result.test_accuracy).collect();
                (!values.is_empty()).then(|| mean_std(&values).0)
            };
            let (sign, projected) = (mean(Opt::SignPreserving)?, mean(Opt::Projected)?);
            let verdict = if sign >= projected { "at or above" } else { "BELOW" };
            Some(format!(
                "- {model}, {activation}: sign-preserving {sign:.2} is {verdict} projected SGD {projected:.2} \
                 (difference {:+.2} points; published: sign-preserving above).\n",
                sign - projected
            ))
        })
        .collect();
    if !comparisons.is_empty() {
        md.push_str("## Sign-preserving against projected SGD, from scratch\n\n");
        md.extend(comparisons);
        md.push('\n');
    }

    md.push_str("## Invariants measured during training\n\n");
    md.push_str("| cell | negative params after any step | entries zeroed by the optimizer | inverse-map rel diff |\n| --- | --- | --- | --- |\n");
    for c in &results.cells {
        if c.scenario == Scenario::Transformation {
            continue;
        }
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            Cell::name(c.model, &c.activation, c.scenario, c.seed),
            c.result.negative_after_steps,
            c.result.zeroed,
            c.result.inverse_rel_diff.map(|d| format!("{d:.1e}")).unwrap_or_else(|| "-".into())
        ));
    }
    md.push_str("\nDifferences from the published protocol: ");
    md.push_str(match results.config.shuffle {
        true => "this run shuffles the training set every epoch (`--shuffle`; the reference code \
                 does not);",
        false => "none in the order of the training set, which this run visits in file order \
                  every epoch as the reference code does;",
    });
    md.push_str(
        " the CNN reuses the MLP's non-negative learning \
         rates, which the reference does not state for it; \"exp init\" draws weights from an \
         exponential distribution whose mean is the layer's Xavier standard deviation, with \
         zero biases. Runs with fewer epochs or on the embedded subset are not comparable \
         with the published figures.\n",
    );
    md
}

/// Returns the (model, activation) pairs that have a cell of a scenario matching `filter`.
fn keys(results: &Results, filter: impl Fn(Scenario) -> bool) -> Vec<(Arch, Activation)> {
    let mut out: BTreeMap<String, (Arch, Activation)> = BTreeMap::new();
    for c in &results.cells {
        if filter(c.scenario) {
            out.entry(format!("{}-{}", c.model, c.activation)).or_insert_with(|| (c.model, c.activation.clone()));
        }
    }
    out.into_values().collect()
}
