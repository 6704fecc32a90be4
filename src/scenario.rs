//! Non-negative training and the method's experimental scenarios:
//! post-training, training from scratch, and the baselines the published
//! tables compare against.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use serde::{Deserialize, Serialize};

use crate::activation::Activation;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hardware::{realise, DeviceMapping, HardwareTraining, NoiseSource};
use crate::model::{Arch, Init, Mode, Network};
use crate::nonneg::{inverse, transform, NonnegNetwork, TransformOptions};
use crate::optim::{Momentum, Optimizer, Projected, Sgd, SignPreserving};
use crate::progress::Progress;
use crate::train::{fit, fit_checkpointed, Checkpointing, EpochMetrics, TrainConfig, TrainMetrics};
use crate::verify::{self, Precision};

/// The two optimizers that keep parameters non-negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NonnegOptimizerKind {
    /// `p <- max(p - lr g, 0)`.
    Projected,
    /// `p <- p - lr_out |p| tanh(lr_in g)`.
    SignPreserving,
}

impl std::fmt::Display for NonnegOptimizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NonnegOptimizerKind::Projected => "projected",
            NonnegOptimizerKind::SignPreserving => "sign-preserving",
        })
    }
}

/// A fully specified non-negative optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NonnegOptimizer {
    /// Projected SGD.
    Projected {
        /// Learning rate.
        lr: f64,
        /// Momentum on the gradient, in [0, 1).
        momentum: f64,
    },
    /// The sign-preserving update.
    SignPreserving {
        /// Scale of the gradient inside the tanh.
        lr_in: f64,
        /// Largest relative change per step, in (0, 1].
        lr_out: f64,
        /// Momentum variant.
        momentum: Momentum,
    },
}

impl NonnegOptimizer {
    /// Builds the optimizer, validating its settings.
    pub fn build(&self) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            NonnegOptimizer::Projected { lr, momentum } => Box::new(Projected::new(lr, momentum)?),
            NonnegOptimizer::SignPreserving {
                lr_in,
                lr_out,
                momentum,
            } => Box::new(SignPreserving::new(lr_in, lr_out, momentum)?),
        })
    }

    /// Returns which of the two rules this is.
    pub fn kind(&self) -> NonnegOptimizerKind {
        match self {
            NonnegOptimizer::Projected { .. } => NonnegOptimizerKind::Projected,
            NonnegOptimizer::SignPreserving { .. } => NonnegOptimizerKind::SignPreserving,
        }
    }
}

/// Figures of a non-negative training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NonnegTrainReport {
    /// Per-epoch figures and the final test accuracy.
    pub metrics: TrainMetrics,
    /// Entries that became exactly zero during training (the sign-preserving
    /// optimizer can underflow them; projected SGD clips them, not counted).
    pub zeroed: usize,
    /// Parameter entries found negative after an optimizer step, summed over
    /// every step; the optimizers guarantee 0.
    pub negative_after_steps: usize,
}

/// Trains `vars` (all `>= 0`) of a network given by `forward`, auditing
/// after every step that no parameter went negative.
#[allow(clippy::too_many_arguments)]
fn fit_nonneg(
    forward: &(dyn Fn(&Tensor) -> Result<Tensor> + Sync),
    input_shape: &[usize],
    vars: &[Var],
    optimizer: &NonnegOptimizer,
    data: &Dataset,
    config: &TrainConfig,
    progress: &Progress,
    checkpointing: &Checkpointing,
) -> Result<NonnegTrainReport> {
    let mut built = optimizer.build()?;
    let mut negative = 0usize;
    let mut audit = || -> Result<()> {
        for var in vars {
            let smallest = var.as_tensor().min_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if smallest < 0.0 {
                negative += crate::nonneg::count_negative(var.as_tensor())?;
            }
        }
        Ok(())
    };
    // NOTE: `negative` counts the steps of this process only; a resumed run
    // does not carry the count of the steps before the interruption.
    // Non-negative networks have no layer that trains differently.
    let forward = |x: &Tensor, _: Mode| forward(x);
    let metrics = fit_checkpointed(
        &forward,
        input_shape,
        vars,
        built.as_mut(),
        data,
        config,
        progress,
        &mut audit,
        checkpointing,
    )?;
    Ok(NonnegTrainReport {
        metrics,
        zeroed: built.zeroed(),
        negative_after_steps: negative,
    })
}

