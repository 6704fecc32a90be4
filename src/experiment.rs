//! `isonn reproduce`: the method's published experiments, run on real data
//! and tabulated beside the published figures.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::data::Dataset;
use crate::error::Result;
use crate::fsio;
use crate::model::{Arch, Init, Network};
use crate::nonneg::{transform, TransformOptions};
use crate::progress::Progress;
use crate::store::{self, Model};
use crate::train::{fit, Sgd, TrainConfig, TrainMetrics};
use crate::verify::{verify, EquivalenceReport, Precision};

/// The protocol's settings for one architecture and activation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Protocol {
    /// Regular SGD learning rate.
    pub lr: f64,
    /// Epochs of the full protocol.
    pub epochs: usize,
    /// Samples per minibatch.
    pub batch_size: usize,
}

/// The protocol of the method's reference code for Fashion-MNIST.
pub fn protocol(arch: Arch, activation: Activation) -> Protocol {
    let lr = match (arch, activation) {
        (Arch::Mlp, Activation::PhotonicSinusoidal) => 0.16,
        (Arch::Cnn, Activation::PhotonicSinusoidal) => 0.056,
        _ => 0.01,
    };
    Protocol {
        lr,
        epochs: 50,
        batch_size: 256,
    }
}

/// A figure from the literature to print beside ours.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reference {
    /// Where the figure comes from.
    pub source: String,
    /// Test accuracy in percent.
    pub mean: f64,
    /// Standard deviation over runs, in points, when reported.
    pub std: Option<f64>,
}

/// Published test accuracy of the transformation (Fashion-MNIST, the
/// authors' journal version), and an independent PyTorch run of the same
/// protocol.
pub fn transformation_references(arch: Arch, activation: Activation) -> Vec<Reference> {
    let published = match (arch, activation) {
        (Arch::Mlp, Activation::PhotonicSigmoid) => Some((85.64, 0.22)),
        (Arch::Mlp, Activation::PhotonicSinusoidal) => Some((86.30, 0.52)),
        (Arch::Cnn, Activation::PhotonicSigmoid) => Some((87.59, 0.47)),
        (Arch::Cnn, Activation::PhotonicSinusoidal) => Some((89.22, 0.18)),
        _ => None,
    };
    let pytorch = match (arch, activation) {
        (Arch::Mlp, Activation::PhotonicSigmoid) => Some(86.25),
        (Arch::Mlp, Activation::PhotonicSinusoidal) => Some(87.54),
        _ => None,
    };
    let mut out = Vec::new();
    if let Some((mean, std)) = published {
        out.push(Reference {
            source: "published".into(),
            mean,
            std: Some(std),
        });
    }
    if let Some(mean) = pytorch {
        out.push(Reference {
            source: "pytorch-reference-run".into(),
            mean,
            std: None,
        });
    }
    out
}

/// Settings of a reproduction run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReproduceConfig {
    /// Output directory.
    pub out: PathBuf,
    /// Architectures to run.
    pub models: Vec<Arch>,
    /// Activations to run.
    pub activations: Vec<Activation>,
    /// Epochs; `None` for the protocol's.
    pub epochs: Option<usize>,
    /// Seeds `0..seeds`.
    pub seeds: u64,
    /// Initialisation of the regular networks.
    pub init: Init,
    /// Transformation settings.
    pub transform: TransformOptions,
    /// Continue a run in `out`, keeping the cells it finished.
    pub resume: bool,
}

/// The outcome of training, transforming and verifying one network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransformationCell {
    /// Architecture.
    pub model: Arch,
    /// Activation.
    pub activation: Activation,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Learning rate.
    pub lr: f64,
    /// Initialisation.
    pub init: Init,
    /// Training figures of the regular network.
    pub training: TrainMetrics,
    /// Equivalence of the regular and non-negative networks on the test set.
    pub equivalence: EquivalenceReport,
    /// The same comparison recomputed in f64.
    pub equivalence_f64: EquivalenceReport,
    /// Wall time of the cell, in seconds.
    pub seconds: f64,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// isonn version that produced the file.
    pub isonn_version: String,
    /// The data set and where it was read from.
    pub dataset: String,
    /// Where the data came from.
    pub data_source: String,
    /// Training and test set sizes.
    pub train_samples: usize,
    /// Test set size.
    pub test_samples: usize,
    /// The run's settings.
    pub config: ReproduceConfig,
    /// One entry per (model, activation, seed).
    pub transformation: Vec<TransformationCell>,
}

