//! `isonn inspect` and the per-layer report of `isonn verify`, end to end
//! on the embedded Fashion-MNIST subset.

mod common;

use std::path::Path;

use common::isonn;
use isonn::inspect::{InspectReport, NetworkReport};
use isonn::nonneg::{ShiftPolicy, SHIFT_MARGIN};
use predicates::prelude::*;

/// Test images the observed figures cover.
const SAMPLES: usize = 300;

/// Weights of the 784-32-16-10 MLP that `common::train_small` trains.
const MLP_WEIGHTS: usize = 784 * 32 + 32 * 16 + 16 * 10;

/// Trains the photonic-sigmoid MLP of [`MLP_WEIGHTS`] into `dir`.
fn train_small(dir: &Path) {
    common::train_small(dir, "photonic-sigmoid");
}

/// Runs `isonn inspect` on `model` with the subset and returns its JSON report.
fn inspect_json(model: &Path, json: &Path) -> InspectReport {
    isonn()
        .arg("inspect")
        .arg(model)
        .args(["--dataset", "fashion-mnist-subset", "--samples", &SAMPLES.to_string(), "--json"])
        .arg(json)
        .assert()
        .success()
        .stdout(predicate::str::contains("| layers.1 |"))
        .stdout(predicate::str::contains("| input |"));
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

/// Checks the routing counts and observed figures of every layer.
fn check_network(report: &NetworkReport, policy: &str) {
    assert_eq!(report.samples, SAMPLES, "{policy}: samples");
    let mut weights = 0;
    for layer in &report.layers {
        let w = layer.weights;
        let label = &layer.label;
        assert_eq!(w.both, 0, "{policy} {label}: P and N overlap after the transformation");
        assert_eq!(w.signal + w.complement + w.zero, w.total, "{policy} {label}: counts {w:?}");
        assert_eq!(w.total, layer.shape.iter().product::<usize>(), "{policy} {label}: total");
        weights += w.total;
        let o = layer.observed.as_ref().expect("observed with --dataset");
        assert!(o.min >= 0.0, "{policy} {label}: physical signal {} < 0", o.min);
        assert!(o.max <= layer.full_scale * (1.0 + 1e-5), "{policy} {label}: {} above full scale", o.max);
        let swing = o.swing_ratio.expect("some unit is lit");
        assert!(swing > 0.0, "{policy} {label}: swing ratio {swing} not above 0");
        assert!(swing <= 1.0, "{policy} {label}: swing ratio {swing} above 1");
    }
    assert_eq!(weights, MLP_WEIGHTS, "{policy}: weight count");
    let modulators = report.modulators.observed.as_ref().expect("observed modulators");
    assert_eq!((modulators.min, modulators.max), (0.0, 1.0), "{policy}: pixels span [0, 1]");
}

#[test]
fn inspect_regular_and_transformed() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    let nonneg = tmp.path().join("nonneg");
    train_small(&regular);
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .args(["--shift", "published"])
        .assert()
        .success();

    let report = inspect_json(&regular, &tmp.path().join("regular.json"));
    assert_eq!(report.kind, "regular");
    assert_eq!(report.dataset.as_deref(), Some("fashion-mnist-subset"));
    let policies: Vec<_> = report.policies.iter().map(|p| p.policy).collect();
    assert_eq!(policies, vec![Some(ShiftPolicy::Minimal), Some(ShiftPolicy::Published)]);
    let (minimal, published) = (&report.policies[0].network, &report.policies[1].network);
    check_network(minimal, "minimal");
    check_network(published, "published");
    assert_eq!(minimal.layers.len(), 3);
    for (m, p) in minimal.layers.iter().zip(&published.layers) {
        assert_eq!(m.label, p.label);
        assert_eq!(m.weights, p.weights, "{}: routing does not depend on the policy", m.label);
        // Both shifts are exact, so the published max |c_i| is at least the
        // smallest exact shift, the minimal one less its margin of
        // SHIFT_MARGIN * max |c_i|.
        let smallest_exact = m.shift - SHIFT_MARGIN * p.shift;
        assert!(
            p.shift >= smallest_exact - 1e-9 * p.shift,
            "{}: published shift {} below the smallest exact shift {smallest_exact}",
            m.label,
            p.shift
        );
    }

    let own = inspect_json(&nonneg, &tmp.path().join("nonneg.json"));
    assert_eq!(own.kind, "nonneg");
    assert_eq!(own.policies.len(), 1);
    assert_eq!(own.policies[0].policy, Some(ShiftPolicy::Published));
    check_network(&own.policies[0].network, "stored");
    for (stored, memory) in own.policies[0].network.layers.iter().zip(&published.layers) {
        assert_eq!(stored.shift, memory.shift, "{}: stored shift", stored.label);
        assert_eq!(stored.full_scale, memory.full_scale, "{}: stored full scale", stored.label);
        let (a, b) = (stored.observed.as_ref().unwrap(), memory.observed.as_ref().unwrap());
        assert!((a.max - b.max).abs() <= 1e-6 * b.max, "{}: max {} vs {}", stored.label, a.max, b.max);
    }
}

#[test]
fn inspect_without_data_prints_structure() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    train_small(&regular);
    isonn()
        .arg("inspect")
        .arg(&regular)
        .assert()
        .success()
        .stdout(predicate::str::contains("no data"))
        .stdout(predicate::str::contains("| layers.1 | linear 32x784 |"))
        .stdout(predicate::str::contains("| layers.1 | published |"));
}

#[test]
fn inspect_rejects_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing-model");
    isonn()
        .arg("inspect")
        .arg(&missing)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(missing.display().to_string()))
        .stderr(predicate::str::contains("pass a model directory written by `isonn train`"));
    isonn()
        .arg("inspect")
        .arg(tmp.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no model.json"));
    isonn()
        .arg("inspect")
        .arg(tmp.path())
        .args(["--samples", "10"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--samples need --dataset"));
}

#[test]
fn verify_reports_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    let nonneg = tmp.path().join("nonneg");
    train_small(&regular);
    isonn().arg("transform").arg(&regular).arg("--out").arg(&nonneg).assert().success();
    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset"])
        .assert()
        .success()
        .stdout(predicate::str::contains("| layer | shift s |"))
        .stdout(predicate::str::contains("| layers.3 |"));
    let report: isonn::verify::EquivalenceReport =
        serde_json::from_slice(&std::fs::read(nonneg.join("equivalence.json")).unwrap()).unwrap();
    let inspection = report.inspection.expect("equivalence.json has the per-layer report");
    assert_eq!(inspection.samples, report.samples);
    assert_eq!(inspection.layers.len(), 3);
    for layer in &inspection.layers {
        let o = layer.observed.as_ref().expect("verify observes every layer");
        let extremes = report
            .layers
            .iter()
            .find(|s| s.layer.map(isonn::inspect::layer_label).as_ref() == Some(&layer.label) && s.name == "output")
            .expect("verify's own extremes of the layer output");
        assert_eq!(o.max, extremes.max, "{}: max agrees with the signal extremes", layer.label);
        assert_eq!(o.min, extremes.min, "{}: min agrees with the signal extremes", layer.label);
    }
}
