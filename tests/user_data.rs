//! `--inputs FILE.npy` and `--labels FILE.npy` in place of `--dataset` in
//! `eval`, `verify`, `transform` and `bound`: the same figures as the data
//! set path on the same images, and usage errors on bad files.

mod common;

use std::path::{Path, PathBuf};

use common::{isonn, train_small};
use isonn::data::{self, DatasetName, Images};
use isonn::interop::npy::{encode_npy, encode_npy_f32};
use predicates::prelude::*;

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn subset() -> data::Dataset {
    data::load(DatasetName::FashionMnistSubset, None).unwrap()
}

/// Writes the pixels of `images` as float32 `[n, c, h, w]` to `path`.
fn write_inputs(path: &Path, images: &Images) {
    let [c, h, w] = images.sample_shape();
    std::fs::write(
        path,
        encode_npy_f32(&[images.len(), c, h, w], &images.pixels),
    )
    .unwrap();
}

/// Writes `labels` to `path` as NumPy integers of type `descr` (`<i8`,
/// `>i4`, `|u1`, ...).
fn write_labels(path: &Path, descr: &str, labels: &[i64]) {
    let size: usize = descr[2..].parse().unwrap();
    let mut bytes = Vec::new();
    for &label in labels {
        let mut value = label.to_le_bytes()[..size].to_vec();
        if descr.starts_with('>') {
            value.reverse();
        }
        bytes.extend(value);
    }
    std::fs::write(path, encode_npy(descr, &[labels.len()], &bytes)).unwrap();
}

fn labels_of(images: &Images) -> Vec<i64> {
    images.labels.iter().map(|&l| i64::from(l)).collect()
}

/// Returns the accuracy that `isonn eval` prints with `args`.
fn eval_accuracy(model: &Path, args: &[&std::ffi::OsStr]) -> String {
    let output = isonn().arg("eval").arg(model).args(args).output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "eval failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .split("accuracy ")
        .nth(1)
        .expect("an accuracy line")
        .trim()
        .to_string()
}

/// Writes the subset's test images and labels to `dir`, returning the paths.
fn write_test_split(dir: &Path) -> (PathBuf, PathBuf) {
    let test = subset().test;
    let (inputs, labels) = (dir.join("inputs.npy"), dir.join("labels.npy"));
    write_inputs(&inputs, &test);
    write_labels(&labels, "<i8", &labels_of(&test));
    (inputs, labels)
}

#[test]
fn eval_npy_matches_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("regular");
    train_small(&model, "photonic-sigmoid");
    let (inputs, labels) = write_test_split(tmp.path());

    let expected = eval_accuracy(
        &model,
        &["--dataset".as_ref(), "fashion-mnist-subset".as_ref()],
    );
    let from_npy = eval_accuracy(
        &model,
        &[
            "--inputs".as_ref(),
            inputs.as_os_str(),
            "--labels".as_ref(),
            labels.as_os_str(),
        ],
    );
    assert_eq!(from_npy, expected);

    // A non-negative model reads the same files.
    let nonneg = tmp.path().join("nonneg");
    isonn()
        .arg("transform")
        .arg(&model)
        .arg("--out")
        .arg(&nonneg)
        .assert()
        .success();
    let nonneg_expected = eval_accuracy(
        &nonneg,
        &["--dataset".as_ref(), "fashion-mnist-subset".as_ref()],
    );
    let nonneg_from_npy = eval_accuracy(
        &nonneg,
        &[
            "--inputs".as_ref(),
            inputs.as_os_str(),
            "--labels".as_ref(),
            labels.as_os_str(),
        ],
    );
    assert_eq!(nonneg_from_npy, nonneg_expected);

    // Every integer type and byte order gives the same labels.
    let test = subset().test;
    for descr in [">i8", "<i4", ">i4", "<u2", "|u1", "|i1"] {
        let path = tmp.path().join(format!("labels{}.npy", &descr[1..]));
        write_labels(&path, descr, &labels_of(&test));
        let accuracy = eval_accuracy(
            &model,
            &[
                "--inputs".as_ref(),
                inputs.as_os_str(),
                "--labels".as_ref(),
                path.as_os_str(),
            ],
        );
        assert_eq!(accuracy, expected, "labels of type {descr}");
    }
}