/// Runs the transformation experiment: trains each requested network with
/// the protocol's settings, transforms it, verifies it on the whole test
/// set, and writes `results.json` and `results.md` to `config.out`.
///
/// Each finished cell is saved under `out/cells/`, and with `resume` a cell
/// found there is read back instead of being trained again.
pub fn reproduce(config: &ReproduceConfig, data: &Dataset, progress: &Progress) -> Result<Results> {
    fsio::create_dir_all(&config.out.join("cells"))?;
    let mut grid = Vec::new();
    for &model in &config.models {
        for &activation in &config.activations {
            for seed in 0..config.seeds {
                grid.push((model, activation, seed));
            }
        }
    }
    let bar = progress.bar(grid.len() as u64, "grid");
    let mut cells = Vec::new();
    for (model, activation, seed) in grid {
        let name = format!("{model}-{activation}-seed{seed}");
        let cell_path = config.out.join("cells").join(format!("{name}.json"));
        if config.resume && cell_path.exists() {
            let bytes = fsio::read(&cell_path)?;
            if let Ok(cell) = serde_json::from_slice::<TransformationCell>(&bytes) {
                tracing::info!("{name}: kept from the earlier run");
                cells.push(cell);
                bar.inc(1);
                continue;
            }
            tracing::warn!("{}: unreadable, running the cell again", cell_path.display());
        }
        let cell = run_transformation_cell(config, data, model, activation, seed, progress)?;
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
        transformation: cells,
    };
    fsio::write_json_atomic(&config.out.join("results.json"), &results)?;
    fsio::write_atomic(&config.out.join("results.md"), markdown(&results).as_bytes())?;
    Ok(results)
}