/// Trains a non-negative isomorphic network in place. `P`, `N` and the
/// biases are the parameters, while `lo`, `alpha` and the shifts stay
/// fixed. The forward pass is the one-GEMM training form
/// [`NonnegNetwork::forward_training`], whose values and gradients are
/// those of the physical form up to rounding and which runs faster. A
/// network for which [`NonnegNetwork::training_form_is_exact`] is false
/// trains with the physical form.
pub fn train_nonneg(
    network: &mut NonnegNetwork,
    data: &Dataset,
    config: &TrainConfig,
    optimizer: &NonnegOptimizer,
    progress: &Progress,
) -> Result<NonnegTrainReport> {
    train_nonneg_checkpointed(network, data, config, optimizer, progress, &Checkpointing::default())
}

/// Like [`train_nonneg`], with checkpoints, resume and interruption as
/// `checkpointing` sets (see [`fit_checkpointed`]).
pub fn train_nonneg_checkpointed(
    network: &mut NonnegNetwork,
    data: &Dataset,
    config: &TrainConfig,
    optimizer: &NonnegOptimizer,
    progress: &Progress,
    checkpointing: &Checkpointing,
) -> Result<NonnegTrainReport> {
    let vars = network.make_trainable()?;
    let shape = network.input_shape.clone();
    let report = {
        let training_form = network.training_form_is_exact();
        tracing::debug!("non-negative training uses the {} form", if training_form { "training" } else { "physical" });
        let forward = |x: &Tensor| {
            if training_form {
                network.forward_training(x)
            } else {
                network.forward(x)
            }
        };
        fit_nonneg(&forward, &shape, &vars, optimizer, data, config, progress, checkpointing)?
    };
    *network = network.to_dtype(network.dtype())?;
    Ok(report)
}

/// Trains a non-negative network in place through the hardware model: each
/// batch's forward pass realises the current weights on devices with
/// `hardware.effects` (fresh weight and detector noise per batch,
/// straight-through quantisation) and the optimizer updates the ideal
/// parameters. The reported test accuracy is measured on the same model of
/// the hardware.
pub fn train_nonneg_on_hardware(
    network: &mut NonnegNetwork,
    data: &Dataset,
    config: &TrainConfig,
    optimizer: &NonnegOptimizer,
    hardware: &HardwareTraining,
    progress: &Progress,
) -> Result<NonnegTrainReport> {
    hardware.effects.validate()?;
    let vars = network.make_trainable()?;
    let shape = network.input_shape.clone();
    let noise = NoiseSource::new(rand::rngs::StdRng::seed_from_u64(hardware.seed));
    let report = {
        let network = &*network;
        let forward = |x: &Tensor| -> Result<Tensor> {
            // The gains follow the weights as they train.
            let mapping = DeviceMapping::new(network, hardware.granularity)?;
            let realised = noise.with_rng(|rng| realise(network, &mapping, &hardware.effects, rng))?;
            realised.forward(x, &noise)
        };
        fit_nonneg(&forward, &shape, &vars, optimizer, data, config, progress, &Checkpointing::default())?
    };
    *network = network.to_dtype(network.dtype())?;
    Ok(report)
}

