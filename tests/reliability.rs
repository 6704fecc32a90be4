//! Reliability of what isonn writes and reads: determinism, truncated and
//! half-written files of every kind, checkpoint resume through the library,
//! the divergence guard and non-finite weights.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use isonn::activation::Activation;
use isonn::checkpoint;
use isonn::data::{self, Dataset};
use isonn::experiment::{Cell, ReproduceConfig, Results};
use isonn::fsio;
use isonn::model::{Arch, Init, Network};
use isonn::nonneg::{transform, TransformOptions};
use isonn::optim::{Optimizer, OptimizerState, Sgd};
use isonn::progress::Progress;
use isonn::store::{self, Model};
use isonn::train::{fit_checkpointed, Checkpointing, TrainConfig, TrainMetrics};
use isonn::verify::{self, EquivalenceReport, Precision};
use isonn::Error;

fn small_data() -> Dataset {
    let mut data = data::load_embedded().unwrap();
    data.train = data.train.take(600);
    data.test = data.test.take(200);
    data
}

fn mlp(seed: u64) -> Network {
    Network::build(Arch::Mlp, &[1, 28, 28], &[8], 10, Activation::PhotonicSigmoid, Init::Xavier, seed).unwrap()
}

fn config(epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 50,
        seed,
        eval_every_epoch: true,
        shuffle: true,
        augment: false,
    }
}

/// Trains `network` with SGD (lr, momentum 0.9), checkpointing into `dir`
/// when it is given.
fn train(
    network: &mut Network,
    data: &Dataset,
    config: &TrainConfig,
    lr: f64,
    dir: Option<&PathBuf>,
    resume: bool,
) -> isonn::Result<TrainMetrics> {
    let vars = network.make_trainable()?;
    let mut sgd = Sgd::new(lr, 0.9, 0.0)?;
    let checkpointing = Checkpointing {
        dir: dir.cloned(),
        resume,
        settings: serde_json::json!({ "test": "reliability" }),
        stop: None,
    };
    let shape = network.input_shape.clone();
    let forward = |x: &Tensor, mode| network.forward_mode(x, mode);
    fit_checkpointed(&forward, &shape, &vars, &mut sgd, data, config, &Progress::hidden(), &mut || Ok(()), &checkpointing)
}

fn saved_tensors(network: &Network, dir: &Path) -> Vec<u8> {
    store::save(dir, &Model::Regular(network.detached()), &serde_json::json!({})).unwrap();
    std::fs::read(dir.join(store::MODEL_TENSORS)).unwrap()
}

#[test]
fn same_seed_gives_identical_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data();
    let mut files = Vec::new();
    let mut figures = Vec::new();
    for (run, seed) in [(0, 5), (1, 5), (2, 6)] {
        let mut network = mlp(seed);
        let metrics = train(&mut network, &data, &config(2, seed), 0.05, None, false).unwrap();
        files.push(saved_tensors(&network, &tmp.path().join(format!("run{run}"))));
        figures.push(metrics.epochs.iter().map(|e| (e.loss, e.train_accuracy, e.test_accuracy)).collect::<Vec<_>>());
    }
    assert_eq!(files[0], files[1], "two runs with seed 5 wrote different model.safetensors");
    assert_eq!(figures[0], figures[1], "two runs with seed 5 measured different figures");
    assert_ne!(files[0], files[2], "seeds 5 and 6 wrote the same model.safetensors");
}

#[test]
fn library_resume_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data();
    let mut straight = mlp(2);
    let expected_metrics = train(&mut straight, &data, &config(3, 2), 0.05, None, false).unwrap();
    let expected = saved_tensors(&straight, &tmp.path().join("straight"));

    // One epoch, then a fresh process-like start that resumes to three.
    let dir = tmp.path().join("resumed");
    fsio::create_dir_all(&dir).unwrap();
    let mut first = mlp(2);
    train(&mut first, &data, &config(1, 2), 0.05, Some(&dir), false).unwrap();
    let mut second = mlp(2);
    let metrics = train(&mut second, &data, &config(3, 2), 0.05, Some(&dir), true).unwrap();
    assert_eq!(saved_tensors(&second, &tmp.path().join("out")), expected);
    assert_eq!(metrics.epochs.len(), 3);
    assert_eq!(metrics.test_accuracy, expected_metrics.test_accuracy);
    assert_eq!(metrics.epochs[2].loss, expected_metrics.epochs[2].loss);
}

