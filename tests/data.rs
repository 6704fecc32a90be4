//! Tests of the public data API against IDX files written to temporary
//! directories and against the embedded Fashion-MNIST subset.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use isonn::data::{self, DataSource, DatasetName, Images};

const STEMS: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

fn image_file(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut bytes = 0x0000_0803u32.to_be_bytes().to_vec();
    for size in [n, rows, cols] {
        bytes.extend_from_slice(&size.to_be_bytes());
    }
    bytes.extend_from_slice(pixels);
    bytes
}

fn label_file(labels: &[u8]) -> Vec<u8> {
    let mut bytes = 0x0000_0801u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    bytes.extend_from_slice(labels);
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Builds the four files of a small data set: 4 training and 3 test images of
/// 2x3 pixels, with pixel `i` of image `k` equal to `10 * k + i`.
fn dataset_files() -> [Vec<u8>; 4] {
    let pixels = |n: u8| {
        (0..n)
            .flat_map(|k| (0..6).map(move |i| 10 * k + i))
            .collect::<Vec<u8>>()
    };
    [
        image_file(4, 2, 3, &pixels(4)),
        label_file(&[3, 1, 4, 1]),
        image_file(3, 2, 3, &pixels(3)),
        label_file(&[5, 9, 2]),
    ]
}

/// Writes `files` under the standard names, gzipping those whose index is
/// in `gzipped` and giving them the `.gz` suffix.
fn write_files(dir: &Path, files: &[Vec<u8>; 4], gzipped: &[usize]) {
    for (index, (stem, bytes)) in STEMS.iter().zip(files).enumerate() {
        if gzipped.contains(&index) {
            std::fs::write(dir.join(format!("{stem}.gz")), gzip(bytes)).unwrap();
        } else {
            std::fs::write(dir.join(stem), bytes).unwrap();
        }
    }
}

fn load_error(dir: &Path) -> String {
    data::load_dir(dir, DatasetName::Mnist, DataSource::Flag(dir.to_path_buf()))
        .expect_err("loading must fail")
        .to_string()
}

#[test]
fn load_dir_round_trip_mixed_gzip() {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &dataset_files(), &[0, 3]);
    let source = DataSource::Flag(dir.path().to_path_buf());
    let dataset = data::load_dir(dir.path(), DatasetName::Mnist, source.clone()).unwrap();

    assert_eq!(dataset.name, DatasetName::Mnist);
    assert_eq!(dataset.source, source);
    assert_eq!(dataset.classes, 10);
    assert_eq!(dataset.train.len(), 4);
    assert_eq!(dataset.test.len(), 3);
    assert_eq!(dataset.train.sample_shape(), [1, 2, 3]);
    assert_eq!(dataset.train.labels, vec![3, 1, 4, 1]);
    assert_eq!(dataset.test.labels, vec![5, 9, 2]);
    assert_eq!(dataset.train.pixels.len(), 4 * 6);
    assert_eq!(dataset.test.pixels[6 + 2], 12.0 / 255.0);
}

#[test]
fn load_dir_gzip_detected_by_content() {
    // Gzipped data under the raw name and raw data under the `.gz` name.
    let dir = tempfile::tempdir().unwrap();
    let files = dataset_files();
    for (index, (stem, bytes)) in STEMS.iter().zip(&files).enumerate() {
        if index % 2 == 0 {
            std::fs::write(dir.path().join(stem), gzip(bytes)).unwrap();
        } else {
            std::fs::write(dir.path().join(format!("{stem}.gz")), bytes).unwrap();
        }
    }
    let dataset = data::load_dir(dir.path(), DatasetName::Mnist, DataSource::Embedded).unwrap();
    assert_eq!(dataset.train.labels, vec![3, 1, 4, 1]);
}