/// Sets the input range of a new `network` to the enclosing range of
/// `data`'s channels, drawing its parameters again from `init` and `seed`
/// when the range changes, because the photonic initialisation centres each
/// first-layer bias on the range's midpoint. Channels normalised apart get
/// their own, tighter ranges ([`Dataset::input_ranges`]), which the
/// transformation uses per channel.
pub fn use_input_range_of(network: &mut Network, data: &Dataset, init: Init, seed: u64) -> Result<()> {
    let range = data.enclosing_input_range();
    let channels = data.input_ranges();
    let same = channels.iter().all(|r| *r == range);
    network.channel_ranges = if same { Vec::new() } else { channels };
    if range != network.input_range {
        network.input_range = range;
        init.apply(network, seed)?;
    }
    Ok(())
}

/// Trains a regular network in place with SGD.
pub fn train_regular(
    network: &mut Network,
    data: &Dataset,
    config: &TrainConfig,
    lr: f64,
    progress: &Progress,
) -> Result<TrainMetrics> {
    let vars = network.make_trainable()?;
    let mut sgd = Sgd::new(lr, 0.0, 0.0)?;
    let shape = network.input_shape.clone();
    let metrics = {
        let forward = |x: &Tensor, mode: Mode| network.forward_mode(x, mode);
        fit(&forward, &shape, &vars, &mut sgd, data, config, progress, &mut || Ok(()))?
    };
    *network = network.detached();
    Ok(metrics)
}

/// Sets every negative weight and bias of a regular network to 0: the
/// "regular + clip" baseline, no longer isomorphic to the original.
pub fn clip_negative(network: &Network) -> Result<Network> {
    let mut out = network.detached();
    for layer in &mut out.layers {
        if let Some((w, b)) = layer.weight_and_bias_mut() {
            *w = w.relu()?;
            *b = b.relu()?;
        }
    }
    Ok(out)
}

/// Draws every weight of a plain network from an exponential distribution
/// whose mean equals the layer's Xavier-normal standard deviation
/// `sqrt(2 / (fan_in + fan_out))`, with zero biases: the "exp init" baseline.
pub fn exponential_init(network: &mut Network, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for layer in &mut network.layers {
        if let Some((w, b)) = layer.weight_and_bias_mut() {
            let dims = w.dims().to_vec();
            let receptive: usize = dims[2..].iter().product();
            let std = (2.0 / ((dims[0] + dims[1]) * receptive) as f64).sqrt();
            let exp = Exp::new(1.0 / std).expect("the rate is finite and > 0");
            let values: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|_| exp.sample(&mut rng) as f32)
                .collect();
            *w = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?;
            *b = b.zeros_like()?;
        }
    }
    Ok(())
}

/// One experiment of the published tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "optimizer", rename_all = "kebab-case")]
pub enum Scenario {
    /// Regular training, then the transformation (must match exactly).
    Transformation,
    /// `T_r` regular epochs, transformation, `T_nn` non-negative epochs.
    PostTraining(NonnegOptimizerKind),
    /// `T_r` regular epochs, negative parameters set to 0, `T_nn` epochs of
    /// projected SGD on the plain network.
    RegularClip,
    /// Initialise, transform at once, train the non-negative network.
    FromScratch(NonnegOptimizerKind),
    /// A plain network with exponentially drawn weights trained directly.
    ExpInit(NonnegOptimizerKind),
}

impl Scenario {
    /// Every scenario of the published grid.
    pub const ALL: [Scenario; 8] = [
        Scenario::Transformation,
        Scenario::RegularClip,
        Scenario::PostTraining(NonnegOptimizerKind::Projected),
        Scenario::PostTraining(NonnegOptimizerKind::SignPreserving),
        Scenario::ExpInit(NonnegOptimizerKind::Projected),
        Scenario::FromScratch(NonnegOptimizerKind::Projected),
        Scenario::ExpInit(NonnegOptimizerKind::SignPreserving),
        Scenario::FromScratch(NonnegOptimizerKind::SignPreserving),
    ];

    /// Returns whether this is a baseline the method is compared against.
    pub fn is_baseline(&self) -> bool {
        matches!(self, Scenario::RegularClip | Scenario::ExpInit(_))
    }

