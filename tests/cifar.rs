//! CIFAR-10 support against files in the exact binary format, written to
//! temporary directories: the reader and its errors, the input ranges, the
//! training augmentation, the CIFAR-10 CNN and the command line.

use std::path::Path;

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use isonn::activation::Activation;
use isonn::data::{self, augment, cifar, Augmentation, DataSource, Dataset, DatasetName};
use isonn::model::{Arch, Init, Network};
use isonn::progress::Progress;
use isonn::scenario;
use isonn::train::TrainConfig;

/// Training records per batch file and test records of the synthetic sets.
const PER_FILE: usize = 40;
const TEST: usize = 50;

/// Returns the byte of image `image` (numbered across the training files,
/// then the test file after them) in `channel` at `row`, `col`.
fn byte(image: usize, channel: usize, row: usize, col: usize) -> u8 {
    ((image * 37 + channel * 85 + row * 7 + col * 3) % 256) as u8
}

fn label(image: usize) -> u8 {
    (image % 10) as u8
}

/// Encodes images `first..first + count` as CIFAR-10 records.
fn records(first: usize, count: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(count * cifar::RECORD_BYTES);
    for image in first..first + count {
        bytes.push(label(image));
        for channel in 0..3 {
            for row in 0..32 {
                bytes.extend((0..32).map(|col| byte(image, channel, row, col)));
            }
        }
    }
    bytes
}

/// Writes the five training files of `PER_FILE` records and the test file
/// of `TEST` records to `dir`.
fn write_cifar(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (index, file) in cifar::TRAIN_FILES.iter().enumerate() {
        std::fs::write(dir.join(file), records(index * PER_FILE, PER_FILE)).unwrap();
    }
    std::fs::write(dir.join(cifar::TEST_FILE), records(5 * PER_FILE, TEST)).unwrap();
}

fn load(dir: &Path, name: DatasetName) -> isonn::Result<Dataset> {
    data::load_dir(dir, name, DataSource::Flag(dir.to_path_buf()))
}

fn load_error(dir: &Path) -> String {
    load(dir, DatasetName::Cifar10).expect_err("loading must fail").to_string()
}

fn normalised(image: usize, channel: usize, row: usize, col: usize) -> f64 {
    let x = f64::from(byte(image, channel, row, col)) / 255.0;
    (x - cifar::MEAN[channel]) / cifar::STD[channel]
}

/// Returns value `[c, h, w]` of sample `sample` of a batch tensor.
fn at(x: &Tensor, sample: usize, c: usize, h: usize, w: usize) -> f32 {
    x.get(sample).unwrap().get(c).unwrap().get(h).unwrap().get(w).unwrap().to_scalar().unwrap()
}

#[test]
fn colour_planes_map_to_chw() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    let dataset = load(dir.path(), DatasetName::Cifar10).unwrap();
    assert_eq!(dataset.name, DatasetName::Cifar10);
    assert_eq!(dataset.classes, 10);
    assert_eq!(dataset.train.len(), 5 * PER_FILE);
    assert_eq!(dataset.test.len(), TEST);
    assert_eq!(dataset.train.sample_shape(), [3, 32, 32]);
    assert_eq!(dataset.train.pixels.len(), 5 * PER_FILE * 3072);

    let expected_labels: Vec<u8> = (0..5 * PER_FILE).map(label).collect();
    assert_eq!(dataset.train.labels, expected_labels);
    let test_labels: Vec<u8> = (5 * PER_FILE..5 * PER_FILE + TEST).map(label).collect();
    assert_eq!(dataset.test.labels, test_labels);

    // Images from the first, a middle and the last training file.
    let indices = [0, 1, 2 * PER_FILE + 3, 5 * PER_FILE - 1];
    let (x, y) = dataset.train.batch(&indices, &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[4, 3, 32, 32]);
    assert_eq!(y.to_vec1::<u32>().unwrap(), indices.map(|i| u32::from(label(i))));
    for (sample, &image) in indices.iter().enumerate() {
        for (c, h, w) in [(0, 0, 0), (0, 0, 31), (0, 31, 0), (1, 5, 17), (2, 31, 31), (2, 12, 3)] {
            let value = f64::from(at(&x, sample, c, h, w));
            let expected = normalised(image, c, h, w);
            assert!((value - expected).abs() < 1e-6, "image {image} [{c}, {h}, {w}]: {value} vs {expected}");
        }
    }
    let value = f64::from(at(&dataset.test.batch(&[7], &Device::Cpu).unwrap().0, 0, 1, 30, 2));
    assert!((value - normalised(5 * PER_FILE + 7, 1, 30, 2)).abs() < 1e-6);
}

