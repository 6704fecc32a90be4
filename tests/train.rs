//! Training on real data: regular SGD, non-negative training with both
//! optimizers, and the invariants they keep, on a slice of the embedded
//! Fashion-MNIST subset.

use candle_core::{DType, Tensor};
use isonn::activation::Activation;
use isonn::data::{self, Dataset};
use isonn::model::{Arch, Init, Network};
use isonn::nonneg::{inverse, transform, NonnegNetwork, TransformOptions};
use isonn::optim::Momentum;
use isonn::progress::Progress;
use isonn::scenario::{self, NonnegOptimizer};
use isonn::train::TrainConfig;
use isonn::verify::{self, Precision};

fn small_data() -> Dataset {
    let mut data = data::load_embedded().unwrap();
    data.train = data.train.take(3000);
    data.test = data.test.take(500);
    data
}

fn config(epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 128,
        seed,
        eval_every_epoch: true,
        shuffle: true,
        augment: false,
    }
}

fn mlp(activation: Activation, seed: u64) -> Network {
    Network::build(Arch::Mlp, &[1, 28, 28], &[64, 32], 10, activation, Init::Xavier, seed).unwrap()
}

fn support(t: &Tensor) -> Vec<bool> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap().iter().map(|v| *v > 0.0).collect()
}

fn supports(n: &NonnegNetwork) -> Vec<Vec<bool>> {
    n.affine_layers().flat_map(|(_, a)| [support(&a.positive), support(&a.negative)]).collect()
}

#[test]
fn regular_training_learns_and_is_deterministic() {
    let data = small_data();
    let mut a = mlp(Activation::PhotonicSinusoidal, 4);
    let mut b = mlp(Activation::PhotonicSinusoidal, 4);
    let ma = scenario::train_regular(&mut a, &data, &config(2, 4), 0.16, &Progress::hidden()).unwrap();
    let mb = scenario::train_regular(&mut b, &data, &config(2, 4), 0.16, &Progress::hidden()).unwrap();
    assert!(ma.test_accuracy > 0.6, "two epochs on 3000 images: {}", ma.test_accuracy);
    assert_eq!(ma.epochs.len(), 2);
    for ((name, x), (_, y)) in a.parameters().iter().zip(b.parameters()) {
        let same = x.flatten_all().unwrap().to_vec1::<f32>().unwrap() == y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(same, "{name} differs between two runs with the same seed");
    }
    assert_eq!(ma.test_accuracy, mb.test_accuracy);
}

/// Sign-preserving training keeps every parameter >= 0, never grows the
/// support of P or N, and the inverse map reproduces the trained network.
#[test]
fn sign_preserving_training_stays_isomorphic() {
    let data = small_data();
    let mut regular = mlp(Activation::PhotonicSigmoid, 1);
    scenario::train_regular(&mut regular, &data, &config(1, 1), 0.01, &Progress::hidden()).unwrap();
    let mut nonneg = transform(&regular, &TransformOptions::default()).unwrap();
    let before = supports(&nonneg);
    let rule = NonnegOptimizer::SignPreserving {
        lr_in: 0.28,
        lr_out: 0.3,
        momentum: Momentum::Tanh(0.9),
    };
    let report = scenario::train_nonneg(&mut nonneg, &data, &config(2, 1), &rule, &Progress::hidden()).unwrap();
    assert_eq!(report.negative_after_steps, 0);
    assert_eq!(nonneg.count_negative().unwrap(), (0, 0));
    let after = supports(&nonneg);
    for (b, a) in before.iter().zip(&after) {
        for (was, is) in b.iter().zip(a) {
            assert!(!is || *was, "a zero entry of P or N became non-zero");
        }
    }
    let back = inverse(&nonneg).unwrap();
    let check = verify::verify(&back, &nonneg, &data.test, 250, Precision::Model, &Progress::hidden()).unwrap();
    assert_eq!(check.argmax_agreement, 1.0);
    assert!(check.max_rel_diff < 1e-4, "inverse map differs by {:e}", check.max_rel_diff);
    assert!(report.metrics.test_accuracy > 0.5, "accuracy {}", report.metrics.test_accuracy);
}

/// Projected SGD keeps parameters >= 0 but may let P and N overlap; the
/// inverse map is exact all the same.
/// Trains three epochs, because after two the accuracy (0.49 to 0.59)
/// depends on the last bits of the activation's rounding. After three it is
/// 0.60 to 0.63.
#[test]
fn projected_training_keeps_non_negative() {
    let data = small_data();
    let regular = mlp(Activation::PhotonicSinusoidal, 2);
    let mut nonneg = transform(&regular, &TransformOptions::default()).unwrap();
    let rule = NonnegOptimizer::Projected { lr: 0.05, momentum: 0.5 };
    let report = scenario::train_nonneg(&mut nonneg, &data, &config(3, 2), &rule, &Progress::hidden()).unwrap();
    assert_eq!(report.negative_after_steps, 0);
    assert_eq!(nonneg.count_negative().unwrap(), (0, 0));
    let back = inverse(&nonneg).unwrap();
    let check = verify::verify(&back, &nonneg, &data.test, 250, Precision::F64, &Progress::hidden()).unwrap();
    assert_eq!(check.argmax_agreement, 1.0);
    assert!(check.max_rel_diff < 1e-4, "{:e}", check.max_rel_diff);
    assert!(report.metrics.test_accuracy > 0.5, "from scratch, 3 epochs: {}", report.metrics.test_accuracy);
}