    /// Returns the scenario's name on the command line and in file names.
    pub fn name(&self) -> String {
        match self {
            Scenario::Transformation => "transformation".into(),
            Scenario::PostTraining(o) => format!("post-training-{o}"),
            Scenario::RegularClip => "regular-clip".into(),
            Scenario::FromScratch(o) => format!("from-scratch-{o}"),
            Scenario::ExpInit(o) => format!("exp-init-{o}"),
        }
    }

    /// Parses a name, or a group: `post-training`, `from-scratch` and
    /// `exp-init` mean both optimizers, `all` means every scenario.
    pub fn parse_list(text: &str) -> Result<Vec<Scenario>> {
        let mut out = Vec::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let matched: Vec<Scenario> = if word == "all" {
                Scenario::ALL.to_vec()
            } else {
                Scenario::ALL
                    .into_iter()
                    .filter(|s| s.name() == word || s.name().starts_with(&format!("{word}-")))
                    .collect()
            };
            if matched.is_empty() {
                let names: Vec<String> = Scenario::ALL.iter().map(|s| s.name()).collect();
                return Err(Error::config(
                    "--scenarios",
                    word,
                    format!(
                        "unknown scenario; valid are all, post-training, from-scratch, exp-init, {}",
                        names.join(", ")
                    ),
                ));
            }
            for s in matched {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }
}

/// Hyper-parameters of a scenario under the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScenarioSettings {
    /// Regular epochs (before a transformation or a clip).
    pub regular_epochs: usize,
    /// Non-negative epochs.
    pub nonneg_epochs: usize,
    /// Learning rate of the regular SGD.
    pub regular_lr: f64,
    /// The non-negative optimizer, if the scenario has one.
    pub optimizer: Option<NonnegOptimizer>,
    /// Samples per minibatch.
    pub batch_size: usize,
    /// Shuffle the training set every epoch (the reference code does not).
    #[serde(default = "crate::train::yes")]
    pub shuffle: bool,
}

/// Returns the reference code's Fashion-MNIST settings for a scenario.
///
/// The learning rates are the reference's for the MLP. The CNN reuses the
/// MLP's non-negative rates, because the reference does not state them for
/// it. Long scenarios get `budget` epochs, and post-training gets `post`
/// regular plus `post` non-negative epochs.
pub fn settings(
    arch: Arch,
    activation: &Activation,
    scenario: Scenario,
    budget: usize,
    post: usize,
    shuffle: bool,
) -> ScenarioSettings {
    let sinusoidal = *activation == Activation::PhotonicSinusoidal;
    let regular_lr = match (arch, sinusoidal) {
        (Arch::Mlp, true) => 0.16,
        (Arch::Cnn, true) => 0.056,
        _ => 0.01,
    };
    let post_rule = |kind| match (kind, sinusoidal) {
        (NonnegOptimizerKind::SignPreserving, false) => sign(0.28, 0.3),
        (NonnegOptimizerKind::SignPreserving, true) => sign(0.9, 0.6),
        (NonnegOptimizerKind::Projected, false) => projected(0.0027),
        (NonnegOptimizerKind::Projected, true) => projected(0.008),
    };
    let scratch_rule = |kind| match (kind, sinusoidal) {
        (NonnegOptimizerKind::SignPreserving, false) => sign(0.28, 0.91),
        (NonnegOptimizerKind::SignPreserving, true) => sign(0.63, 0.5),
        (NonnegOptimizerKind::Projected, false) => projected(0.0091),
        (NonnegOptimizerKind::Projected, true) => projected(0.05),
    };
    let (regular_epochs, nonneg_epochs, optimizer) = match scenario {
        Scenario::Transformation => (budget, 0, None),
        Scenario::PostTraining(kind) => (post, post, Some(post_rule(kind))),
        Scenario::RegularClip => (post, post, Some(post_rule(NonnegOptimizerKind::Projected))),
        Scenario::FromScratch(kind) | Scenario::ExpInit(kind) => (0, budget, Some(scratch_rule(kind))),
    };
    ScenarioSettings {
        regular_epochs,
        nonneg_epochs,
        regular_lr,
        optimizer,
        batch_size: 256,
        shuffle,
    }
}