#[test]
fn every_value_within_channel_range() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    let dataset = load(dir.path(), DatasetName::Cifar10).unwrap();
    let ranges = dataset.input_ranges();
    assert_eq!(ranges.len(), 3);
    for (channel, range) in ranges.iter().enumerate() {
        let lo = (0.0 - cifar::MEAN[channel]) / cifar::STD[channel];
        let hi = (1.0 - cifar::MEAN[channel]) / cifar::STD[channel];
        // The bounds are rounded to f32, as the pixels are.
        assert!((range.lo - lo).abs() < 1e-6, "channel {channel} lo {}", range.lo);
        assert!((range.hi - hi).abs() < 1e-6, "channel {channel} hi {}", range.hi);
        assert!(range.lo < 0.0, "normalised inputs go negative");
    }
    let mut black = 0;
    for image in dataset.train.pixels.chunks(3072) {
        for (plane, range) in image.chunks(1024).zip(&ranges) {
            for &value in plane {
                let value = f64::from(value);
                assert!(value >= range.lo, "{value} below {range:?}");
                assert!(value <= range.hi, "{value} above {range:?}");
                black += usize::from(value == range.lo);
            }
        }
    }
    assert!(black > 0, "no pixel byte 0 met its channel's lower bound exactly");
}

#[test]
fn gray_is_unnormalised_luma() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    let dataset = load(dir.path(), DatasetName::Cifar10Gray).unwrap();
    assert_eq!(dataset.train.sample_shape(), [1, 32, 32]);
    assert_eq!(dataset.train.pixels.len(), 5 * PER_FILE * 1024);
    assert_eq!(dataset.train.normalisation, None);
    let ranges = dataset.input_ranges();
    assert_eq!(ranges.len(), 1);
    assert_eq!((ranges[0].lo, ranges[0].hi), (0.0, 1.0));

    let (x, _) = dataset.train.batch(&[3, 150], &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[2, 1, 32, 32]);
    for (sample, image) in [(0, 3), (1, 150)] {
        for (h, w) in [(0, 0), (9, 21), (31, 31)] {
            let rgb = [0, 1, 2].map(|c| f64::from(byte(image, c, h, w)) / 255.0);
            let expected = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
            let value = f64::from(at(&x, sample, 0, h, w));
            assert!((value - expected).abs() < 1e-6, "image {image} [{h}, {w}]: {value} vs {expected}");
        }
    }
}

#[test]
fn subfolder_layout_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join(cifar::SUBFOLDER);
    write_cifar(&nested);
    let dataset = load(dir.path(), DatasetName::Cifar10).unwrap();
    assert_eq!(dataset.source, DataSource::Flag(dir.path().to_path_buf()));
    assert_eq!(dataset.train.len(), 5 * PER_FILE);
    assert!(dataset.files[0].path.contains(cifar::SUBFOLDER), "{}", dataset.files[0].path);
}

#[test]
fn digests_cover_six_files() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    let dataset = load(dir.path(), DatasetName::Cifar10).unwrap();
    let names: Vec<&str> = cifar::TRAIN_FILES.iter().copied().chain([cifar::TEST_FILE]).collect();
    assert_eq!(dataset.files.len(), 6);
    for (digest, name) in dataset.files.iter().zip(names) {
        let path = dir.path().join(name);
        assert_eq!(digest.path, path.display().to_string());
        assert_eq!(digest.sha256, data::sha256_hex(&std::fs::read(&path).unwrap()));
    }
}

#[test]
fn truncated_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    let path = dir.path().join("data_batch_3.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&path, bytes).unwrap();
    let error = load_error(dir.path());
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(error.contains("not a whole number of 3073-byte records"), "{error}");
    assert!(error.contains(&format!("{} whole records and 3063 bytes left over", PER_FILE - 1)), "{error}");
    assert!(error.contains("download it again"), "{error}");
}