#[test]
fn verify_and_transform_on_inputs_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    let nonneg = tmp.path().join("nonneg");
    train_small(&regular, "photonic-sinusoidal");
    let (inputs, _) = write_test_split(tmp.path());

    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .arg("--inputs")
        .arg(&inputs)
        .assert()
        .success()
        .stdout(predicate::str::contains("verification passed"));
    let report = read_json(&nonneg.join("equivalence.json"));
    assert_eq!(report["argmax_agreement"].as_f64(), Some(1.0));
    assert_eq!(report["samples"].as_u64(), Some(2000));
    assert_eq!(
        report["data"]["dataset"].as_str(),
        Some(inputs.to_str().unwrap())
    );
    let provenance = read_json(&nonneg.join("model.json"))["provenance"].clone();
    assert_eq!(
        provenance["data"]["dataset"].as_str(),
        Some(inputs.to_str().unwrap())
    );

    let path = tmp.path().join("equivalence.json");
    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--report")
        .arg(&path)
        .assert()
        .success()
        .stdout(predicate::str::contains("verification passed"));
    let report = read_json(&path);
    assert_eq!(report["argmax_agreement"].as_f64(), Some(1.0));
    // The labels are the regular model's predictions.
    assert_eq!(report["accuracy_original"].as_f64(), Some(1.0));
    assert_eq!(report["accuracy_isomorphic"].as_f64(), Some(1.0));
    assert_eq!(report["data"]["files"].as_array().unwrap().len(), 1);

    // With --labels, the accuracies are those on the data set.
    let (_, labels) = write_test_split(tmp.path());
    let with_labels = tmp.path().join("with-labels.json");
    let from_dataset = tmp.path().join("from-dataset.json");
    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--labels")
        .arg(&labels)
        .arg("--report")
        .arg(&with_labels)
        .assert()
        .success();
    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .args(["--dataset", "fashion-mnist-subset", "--report"])
        .arg(&from_dataset)
        .assert()
        .success();
    let (a, b) = (read_json(&with_labels), read_json(&from_dataset));
    assert_eq!(a["accuracy_original"], b["accuracy_original"]);
    assert_eq!(a["accuracy_isomorphic"], b["accuracy_isomorphic"]);
    assert_eq!(a["data"]["files"].as_array().unwrap().len(), 2);
    assert_eq!(b["data"]["dataset"].as_str(), Some("fashion-mnist-subset"));
}

#[test]
fn bound_npy_matches_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let regular = tmp.path().join("regular");
    train_small(&regular, "relu");
    let dataset = subset();
    let calibration = tmp.path().join("calibration.npy");
    let labels = tmp.path().join("calibration-labels.npy");
    write_inputs(&calibration, &dataset.train.take(1000));
    write_labels(&labels, "<i8", &labels_of(&dataset.train.take(1000)));

    let mode = [
        "--calibrate",
        "max",
        "--per",
        "channel",
        "--calibration-samples",
        "1000",
    ];
    let from_dataset = tmp.path().join("from-dataset");
    isonn()
        .arg("bound")
        .arg(&regular)
        .arg("--out")
        .arg(&from_dataset)
        .args(["--dataset", "fashion-mnist-subset"])
        .args(mode)
        .assert()
        .success();
    let from_npy = tmp.path().join("from-npy");
    isonn()
        .arg("bound")
        .arg(&regular)
        .arg("--out")
        .arg(&from_npy)
        .arg("--inputs")
        .arg(&calibration)
        .arg("--labels")
        .arg(&labels)
        .args(mode)
        .assert()
        .success();

    let (a, b) = (
        read_json(&from_dataset.join("bound.json")),
        read_json(&from_npy.join("bound.json")),
    );
    let layers = a["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (i, layer) in layers.iter().enumerate() {
        assert_eq!(
            layer["bounds"], b["layers"][i]["bounds"],
            "bounds of layer {i}"
        );
    }
    assert_eq!(b["calibration_samples"].as_u64(), Some(1000));
    let provenance = read_json(&from_npy.join("model.json"))["provenance"].clone();
    assert_eq!(
        provenance["data"]["dataset"].as_str(),
        Some(calibration.to_str().unwrap())
    );
    assert_eq!(provenance["data"]["files"].as_array().unwrap().len(), 2);
}

/// One bad invocation: its file setup, arguments and a phrase of the error.
struct Case {
    name: &'static str,
    args: Vec<String>,
    message: &'static str,
}