fn run_transformation_cell(
    config: &ReproduceConfig,
    data: &Dataset,
    model: Arch,
    activation: Activation,
    seed: u64,
    progress: &Progress,
) -> Result<TransformationCell> {
    let start = Instant::now();
    let protocol = protocol(model, activation);
    let epochs = config.epochs.unwrap_or(protocol.epochs);
    tracing::info!("{model} {activation} seed {seed}: {epochs} epochs, lr {}, init {}", protocol.lr, config.init);
    let shape = data.train.sample_shape();
    let mut network = Network::build(model, &shape, &[100, 200], data.classes, activation, config.init, seed)?;
    let vars = network.make_trainable()?;
    let mut sgd = Sgd::new(protocol.lr, 0.0, 0.0)?;
    let train_config = TrainConfig {
        epochs,
        batch_size: protocol.batch_size,
        seed,
        eval_every_epoch: true,
    };
    let training = {
        let forward = |x: &candle_core::Tensor| network.forward(x);
        fit(&forward, &shape, &vars, &mut sgd, data, &train_config, progress, &mut || Ok(()))?
    };
    let network = network.detached();
    let nonneg = transform(&network, &config.transform)?;
    let equivalence = verify(&network, &nonneg, &data.test, 1000, Precision::Model, progress)?;
    let equivalence_f64 = verify(&network, &nonneg, &data.test, 1000, Precision::F64, progress)?;
    tracing::info!(
        "{model} {activation} seed {seed}: test accuracy {:.4}, non-negative {:.4}, argmax agreement {}, max_rel_diff {:.2e}",
        equivalence.accuracy_original,
        equivalence.accuracy_isomorphic,
        equivalence.argmax_agreement,
        equivalence.max_rel_diff
    );
    let dir = config.out.join("models").join(format!("{model}-{activation}-seed{seed}"));
    let provenance = serde_json::json!({
        "isonn_version": env!("CARGO_PKG_VERSION"),
        "arch": model, "activation": activation, "init": config.init,
        "training": train_config, "lr": protocol.lr, "dataset": data.name,
        "data_source": data.source.to_string(), "test_accuracy": training.test_accuracy,
    });
    store::save(&dir.join("regular"), &Model::Regular(network), &provenance)?;
    store::save(&dir.join("nonneg"), &Model::Nonneg(nonneg), &serde_json::json!({
        "transform": config.transform, "source_model": dir.join("regular"),
    }))?;
    Ok(TransformationCell {
        model,
        activation,
        seed,
        epochs,
        lr: protocol.lr,
        init: config.init,
        training,
        equivalence,
        equivalence_f64,
        seconds: start.elapsed().as_secs_f64(),
    })
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

fn format_pm(values: &[f64]) -> String {
    let (mean, std) = mean_std(values);
    if values.len() > 1 {
        format!("{mean:.2} +- {std:.2}")
    } else {
        format!("{mean:.2}")
    }
}

/// Renders `results.md`: our figures beside the published ones.
pub fn markdown(results: &Results) -> String {
    let mut md = String::new();
    md.push_str("# isonn reproduction\n\n");
    md.push_str(&format!(
        "Data: {} from {} ({} training, {} test images). isonn {}.\n\n",
        results.dataset, results.data_source, results.train_samples, results.test_samples, results.isonn_version
    ));
    md.push_str("## Transformation of a regularly trained network\n\n");
    md.push_str(
        "Test accuracy in %, mean +- standard deviation over seeds, after the last epoch \
         (no checkpoint is selected on the test set). The non-negative network must match \
         the regular one exactly: agreement is the fraction of test images where both \
         predict the same class, and the relative difference is the largest logit \
         difference divided by the largest logit, in f32 and in f64.\n\n",
    );
    md.push_str("| model | activation | epochs | seeds | regular | non-negative | agreement | max rel diff f32 | max rel diff f64 | negative params | min signal | published | PyTorch run |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let mut keys: Vec<(Arch, Activation)> = Vec::new();
    for c in &results.transformation {
        if !keys.contains(&(c.model, c.activation)) {
            keys.push((c.model, c.activation));
        }
    }
    for (model, activation) in keys {
        let cells: Vec<&TransformationCell> = results
            .transformation
            .iter()
            .filter(|c| c.model == model && c.activation == activation)
            .collect();
        let percent = |f: &dyn Fn(&TransformationCell) -> f64| -> Vec<f64> { cells.iter().map(|c| 100.0 * f(c)).collect() };
        let regular = percent(&|c| c.equivalence.accuracy_original);
        let nonneg = percent(&|c| c.equivalence.accuracy_isomorphic);
        let agreement = cells.iter().map(|c| c.equivalence.argmax_agreement).fold(1.0f64, f64::min);
        let rel32 = cells.iter().map(|c| c.equivalence.max_rel_diff).fold(0.0f64, f64::max);
        let rel64 = cells.iter().map(|c| c.equivalence_f64.max_rel_diff).fold(0.0f64, f64::max);
        let negative: usize = cells.iter().map(|c| c.equivalence.negative_weights + c.equivalence.negative_biases).sum();
        let min_signal = cells.iter().map(|c| c.equivalence.min_signal).fold(f64::INFINITY, f64::min);
        let epochs: Vec<String> = cells.iter().map(|c| c.epochs.to_string()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let refs = transformation_references(model, activation);
        let reference = |source: &str| {
            refs.iter()
                .find(|r| r.source == source)
                .map(|r| match r.std {
                    Some(s) => format!("{:.2} +- {s:.2}", r.mean),
                    None => format!("{:.2}", r.mean),
                })
                .unwrap_or_else(|| "-".into())
        };
        md.push_str(&format!(
            "| {model} | {activation} | {} | {} | {} | {} | {agreement:.4} | {rel32:.1e} | {rel64:.1e} | {negative} | {min_signal:.2e} | {} | {} |\n",
            epochs.join(", "),
            cells.len(),
            format_pm(&regular),
            format_pm(&nonneg),
            reference("published"),
            reference("pytorch-reference-run"),
        ));
    }
    md.push_str(
        "\nPublished: the authors' journal version (50 epochs, mean +- std over runs). \
         PyTorch run: the method's public PyTorch code with the same protocol on the full \
         Fashion-MNIST, one seed. The protocol here shuffles the training set every epoch; \
         the reference code does not. Runs with fewer epochs or on the embedded subset are \
         not comparable with either figure.\n",
    );
    md
}

/// Path of the results table inside an output directory.
pub fn results_markdown_path(out: &Path) -> PathBuf {
    out.join("results.md")
}