#[test]
fn wrong_size_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    // A CIFAR-100 record has a second label byte.
    let path = dir.path().join(cifar::TEST_FILE);
    std::fs::write(&path, vec![0u8; 3 * 3074]).unwrap();
    let error = load_error(dir.path());
    assert!(error.contains("test_batch.bin: is 9222 bytes"), "{error}");

    std::fs::write(&path, b"").unwrap();
    let error = load_error(dir.path());
    assert!(error.contains("test_batch.bin: is empty"), "{error}");
}

#[test]
fn bad_label_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    let path = dir.path().join(cifar::TEST_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2 * cifar::RECORD_BYTES] = 10;
    std::fs::write(&path, bytes).unwrap();
    let error = load_error(dir.path());
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(error.contains("record 2 (byte offset 6146) has label 10"), "{error}");
    assert!(error.contains("labels are 0 to 9"), "{error}");
}

#[test]
fn missing_file_says_where_to_get_data() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    std::fs::remove_file(dir.path().join("data_batch_5.bin")).unwrap();
    let error = load_error(dir.path());
    assert!(error.contains(&format!("{} (from --data) is missing data_batch_5.bin;", dir.path().display())), "{error}");
    assert!(error.contains("https://www.cs.toronto.edu/~kriz/cifar.html"), "{error}");
    assert!(error.contains("CIFAR-10 binary version (suitable for C programs)"), "{error}");
    assert!(error.contains("cifar-10-batches-bin subfolder"), "{error}");
}

#[test]
fn missing_dir_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let error = load_error(&dir.path().join("absent"));
    assert!(error.contains("absent (from --data) does not exist"), "{error}");
    assert!(error.contains("data_batch_1.bin"), "{error}");
}

#[test]
fn names_parse_and_serialise() {
    for (name, text) in [(DatasetName::Cifar10, "cifar10"), (DatasetName::Cifar10Gray, "cifar10-gray")] {
        assert_eq!(text.parse::<DatasetName>().unwrap(), name);
        assert_eq!(name.to_string(), text);
        assert_eq!(serde_json::to_string(&name).unwrap(), format!("\"{text}\""));
        assert!(name.is_cifar());
    }
    assert!(!DatasetName::Mnist.is_cifar());
}

/// Loads the synthetic colour set from a fresh directory.
fn colour_dataset() -> Dataset {
    let dir = tempfile::tempdir().unwrap();
    write_cifar(dir.path());
    load(dir.path(), DatasetName::Cifar10).unwrap()
}