#[test]
fn load_dir_missing_dir_names_path() {
    let dir = PathBuf::from("/nonexistent/isonn-data");
    let message = load_error(&dir);
    assert!(
        message.contains("/nonexistent/isonn-data (from --data)"),
        "{message}"
    );
    assert!(message.contains("does not exist"), "{message}");
    for stem in STEMS {
        assert!(message.contains(&format!("{stem}[.gz]")), "{message}");
    }
}

#[test]
fn load_dir_missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &dataset_files(), &[]);
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("is missing t10k-labels-idx1-ubyte[.gz]"),
        "{message}"
    );
    assert!(
        message.contains("must contain train-images-idx3-ubyte[.gz]"),
        "{message}"
    );
}

#[test]
fn load_dir_count_mismatch_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = dataset_files();
    files[1] = label_file(&[3, 1, 4]);
    write_files(dir.path(), &files, &[]);
    let message = load_error(dir.path());
    assert!(
        message.contains("train-images-idx3-ubyte: contains 4 images"),
        "{message}"
    );
    assert!(
        message.contains("train-labels-idx1-ubyte contains 3 labels"),
        "{message}"
    );
}

#[test]
fn load_dir_label_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = dataset_files();
    files[3] = label_file(&[5, 10, 2]);
    write_files(dir.path(), &files, &[3]);
    let message = load_error(dir.path());
    assert!(message.contains("t10k-labels-idx1-ubyte.gz"), "{message}");
    assert!(
        message.contains("label 10 at index 1 is out of range"),
        "{message}"
    );
}

#[test]
fn load_dir_truncated_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = dataset_files();
    files[2].truncate(16 + 7);
    write_files(dir.path(), &files, &[2]);
    let message = load_error(dir.path());
    assert!(message.contains("t10k-images-idx3-ubyte.gz"), "{message}");
    assert!(
        message.contains("header claims 3x2x3 images (18 bytes) but only 7 bytes follow"),
        "{message}"
    );
    assert!(message.contains("download it again"), "{message}");
}

#[test]
fn load_dir_huge_header_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = dataset_files();
    files[0] = image_file(9_999_999, 4096, 4096, &[0; 64]);
    write_files(dir.path(), &files, &[0]);
    let message = load_error(dir.path());
    assert!(
        message.contains("header claims 9999999x4096x4096 images"),
        "{message}"
    );
    assert!(message.contains("only 64 bytes follow"), "{message}");
}

#[test]
fn load_dir_wrong_magic_names_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = dataset_files();
    files[0][..4].copy_from_slice(b"PK\x03\x04");
    write_files(dir.path(), &files, &[]);
    let message = load_error(dir.path());
    assert!(
        message.contains("train-images-idx3-ubyte: magic number 0x504b0304"),
        "{message}"
    );
}

#[test]
fn load_dir_image_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = dataset_files();
    files[2] = image_file(3, 3, 2, &[0; 18]);
    write_files(dir.path(), &files, &[]);
    let message = load_error(dir.path());
    assert!(message.contains("contains 3x2 images but"), "{message}");
}

#[test]
fn dataset_name_round_trip() {
    for name in DatasetName::ALL {
        assert_eq!(name.to_string().parse::<DatasetName>().unwrap(), name);
    }
    assert_eq!(
        "fashion-mnist".parse::<DatasetName>().unwrap(),
        DatasetName::FashionMnist
    );
    assert_eq!(
        serde_json::to_string(&DatasetName::FashionMnistSubset).unwrap(),
        "\"fashion-mnist-subset\""
    );
}

#[test]
fn dataset_name_unknown_lists_valid() {
    let message = "cifar100".parse::<DatasetName>().unwrap_err().to_string();
    assert!(message.contains("cifar100"), "{message}");
    assert!(
        message.contains("fashion-mnist, fashion-mnist-subset, mnist, cifar10, cifar10-gray"),
        "{message}"
    );
}