fn sign(lr_in: f64, lr_out: f64) -> NonnegOptimizer {
    NonnegOptimizer::SignPreserving {
        lr_in,
        lr_out,
        momentum: Momentum::None,
    }
}

fn projected(lr: f64) -> NonnegOptimizer {
    NonnegOptimizer::Projected { lr, momentum: 0.0 }
}

/// The outcome of one scenario for one network and seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// Test accuracy after the last epoch, in [0, 1].
    pub test_accuracy: f64,
    /// Test accuracy after every epoch, regular epochs first.
    pub curve: Vec<EpochMetrics>,
    /// Entries zeroed by the sign-preserving optimizer.
    pub zeroed: usize,
    /// Negative parameters seen after any optimizer step (must be 0).
    pub negative_after_steps: usize,
    /// For isomorphic networks after non-negative training: the largest
    /// relative logit difference between the network and the regular
    /// network its inverse map gives, on the test set.
    pub inverse_rel_diff: Option<f64>,
    /// For the transformation: the equivalence report on the test set.
    pub equivalence: Option<verify::EquivalenceReport>,
    /// For the transformation: the same networks recomputed in f64 (the
    /// regular network converted to f64 and transformed in f64).
    pub equivalence_f64: Option<verify::EquivalenceReport>,
    /// The settings used.
    pub settings: ScenarioSettings,
}

/// The trained networks a scenario leaves, for saving and plotting.
pub struct ScenarioModels {
    /// The regular network (trained, clipped or exponentially initialised).
    pub regular: Option<Network>,
    /// The non-negative isomorphic network, when the scenario has one.
    pub nonneg: Option<NonnegNetwork>,
    /// The non-negative network right after the transformation, before any
    /// non-negative training.
    pub transformed: Option<NonnegNetwork>,
}

/// Regular networks already trained in this process, so that scenarios
/// starting from the same regular training (post-training with either
/// optimizer, the clip baseline, and a transformation with as many epochs)
/// train it once. The training is deterministic for a given key, so reusing
/// it gives the same network as training it again.
#[derive(Default)]
pub struct Pretrained {
    done: HashMap<String, (Network, Vec<EpochMetrics>)>,
    reused: usize,
}

impl Pretrained {
    /// Returns how many scenarios took their regular training from the cache.
    pub fn reused(&self) -> usize {
        self.reused
    }

    fn key(arch: Arch, activation: Activation, init: Init, seed: u64, settings: &ScenarioSettings) -> String {
        format!(
            "{arch}-{activation}-{init}-seed{seed}-epochs{}-lr{:e}-batch{}-shuffle{}",
            settings.regular_epochs, settings.regular_lr, settings.batch_size, settings.shuffle
        )
    }
}