/// Clipping a regular network to non-negative weights destroys it; that is
/// the baseline the method improves on.
#[test]
fn clipped_network_collapses() {
    let data = small_data();
    let mut regular = mlp(Activation::PhotonicSigmoid, 3);
    scenario::train_regular(&mut regular, &data, &config(2, 3), 0.01, &Progress::hidden()).unwrap();
    let clipped = scenario::clip_negative(&regular).unwrap();
    for (name, t) in clipped.parameters() {
        assert_eq!(isonn::nonneg::count_negative(&t).unwrap(), 0, "{name}");
    }
    let forward = |x: &Tensor| clipped.forward(x);
    let accuracy = verify::accuracy(&forward, &[1, 28, 28], &data.test, 250, DType::F32, &Progress::hidden()).unwrap();
    assert!(accuracy < 0.3, "clipped accuracy {accuracy}");
}

#[test]
fn exponential_init_is_non_negative_with_xavier_mean() {
    let mut network = mlp(Activation::PhotonicSigmoid, 0);
    scenario::exponential_init(&mut network, 9).unwrap();
    let (_, w) = &network.parameters()[0];
    let values: Vec<f64> = w.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| *v >= 0.0));
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let want = (2.0 / (784.0 + 64.0f64)).sqrt();
    assert!((mean / want - 1.0).abs() < 0.02, "mean {mean}, expected {want}");
}

#[test]
fn scenario_names_parse() {
    use isonn::scenario::Scenario;
    assert_eq!(Scenario::parse_list("all").unwrap().len(), 8);
    assert_eq!(Scenario::parse_list("post-training").unwrap().len(), 2);
    assert_eq!(Scenario::parse_list("transformation,from-scratch-sign-preserving").unwrap().len(), 2);
    let message = Scenario::parse_list("sideways").unwrap_err().to_string();
    assert!(message.contains("unknown scenario"), "{message}");
}

#[test]
fn reused_regular_training_gives_the_same_cell() {
    // Post-training with a regular training taken from the cache must give
    // the figures of a run that trains the regular network itself.
    let data = {
        let mut d = small_data();
        d.train = d.train.take(1000);
        d.test = d.test.take(200);
        d
    };
    let scenario = scenario::Scenario::PostTraining(scenario::NonnegOptimizerKind::SignPreserving);
    let settings = scenario::settings(Arch::Mlp, &Activation::PhotonicSigmoid, scenario, 2, 1, false);
    let run = |pretrained: &mut scenario::Pretrained| {
        scenario::run_scenario(
            Arch::Mlp,
            Activation::PhotonicSigmoid,
            scenario,
            &settings,
            Init::Xavier,
            3,
            &data,
            &TransformOptions::default(),
            pretrained,
            &Progress::hidden(),
        )
        .unwrap()
        .0
    };
    let fresh = run(&mut scenario::Pretrained::default());
    let mut cache = scenario::Pretrained::default();
    let first = run(&mut cache);
    let reused = run(&mut cache);
    assert_eq!(cache.reused(), 1);
    // Everything but the wall times.
    let figures = |r: &scenario::ScenarioResult| -> Vec<(usize, f64, f64, Option<f64>)> {
        r.curve.iter().map(|e| (e.epoch, e.loss, e.train_accuracy, e.test_accuracy)).collect()
    };
    assert_eq!(figures(&fresh), figures(&first));
    assert_eq!(figures(&first), figures(&reused), "a cached regular training changed the cell");
    assert_eq!(fresh.test_accuracy, reused.test_accuracy);
}

#[test]
fn file_order_training_ignores_the_shuffling_seed() {
    // Without shuffling the seed of the order has nothing to act on, so two
    // seeds train the same network alike; with shuffling they differ.
    let mut data = small_data();
    data.train = data.train.take(1000);
    data.test = data.test.take(200);
    let weights = |order_seed: u64, shuffle: bool| -> Vec<f32> {
        let mut network = mlp(Activation::PhotonicSigmoid, 1);
        let config = TrainConfig { shuffle, ..config(1, order_seed) };
        scenario::train_regular(&mut network, &data, &config, 0.05, &Progress::hidden()).unwrap();
        network.parameters().iter().flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    assert_eq!(weights(5, false), weights(6, false));
    assert_ne!(weights(5, true), weights(6, true));
}