#[test]
fn data_source_display_and_json() {
    let dir = PathBuf::from("/srv/mnist");
    assert_eq!(
        DataSource::Flag(dir.clone()).to_string(),
        "/srv/mnist (from --data)"
    );
    assert_eq!(
        DataSource::Env(dir.clone()).to_string(),
        "/srv/mnist (from ISONN_DATA)"
    );
    assert_eq!(
        DataSource::System(dir.clone()).to_string(),
        "/srv/mnist (system package dataset-fashion-mnist)"
    );
    assert_eq!(
        serde_json::to_value(DataSource::Env(dir)).unwrap(),
        serde_json::json!({"kind": "env", "path": "/srv/mnist"})
    );
    assert_eq!(
        serde_json::to_value(DataSource::Embedded).unwrap(),
        serde_json::json!({"kind": "embedded"})
    );
}

#[test]
fn embedded_subset_contents() {
    let dataset = data::load_embedded().unwrap();
    assert_eq!(dataset.name, DatasetName::FashionMnistSubset);
    assert_eq!(dataset.source, DataSource::Embedded);
    assert_eq!(dataset.classes, 10);
    assert_eq!(dataset.train.len(), 10_000);
    assert_eq!(dataset.test.len(), 2_000);
    for images in [&dataset.train, &dataset.test] {
        assert_eq!(images.sample_shape(), [1, 28, 28]);
        assert_eq!(images.pixels.len(), images.len() * 784);
        assert_eq!(images.labels.len(), images.len());
        assert!(images.pixels.iter().all(|p| (0.0..=1.0).contains(p)));
        assert!(images.labels.iter().all(|&l| l < 10));
        // Every class occurs, so the subset is not one class by accident.
        for class in 0..10 {
            assert!(images.labels.contains(&class), "class {class} missing");
        }
    }
    let max = dataset.train.pixels.iter().copied().fold(0.0f32, f32::max);
    assert_eq!(max, 1.0);
}

#[test]
fn subset_load_is_machine_independent() {
    let dataset = data::load(DatasetName::FashionMnistSubset, None).unwrap();
    assert_eq!(dataset.source, DataSource::Embedded);
    assert_eq!(dataset.train.len(), 10_000);
}

#[test]
fn embedded_subset_matches_system_prefix() {
    let system = Path::new(data::SYSTEM_DIR);
    if !system.is_dir() {
        eprintln!("skipped: {} not installed", system.display());
        return;
    }
    let full = data::load_dir(
        system,
        DatasetName::FashionMnist,
        DataSource::System(system.into()),
    )
    .unwrap();
    let subset = data::load_embedded().unwrap();
    assert_eq!(full.train.take(10_000), subset.train);
    assert_eq!(full.test.take(2_000), subset.test);
}

fn tiny_images() -> Images {
    Images {
        n: 3,
        channels: 1,
        rows: 1,
        cols: 2,
        pixels: vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
        labels: vec![7, 8, 9],
        normalisation: None,
    }
}

#[test]
fn images_take_clamps() {
    let images = tiny_images();
    let first = images.take(2);
    assert_eq!(first.len(), 2);
    assert_eq!(first.pixels, vec![0.0, 0.1, 0.2, 0.3]);
    assert_eq!(first.labels, vec![7, 8]);
    assert_eq!(images.take(10), images);
    assert!(images.take(0).is_empty());
}

#[test]
fn images_batch_gathers_indices() {
    let images = tiny_images();
    let (x, y) = images.batch(&[2, 0], &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[2, 1, 1, 2]);
    assert_eq!(x.dtype(), DType::F32);
    assert_eq!(y.dims(), &[2]);
    assert_eq!(y.dtype(), DType::U32);
    assert_eq!(
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.4, 0.5, 0.0, 0.1]
    );
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![9, 7]);
}

#[test]
fn images_batch_rejects_bad_index() {
    let message = tiny_images()
        .batch(&[0, 3], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(message.contains("batch index 3 at position 1"), "{message}");
    assert!(message.contains("3 images"), "{message}");
}