/// Runs `scenario` for one architecture, activation and seed, reusing a
/// regular training found in `pretrained` and adding the one it runs.
#[allow(clippy::too_many_arguments)]
pub fn run_scenario(
    arch: Arch,
    activation: Activation,
    scenario: Scenario,
    settings: &ScenarioSettings,
    init: Init,
    seed: u64,
    data: &Dataset,
    transform_options: &TransformOptions,
    pretrained: &mut Pretrained,
    progress: &Progress,
) -> Result<(ScenarioResult, ScenarioModels)> {
    let shape = data.train.sample_shape();
    let mut network = Network::build(arch, &shape, &[100, 200], data.classes, activation.clone(), init, seed)?;
    use_input_range_of(&mut network, data, init, seed)?;
    let config = |epochs| TrainConfig {
        epochs,
        batch_size: settings.batch_size,
        seed,
        eval_every_epoch: true,
        shuffle: settings.shuffle,
        augment: false,
    };
    let mut curve = Vec::new();
    if settings.regular_epochs > 0 {
        let key = Pretrained::key(arch, activation, init, seed, settings);
        if let Some((trained, epochs)) = pretrained.done.get(&key) {
            tracing::info!("reusing the regular training {key}");
            pretrained.reused += 1;
            network = trained.detached();
            curve.extend(epochs.iter().cloned());
        } else {
            let metrics =
                train_regular(&mut network, data, &config(settings.regular_epochs), settings.regular_lr, progress)?;
            network = network.detached();
            pretrained.done.insert(key, (network.detached(), metrics.epochs.clone()));
            curve.extend(metrics.epochs);
        }
    }
    let mut result = ScenarioResult {
        test_accuracy: curve.last().and_then(|e| e.test_accuracy).unwrap_or(0.0),
        curve,
        zeroed: 0,
        negative_after_steps: 0,
        inverse_rel_diff: None,
        equivalence: None,
        equivalence_f64: None,
        settings: *settings,
    };
    let mut models = ScenarioModels {
        regular: None,
        nonneg: None,
        transformed: None,
    };
    let optimizer = settings.optimizer;
    let append = |result: &mut ScenarioResult, report: NonnegTrainReport| {
        let offset = result.curve.len();
        result.curve.extend(report.metrics.epochs.into_iter().map(|mut e| {
            e.epoch += offset;
            e
        }));
        result.test_accuracy = report.metrics.test_accuracy;
        result.zeroed = report.zeroed;
        result.negative_after_steps = report.negative_after_steps;
    };
    match scenario {
        Scenario::Transformation => {
            let nonneg = transform(&network, transform_options)?;
            let equivalence = verify::verify(&network, &nonneg, &data.test, 1000, Precision::Model, progress)?;
            let network64 = network.to_dtype(DType::F64)?;
            let nonneg64 = transform(&network64, transform_options)?;
            let equivalence_f64 = verify::verify(&network64, &nonneg64, &data.test, 1000, Precision::F64, progress)?;
            result.test_accuracy = equivalence.accuracy_isomorphic;
            result.equivalence = Some(equivalence);
            result.equivalence_f64 = Some(equivalence_f64);
            models.transformed = Some(nonneg.clone());
            models.nonneg = Some(nonneg);
            models.regular = Some(network);
        }
        Scenario::PostTraining(_) | Scenario::FromScratch(_) => {
            let optimizer = optimizer.expect("these scenarios have an optimizer");
            let mut nonneg = transform(&network, transform_options)?;
            models.transformed = Some(nonneg.clone());
            let report = train_nonneg(&mut nonneg, data, &config(settings.nonneg_epochs), &optimizer, progress)?;
            append(&mut result, report);
            let back = inverse(&nonneg)?;
            let check = verify::verify(&back, &nonneg, &data.test, 1000, Precision::Model, progress)?;
            result.inverse_rel_diff = Some(check.max_rel_diff);
            models.nonneg = Some(nonneg);
            models.regular = Some(network);
        }
        Scenario::RegularClip | Scenario::ExpInit(_) => {
            let optimizer = optimizer.expect("these scenarios have an optimizer");
            let mut plain = if scenario == Scenario::RegularClip {
                clip_negative(&network)?
            } else {
                exponential_init(&mut network, seed)?;
                network.detached()
            };
            let vars = plain.make_trainable()?;
            let report = {
                let forward = |x: &Tensor| plain.forward(x);
                fit_nonneg(&forward, &shape, &vars, &optimizer, data, &config(settings.nonneg_epochs), progress, &Checkpointing::default())?
            };
            append(&mut result, report);
            models.regular = Some(plain.detached());
        }
    }
    Ok((result, models))
}