#[test]
fn resume_rejects_other_batch_size() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data();
    let dir = tmp.path().to_path_buf();
    train(&mut mlp(1), &data, &config(1, 1), 0.05, Some(&dir), false).unwrap();
    let mut other = config(2, 1);
    other.batch_size = 60;
    let error = train(&mut mlp(1), &data, &other, 0.05, Some(&dir), true).unwrap_err().to_string();
    assert!(error.contains("--batch-size 50, this run has 60"), "{error}");
}

#[test]
fn divergence_names_epoch_batch_and_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data();
    let dir = tmp.path().to_path_buf();
    let path = checkpoint::path_in(&dir);

    // Diverging before any checkpoint leaves none behind.
    let error = train(&mut mlp(1), &data, &config(2, 1), 1e300, Some(&dir), false).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Diverged { epoch: 1, .. }), "{message}");
    assert!(message.contains("no checkpoint of this run"), "{message}");
    assert!(!path.exists(), "a diverged run wrote a checkpoint");

    // One good epoch, then a resume with a learning rate that diverges.
    train(&mut mlp(1), &data, &config(1, 1), 0.05, Some(&dir), false).unwrap();
    let good = std::fs::read(&path).unwrap();
    let error = train(&mut mlp(1), &data, &config(2, 1), 1e300, Some(&dir), true).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Diverged { epoch: 2, .. }), "{message}");
    assert!(message.contains("epoch 2, batch"), "{message}");
    assert!(message.contains(&format!("{} (after epoch 1)", path.display())), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), good, "the last good checkpoint changed");
    assert!(checkpoint::load(&path).is_ok());
}

#[test]
fn nan_weights_are_never_saved_or_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let network = mlp(0);
    let dir = tmp.path().join("model");
    store::save(&dir, &Model::Regular(network.clone()), &serde_json::json!({})).unwrap();

    let mut poisoned = network.clone();
    if let Some((w, _)) = poisoned.layers.iter_mut().find_map(|l| l.weight_and_bias_mut()) {
        let mut values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[3] = f32::NAN;
        *w = Tensor::from_vec(values, w.dims(), w.device()).unwrap();
    }
    let error = store::save(&dir, &Model::Regular(poisoned.clone()), &serde_json::json!({}))
        .unwrap_err()
        .to_string();
    assert!(error.contains("non-finite"), "{error}");
    assert!(store::load(&dir).is_ok(), "the failed save damaged the good model");

    // A file written by another tool with a NaN entry is rejected by name.
    let tensors: Vec<(String, Tensor)> = poisoned.parameters();
    let bytes = store::serialize_tensors(&tensors, None, Path::new("x")).unwrap();
    std::fs::write(dir.join(store::MODEL_TENSORS), bytes).unwrap();
    let error = store::load(&dir).unwrap_err().to_string();
    assert!(error.contains("tensor layers.1.weight contains a non-finite value"), "{error}");
}

/// Offsets to truncate a file of `len` bytes at: 0 and random ones, all
/// before the last byte (a JSON file minus its final newline still parses).
fn offsets(len: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cut = vec![0, len.saturating_sub(2)];
    cut.extend((0..10).map(|_| rng.gen_range(0..len.saturating_sub(1).max(1))));
    cut
}