#[test]
fn bad_npy_files_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let regular = dir.join("regular");
    train_small(&regular, "photonic-sigmoid");
    let test = subset().test.take(20);
    let inputs = dir.join("inputs.npy");
    write_inputs(&inputs, &test);
    let labels = labels_of(&test);

    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    std::fs::write(
        dir.join("flat.npy"),
        encode_npy_f32(&[20, 784], &test.pixels),
    )
    .unwrap();
    let mut truncated = std::fs::read(&inputs).unwrap();
    truncated.truncate(truncated.len() - 3);
    std::fs::write(dir.join("truncated.npy"), truncated).unwrap();
    let mut negative = labels.clone();
    negative[4] = -1;
    write_labels(&dir.join("negative.npy"), "<i8", &negative);
    let mut large = labels.clone();
    large[7] = 10;
    write_labels(&dir.join("large.npy"), "<i4", &large);
    write_labels(&dir.join("short.npy"), "<i8", &labels[..19]);
    let two_d: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    std::fs::write(dir.join("two-d.npy"), encode_npy("<i8", &[20, 1], &two_d)).unwrap();
    std::fs::write(
        dir.join("float-labels.npy"),
        encode_npy_f32(&[20], &[0.0; 20]),
    )
    .unwrap();
    write_labels(&dir.join("labels.npy"), "<i8", &labels);

    let with = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["--inputs".to_string(), inputs.to_str().unwrap().to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let cases = [
        Case {
            name: "inputs of another sample shape",
            args: vec!["--inputs".into(), path("flat.npy"), "--labels".into(), path("labels.npy")],
            message: "the samples have shape [784] (array [20, 784]) but the model reads samples of shape [1, 28, 28]",
        },
        Case {
            name: "truncated inputs",
            args: vec!["--inputs".into(), path("truncated.npy"), "--labels".into(), path("labels.npy")],
            message: "truncated.npy: the shape [20, 1, 28, 28] needs 62720 bytes",
        },
        Case {
            name: "negative label",
            args: with(&["--labels", &path("negative.npy")]),
            message: "negative.npy: label 4 is -1",
        },
        Case {
            name: "label beyond the classes",
            args: with(&["--labels", &path("large.npy")]),
            message: "large.npy: label 7 is 10, but the model has 10 classes",
        },
        Case {
            name: "fewer labels than inputs",
            args: with(&["--labels", &path("short.npy")]),
            message: "short.npy: 19 labels for 20 inputs",
        },
        Case {
            name: "labels of two dimensions",
            args: with(&["--labels", &path("two-d.npy")]),
            message: "two-d.npy: the labels have shape [20, 1]; save a 1-D array",
        },
        Case {
            name: "float labels",
            args: with(&["--labels", &path("float-labels.npy")]),
            message: "the dtype \"<f4\" is not an integer type",
        },
        Case {
            name: "inputs and a data set",
            args: with(&["--labels", &path("labels.npy"), "--dataset", "fashion-mnist-subset"]),
            message: "cannot be used with",
        },
        Case {
            name: "labels without inputs",
            args: vec!["--labels".into(), path("labels.npy")],
            message: "--inputs <FILE.npy>",
        },
        Case {
            name: "missing inputs file",
            args: vec!["--inputs".into(), path("absent.npy"), "--labels".into(), path("labels.npy")],
            message: "absent.npy",
        },
    ];
    for case in &cases {
        isonn()
            .arg("eval")
            .arg(&regular)
            .args(&case.args)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(case.message).name(case.name));
        let out = dir.join("bounded");
        isonn()
            .arg("transform")
            .arg(&regular)
            .arg("--out")
            .arg(&out)
            .args(&case.args)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(case.message).name(case.name));
        assert!(
            !out.exists(),
            "transform wrote {} on {}",
            out.display(),
            case.name
        );
    }

    isonn()
        .arg("eval")
        .arg(&regular)
        .arg("--inputs")
        .arg(&inputs)
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "without --labels: accuracy needs the class of each input",
        ));
}

#[test]
fn non_finite_inputs_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let regular = dir.join("regular");
    train_small(&regular, "photonic-sigmoid");
    let mut test = subset().test.take(5);
    test.pixels[3 * 784 + 100] = f32::NAN;
    let inputs = dir.join("nan.npy");
    write_inputs(&inputs, &test);
    let labels = dir.join("labels.npy");
    write_labels(&labels, "<i8", &labels_of(&test));
    let logits = dir.join("logits.npy");
    let nonneg = dir.join("nonneg");

    let message = "nan.npy: sample 3 has the non-finite value NaN at element 100";
    let runs: [(&str, Vec<&std::ffi::OsStr>); 3] = [
        ("eval", vec!["--labels".as_ref(), labels.as_os_str()]),
        ("transform", vec!["--out".as_ref(), nonneg.as_os_str()]),
        ("predict", vec!["--out".as_ref(), logits.as_os_str()]),
    ];
    for (command, extra) in runs {
        isonn()
            .arg(command)
            .arg(&regular)
            .arg("--inputs")
            .arg(&inputs)
            .args(extra)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message).name(command))
            .stderr(predicate::str::contains("remove or replace the non-finite values").name(command));
    }
    assert!(!nonneg.exists(), "transform wrote {}", nonneg.display());
    assert!(!logits.exists(), "predict wrote {}", logits.display());
}

#[test]
fn output_paths_are_checked_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let regular = dir.join("regular");
    train_small(&regular, "photonic-sigmoid");
    let inputs = dir.join("inputs.npy");
    write_inputs(&inputs, &subset().test.take(5));
    let original = std::fs::read(&inputs).unwrap();

    // The same file by another spelling of its path.
    let same = dir.join(".").join("inputs.npy");
    let missing_parent = dir.join("absent").join("logits.npy");
    let cases: [(&str, &Path, &str); 3] = [
        ("--out is --inputs", &same, "is the --inputs file"),
        ("--out in a missing directory", &missing_parent, "does not exist; create it first"),
        ("--out is a directory", dir, "is a directory; give the path of the file to write"),
    ];
    for (name, out, message) in cases {
        isonn()
            .arg("predict")
            .arg(&regular)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(out)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(message).name(name))
            .stderr(predicate::str::contains("os error").not().name(name));
    }
    assert_eq!(std::fs::read(&inputs).unwrap(), original, "predict changed its inputs");

    let nonneg = dir.join("nonneg");
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .assert()
        .success();
    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--report")
        .arg(&missing_parent)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--report"))
        .stderr(predicate::str::contains("does not exist; create it first"));
}