fn values(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn augmentation_offsets_stay_within_padding() {
    for batch in 0..20 {
        for a in augment::for_batch(9, 1, batch, 256) {
            assert!((-4..=4).contains(&a.shift_y), "{a:?}");
            assert!((-4..=4).contains(&a.shift_x), "{a:?}");
        }
    }
}

#[test]
fn augmented_batch_crops_and_mirrors() {
    let dataset = colour_dataset();
    let images = &dataset.train;
    let indices = [4, 77];
    let (plain, labels) = images.batch(&indices, &Device::Cpu).unwrap();

    let identity = [Augmentation::IDENTITY; 2];
    let (same, same_labels) = images.augmented_batch(&indices, &identity, &Device::Cpu).unwrap();
    assert_eq!(values(&same), values(&plain));
    assert_eq!(same_labels.to_vec1::<u32>().unwrap(), labels.to_vec1::<u32>().unwrap());

    let flip = [Augmentation { flip: true, ..Augmentation::IDENTITY }; 2];
    let (mirrored, _) = images.augmented_batch(&indices, &flip, &Device::Cpu).unwrap();
    for (c, h, w) in [(0, 0, 0), (1, 7, 30), (2, 31, 12)] {
        assert_eq!(at(&mirrored, 1, c, h, w), at(&plain, 1, c, h, 31 - w));
    }

    let shift = [Augmentation { shift_y: 4, shift_x: -3, flip: false }; 2];
    let (shifted, _) = images.augmented_batch(&indices, &shift, &Device::Cpu).unwrap();
    assert_eq!(at(&shifted, 0, 2, 10, 10), at(&plain, 0, 2, 14, 7));
    assert_eq!(at(&shifted, 0, 0, 27, 3), at(&plain, 0, 0, 31, 0));
}

#[test]
fn padding_equals_lower_bound() {
    let dataset = colour_dataset();
    let ranges = dataset.input_ranges();
    let shift = [Augmentation { shift_y: 4, shift_x: -4, flip: true }];
    let (x, _) = dataset.train.augmented_batch(&[11], &shift, &Device::Cpu).unwrap();
    for (c, range) in ranges.iter().enumerate() {
        // Rows 28..32 read rows 32..36 of the image, all padding.
        for (h, w) in [(28, 0), (31, 31), (30, 15)] {
            let value = f64::from(at(&x, 0, c, h, w));
            assert!((value - range.lo).abs() < 1e-6, "channel {c} [{h}, {w}]: {value} vs {}", range.lo);
        }
        // With the flip, columns 28..32 read columns -4..0 of the image.
        let value = f64::from(at(&x, 0, c, 5, 30));
        assert!((value - range.lo).abs() < 1e-6, "channel {c} [5, 30]: {value} vs {}", range.lo);
    }
}

#[test]
fn augmented_batch_rejects_count_mismatch() {
    let dataset = colour_dataset();
    let error = dataset
        .train
        .augmented_batch(&[0, 1], &[Augmentation::IDENTITY], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(error.contains("1 augmentations for a batch of 2 images"), "{error}");
}

#[test]
fn same_seed_draws_same_batch() {
    let dataset = colour_dataset();
    let batch = |seed: u64| {
        let indices: Vec<usize> = (0..32).collect();
        let augmentations = augment::for_batch(seed, 1, 0, indices.len());
        values(&dataset.train.augmented_batch(&indices, &augmentations, &Device::Cpu).unwrap().0)
    };
    assert_eq!(batch(5), batch(5));
    assert_ne!(batch(5), batch(6));
}

/// Trains a small MLP on the synthetic colour set for one epoch and
/// returns its parameters.
fn trained_weights(dataset: &Dataset, seed: u64, augment: bool) -> Vec<f32> {
    let shape = dataset.train.sample_shape();
    let mut network =
        Network::build(Arch::Mlp, &shape, &[8], 10, Activation::PhotonicSigmoid, Init::Xavier, 0).unwrap();
    let config = TrainConfig {
        epochs: 1,
        batch_size: 32,
        seed,
        eval_every_epoch: false,
        shuffle: false,
        augment,
    };
    scenario::train_regular(&mut network, dataset, &config, 0.05, &Progress::hidden()).unwrap();
    network.parameters().iter().flat_map(|(_, t)| values(t)).collect()
}

#[test]
fn augmented_training_is_reproducible() {
    let dataset = colour_dataset();
    let first = trained_weights(&dataset, 1, true);
    assert_eq!(first, trained_weights(&dataset, 1, true), "same seed, same weights");
    // Without shuffling the seed changes only the augmentations.
    assert_ne!(first, trained_weights(&dataset, 2, true));
    assert_eq!(trained_weights(&dataset, 1, false), trained_weights(&dataset, 2, false));
    assert_ne!(first, trained_weights(&dataset, 1, false));
}

#[test]
fn cifar_cnn_shapes_and_parameters() {
    let network =
        Network::build(Arch::CifarCnn, &[3, 32, 32], &[], 10, Activation::PhotonicSigmoid, Init::Xavier, 0).unwrap();
    assert_eq!(network.output_shape().unwrap(), [10]);
    let linear_inputs: Vec<usize> = network
        .parameters()
        .iter()
        .filter(|(name, t)| name.ends_with("weight") && t.rank() == 2)
        .map(|(_, t)| t.dims()[1])
        .collect();
    assert_eq!(linear_inputs, [6400, 512]);
    let count: usize = network.parameters().iter().map(|(_, t)| t.elem_count()).sum();
    // 896 + 18,496 + 73,856 + 295,168 (convolutions) + 3,277,312 + 5,130 (fully connected).
    assert_eq!(count, 3_670_858);
    let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(network.forward(&x).unwrap().dims(), &[2, 10]);
}

#[test]
fn cifar_cnn_rejects_small_input() {
    // 8 -> 6 -> 4 -> 2 leaves no room for the third convolution.
    let error = Network::build(Arch::CifarCnn, &[3, 8, 8], &[], 10, Activation::PhotonicSigmoid, Init::Xavier, 0)
        .unwrap_err()
        .to_string();
    assert!(error.contains("cifar-cnn layer 5 (conv2d)"), "{error}");
}

#[test]
fn gray_mlp_has_protocol_widths() {
    let network =
        Network::build(Arch::Mlp, &[1, 32, 32], &[1024, 512], 10, Activation::PhotonicSigmoid, Init::Xavier, 0)
            .unwrap();
    let widths: Vec<Vec<usize>> = network
        .parameters()
        .iter()
        .filter(|(name, _)| name.ends_with("weight"))
        .map(|(_, t)| t.dims().to_vec())
        .collect();
    assert_eq!(widths, [vec![1024, 1024], vec![512, 1024], vec![10, 512]]);
}

fn isonn() -> Command {
    let mut cmd = Command::cargo_bin("isonn").unwrap();
    cmd.env_remove("ISONN_DATA");
    cmd
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn cli_trains_and_transforms_cifar_cnn() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("cifar");
    write_cifar(&data_dir);
    let regular = tmp.path().join("regular");
    let train = |extra: &[&str]| {
        let mut cmd = isonn();
        cmd.args(["train", "--arch", "cifar-cnn", "--dataset", "cifar10", "--epochs", "1"])
            .args(["--batch-size", "64", "--lr", "0.01", "--data"])
            .arg(&data_dir)
            .arg("--out")
            .arg(&regular)
            .args(extra);
        cmd
    };
    train(&["--augment"]).assert().success().stdout(predicates::str::contains("test_accuracy"));

    let model = json(&regular.join("model.json"));
    assert_eq!(model["input"]["shape"], serde_json::json!([3, 32, 32]));
    let lo = model["input"]["range"]["lo"].as_f64().unwrap();
    let hi = model["input"]["range"]["hi"].as_f64().unwrap();
    // The enclosing range, rounded to f32: red has the lowest bound, blue
    // the highest.
    assert!((lo - (-0.4914 / 0.2023)).abs() < 1e-6, "lo {lo}");
    assert!((hi - (1.0 - 0.4465) / 0.2010).abs() < 1e-6, "hi {hi}");
    let provenance = model.to_string();
    assert!(provenance.contains(r#""augment":true"#), "{provenance}");

    // The checkpoint records the setting, so a resume cannot drop it.
    let output = train(&["--resume"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("augment true, this run has augment false"), "{stderr}");

    let nonneg = tmp.path().join("nonneg");
    isonn()
        .arg("transform")
        .arg(&regular)
        .arg("--out")
        .arg(&nonneg)
        .args(["--dataset", "cifar10", "--data"])
        .arg(&data_dir)
        .assert()
        .success()
        .stdout(predicates::str::contains("verification passed"));
    let report = json(&nonneg.join("equivalence.json"));
    assert_eq!(report["samples"].as_u64(), Some(TEST as u64));
    assert_eq!(report["negative_weights"].as_u64(), Some(0));
    assert!(report["min_signal"].as_f64().unwrap() >= 0.0);

    // In f64 a black pixel minus its channel's lower bound is exactly 0.
    isonn()
        .arg("verify")
        .arg(&regular)
        .arg(&nonneg)
        .args(["--dataset", "cifar10", "--precision", "f64", "--data"])
        .arg(&data_dir)
        .assert()
        .success()
        .stdout(predicates::str::contains("verification passed"));
    let report = json(&nonneg.join("equivalence.json"));
    assert_eq!(report["precision"].as_str(), Some("f64"));
    assert!(report["min_signal"].as_f64().unwrap() >= 0.0, "{report}");
}

#[test]
fn cli_trains_gray_mlp() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("cifar");
    write_cifar(&data_dir);
    let out = tmp.path().join("gray");
    isonn()
        .args(["train", "--arch", "mlp", "--hidden", "1024,512", "--dataset", "cifar10-gray"])
        .args(["--epochs", "1", "--batch-size", "64", "--data"])
        .arg(&data_dir)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let model = json(&out.join("model.json"));
    assert_eq!(model["input"]["shape"], serde_json::json!([1, 32, 32]));
    assert_eq!(model["input"]["range"], serde_json::json!({ "lo": 0.0, "hi": 1.0 }));
}

#[test]
fn cli_without_data_dir_names_source() {
    let output = isonn()
        .args(["train", "--dataset", "cifar10", "--epochs", "1", "--out"])
        .arg(tempfile::tempdir().unwrap().path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cifar10 is not bundled"), "{stderr}");
    assert!(stderr.contains("--data DIR"), "{stderr}");
    assert!(stderr.contains("https://www.cs.toronto.edu/~kriz/cifar.html"), "{stderr}");
}