/// Truncates `path` at random offsets and requires `load` to fail with an
/// error naming the file; then interrupts an atomic rewrite of it halfway
/// and requires the good file to be intact and to load.
fn check_truncation<T>(path: &Path, load: &dyn Fn(&Path) -> isonn::Result<T>, seed: u64) {
    let good = std::fs::read(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(load(path).is_ok(), "{name}: the good file does not load");
    for cut in offsets(good.len(), seed) {
        std::fs::write(path, &good[..cut]).unwrap();
        match load(path) {
            Ok(_) => panic!("{name} truncated to {cut} of {} bytes loaded", good.len()),
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains(&name), "{name} at {cut}: the error does not name the file: {message}");
            }
        }
        // An atomic write that stops at the same offset keeps the old file.
        std::fs::write(path, &good).unwrap();
        let result = fsio::write_atomic_with(path, |file| {
            file.write_all(&good[..cut])?;
            Err(std::io::Error::other("simulated crash"))
        });
        assert!(result.is_err());
        assert_eq!(std::fs::read(path).unwrap(), good, "{name}: an interrupted write changed the file");
        assert!(!fsio::temporary_path(path).exists(), "{name}: the temporary file was left behind");
        assert!(load(path).is_ok(), "{name}: the kept file does not load");
    }
}

fn cells() -> Vec<(PathBuf, Cell)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runs/mlp-fashion-mnist/cells");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
        .into_iter()
        .take(2)
        .map(|p| {
            let cell = fsio::read_json::<Cell>(&p, "reproduce cell").unwrap();
            (p, cell)
        })
        .collect()
}

#[test]
fn truncated_files_fail_and_good_files_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let data = small_data();
    let mut network = mlp(4);
    let dir = tmp.path().join("model");
    fsio::create_dir_all(&dir).unwrap();
    // A checkpoint with optimizer buffers, from one real epoch.
    train(&mut network, &data, &config(1, 4), 0.05, Some(&dir), false).unwrap();
    let network = network.detached();
    store::save(&dir, &Model::Regular(network.clone()), &serde_json::json!({})).unwrap();
    let load_model = |p: &Path| store::load(p.parent().unwrap()).map(|_| ());
    check_truncation(&dir.join(store::MODEL_JSON), &load_model, 1);
    check_truncation(&dir.join(store::MODEL_TENSORS), &load_model, 2);
    check_truncation(&checkpoint::path_in(&dir), &|p: &Path| checkpoint::load(p).map(|_| ()), 3);

    let nonneg = transform(&network, &TransformOptions::default()).unwrap();
    let report = verify::verify(&network, &nonneg, &data.test, 100, Precision::Model, &Progress::hidden()).unwrap();
    let report_path = tmp.path().join("equivalence.json");
    fsio::write_json_atomic(&report_path, &report).unwrap();
    check_truncation(&report_path, &|p: &Path| fsio::read_json::<EquivalenceReport>(p, "equivalence.json"), 4);

    let cells = cells();
    let cell_path = tmp.path().join(cells[0].0.file_name().unwrap());
    fsio::write_json_atomic(&cell_path, &cells[0].1).unwrap();
    check_truncation(&cell_path, &|p: &Path| fsio::read_json::<Cell>(p, "reproduce cell"), 5);

    let results = Results {
        isonn_version: env!("CARGO_PKG_VERSION").into(),
        dataset: "fashion-mnist".into(),
        data_source: "test".into(),
        train_samples: 60_000,
        test_samples: 10_000,
        config: ReproduceConfig {
            out: tmp.path().to_path_buf(),
            models: vec![cells[0].1.model],
            activations: vec![cells[0].1.activation.clone()],
            scenarios: vec![cells[0].1.scenario],
            budget: 50,
            post_epochs: 5,
            seeds: 1,
            baseline_seeds: None,
            init: Init::Xavier,
            shuffle: false,
            transform: TransformOptions::default(),
            resume: false,
            report_only: false,
        },
        cells: cells.into_iter().map(|(_, c)| c).collect(),
        seconds: 1.0,
    };
    let results_path = tmp.path().join("results.json");
    fsio::write_json_atomic(&results_path, &results).unwrap();
    check_truncation(&results_path, &|p: &Path| fsio::read_json::<Results>(p, "results.json"), 6);
}

#[test]
fn checkpoint_keeps_optimizer_state() {
    let data = small_data();
    let mut network = mlp(3);
    let vars = network.make_trainable().unwrap();
    let mut sgd = Sgd::new(0.05, 0.9, 0.0).unwrap();
    let shape = network.input_shape.clone();
    {
        let forward = |x: &Tensor, mode| network.forward_mode(x, mode);
        isonn::train::fit(&forward, &shape, &vars, &mut sgd, &data, &config(1, 3), &Progress::hidden(), &mut || Ok(()))
            .unwrap();
    }
    let state = sgd.state();
    assert_eq!(state.buffers.len(), vars.len());
    let tmp = tempfile::tempdir().unwrap();
    let path = checkpoint::path_in(tmp.path());
    let position = checkpoint::Position {
        settings: serde_json::json!(null),
        batch_size: 50,
        seed: 3,
        train_len: data.train.len(),
        epochs_done: 0,
        batches_done: 4,
        partial: checkpoint::PartialEpoch {
            loss_sum: 0.1 + 0.2,
            correct: 7,
            seconds: 1.5,
        },
        metrics: Vec::new(),
        zeroed: 11,
    };
    checkpoint::save(&path, &vars, &state, &position).unwrap();
    let loaded = checkpoint::load(&path).unwrap();
    assert_eq!(loaded.position, position, "the position did not round-trip exactly");
    for (i, (saved, var)) in loaded.parameters.iter().zip(&vars).enumerate() {
        let a = saved.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b, "parameter {i}");
    }
    let mut restored = Sgd::new(0.05, 0.9, 0.0).unwrap();
    restored.set_state(&vars, loaded.optimizer).unwrap();
    for (i, (a, b)) in restored.state().buffers.iter().zip(&state.buffers).enumerate() {
        let flat = |t: &Option<Tensor>| t.as_ref().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(a), flat(b), "momentum buffer {i}");
    }
    let wrong = OptimizerState {
        buffers: vec![Some(Tensor::zeros(3, DType::F32, &candle_core::Device::Cpu).unwrap()); vars.len()],
        zeroed: 0,
    };
    let error = restored.set_state(&vars, wrong).unwrap_err().to_string();
    assert!(error.contains("belongs to another network"), "{error}");
}

#[test]
fn oversized_model_json_is_rejected_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    store::save(&dir, &Model::Regular(mlp(0)), &serde_json::json!({})).unwrap();
    // A sparse file: its length exceeds the cap without using the disk.
    let file = std::fs::OpenOptions::new().write(true).open(dir.join(store::MODEL_JSON)).unwrap();
    file.set_len(store::MAX_MODEL_JSON_BYTES + 1).unwrap();
    let error = store::load(&dir).unwrap_err().to_string();
    assert!(error.contains("more than the maximum of 67108864 bytes"), "{error}");
}

#[test]
fn huge_layer_output_is_rejected() {
    let mut network = mlp(0);
    network.layers.insert(
        0,
        isonn::model::Layer::Conv2d(isonn::model::Conv2d {
            weight: Tensor::zeros((1, 1, 1, 1), DType::F32, &candle_core::Device::Cpu).unwrap(),
            bias: Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap(),
            stride: 1,
            padding: 3000,
            dilation: 1,
            groups: 1,
            pad_value: Vec::new(),
        }),
    );
    let error = network.output_shape().unwrap_err().to_string();
    assert!(error.contains("more than 16777216 values per sample"), "{error}");
}

#[test]
fn foreign_files_are_rejected_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    store::save(&dir, &Model::Regular(mlp(0)), &serde_json::json!({})).unwrap();

    // A model's tensors in place of a checkpoint: no checkpoint metadata.
    let checkpoint_path = checkpoint::path_in(&dir);
    std::fs::copy(dir.join(store::MODEL_TENSORS), &checkpoint_path).unwrap();
    let error = checkpoint::load(&checkpoint_path).unwrap_err().to_string();
    assert!(error.contains("no \"isonn_checkpoint\" metadata"), "{error}");

    // Tensors of a wider network under this model.json.
    let other = tmp.path().join("other");
    let wide = Network::build(Arch::Mlp, &[1, 28, 28], &[9], 10, Activation::PhotonicSigmoid, Init::Xavier, 0).unwrap();
    store::save(&other, &Model::Regular(wide), &serde_json::json!({})).unwrap();
    std::fs::copy(other.join(store::MODEL_TENSORS), dir.join(store::MODEL_TENSORS)).unwrap();
    let error = store::load(&dir).unwrap_err().to_string();
    assert!(error.contains("has shape [9, 784], model.json implies [8, 784]"), "{error}");
}
