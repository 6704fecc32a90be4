//! Reader for the IDX format of MNIST and Fashion-MNIST, gzipped or raw.
//!
//! An IDX file is a big-endian header followed by the data: a 4-byte magic
//! number `0x0000TTDD` (`TT` the element type, `DD` the number of
//! dimensions), one `u32` size per dimension, then the elements in row-major
//! order. This reader accepts unsigned-byte files only: images
//! (`0x00000803`, dimensions images × rows × columns) and labels
//! (`0x00000801`, dimension labels).
//!
//! The header is checked against the bytes that follow before any buffer of
//! the claimed size is allocated, so a damaged header that claims billions of
//! images fails with an error instead of exhausting memory.

use std::borrow::Cow;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Magic number of an IDX file of unsigned-byte images with 3 dimensions.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;

/// Magic number of an IDX file of unsigned-byte labels with 1 dimension.
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Maximum number of images or labels in one file.
pub const MAX_ITEMS: usize = 10_000_000;

/// Maximum pixels in one image (rows × columns), 4096 × 4096.
pub const MAX_IMAGE_PIXELS: usize = 4096 * 4096;

/// The two bytes every gzip stream starts with (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Theoretical maximum compression ratio of deflate, 1032:1, from zlib's
/// technical details (<https://zlib.net/zlib_tech.html>). The decompression
/// buffer is reserved at no more than this multiple of the compressed size,
/// so the header's claim alone never sizes an allocation.
const MAX_DEFLATE_RATIO: usize = 1032;

/// The pixels of an IDX image file.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxImages {
    /// Number of images.
    pub n: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `n * rows * cols` pixels in row-major order, scaled from bytes to
    /// `[0, 1]` as `x / 255`.
    pub pixels: Vec<f32>,
}

/// The kind of IDX file the caller expects.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Images,
    Labels,
}

impl Kind {
    fn magic(self) -> u32 {
        match self {
            Kind::Images => IMAGES_MAGIC,
            Kind::Labels => LABELS_MAGIC,
        }
    }

    fn dims(self) -> usize {
        (self.magic() & 0xff) as usize
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Images => "image",
            Kind::Labels => "label",
        }
    }
}

/// Reads and parses an IDX image file, gzipped or raw.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    parse_images(&crate::fsio::read(path)?, path)
}

/// Reads and parses an IDX label file, gzipped or raw, and checks that every
/// label is below `classes`.
pub fn read_labels(path: &Path, classes: usize) -> Result<Vec<u8>> {
    parse_labels(&crate::fsio::read(path)?, path, classes)
}

/// Parses the bytes of an IDX image file, gzipped or raw.
///
/// `name` is the file name reported in errors. Gzip is detected by the magic
/// bytes `1f 8b`, not by the name.
pub fn parse_images(bytes: &[u8], name: &Path) -> Result<IdxImages> {
    let (sizes, body) = parse(bytes, name, Kind::Images)?;
    let (n, rows, cols) = (sizes[0], sizes[1], sizes[2]);
    let pixels = body.iter().map(|&b| f32::from(b) / 255.0).collect();
    Ok(IdxImages {
        n,
        rows,
        cols,
        pixels,
    })
}

/// Parses the bytes of an IDX label file, gzipped or raw, and checks that
/// every label is below `classes`.
///
/// `name` is the file name reported in errors.
pub fn parse_labels(bytes: &[u8], name: &Path, classes: usize) -> Result<Vec<u8>> {
    let (_, body) = parse(bytes, name, Kind::Labels)?;
    if let Some((index, &label)) = body
        .iter()
        .enumerate()
        .find(|(_, &label)| usize::from(label) >= classes)
    {
        return Err(Error::data(
            name,
            format!(
                "label {label} at index {index} is out of range, the data set has \
                 {classes} classes (0..{classes}); the file is damaged or belongs to \
                 another data set"
            ),
        ));
    }
    Ok(body.into_owned())
}

/// Checks the header and returns the dimension sizes and the data bytes.
fn parse<'a>(bytes: &'a [u8], name: &Path, kind: Kind) -> Result<(Vec<usize>, Cow<'a, [u8]>)> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        let mut rest = bytes;
        let sizes = read_header(&mut rest, name, kind, false)?;
        let expected = data_len(&sizes, name, kind)?;
        check_data_len(rest.len(), expected, &sizes, name, kind)?;
        return Ok((sizes, Cow::Borrowed(rest)));
    }

    let mut decoder = flate2::bufread::MultiGzDecoder::new(bytes);
    let sizes = read_header(&mut decoder, name, kind, true)?;
    let expected = data_len(&sizes, name, kind)?;
    // Reading one byte more than claimed detects trailing data, and the
    // `take` cap stops a corrupt or hostile stream from inflating further.
    let limit = expected.saturating_add(1);
    let reserve = limit.min(bytes.len().saturating_mul(MAX_DEFLATE_RATIO));
    let mut body = Vec::with_capacity(reserve);
    decoder
        .take(limit as u64)
        .read_to_end(&mut body)
        .map_err(|e| gzip_error(name, &e))?;
    check_data_len(body.len(), expected, &sizes, name, kind)?;
    Ok((sizes, Cow::Owned(body)))
}

/// Reads the magic number and the dimension sizes from `reader`.
fn read_header(
    reader: &mut impl Read,
    name: &Path,
    kind: Kind,
    gzipped: bool,
) -> Result<Vec<usize>> {
    let header_len = 4 + 4 * kind.dims();
    let magic_bytes = read_up_to(reader, 4, name)?;
    if magic_bytes.len() < 4 {
        return Err(short_header(magic_bytes.len(), header_len, name, gzipped));
    }
    let magic = u32::from_be_bytes([
        magic_bytes[0],
        magic_bytes[1],
        magic_bytes[2],
        magic_bytes[3],
    ]);
    check_magic(magic, name, kind)?;

    let size_bytes = read_up_to(reader, 4 * kind.dims(), name)?;
    if size_bytes.len() < 4 * kind.dims() {
        return Err(short_header(
            4 + size_bytes.len(),
            header_len,
            name,
            gzipped,
        ));
    }
    let sizes = size_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    Ok(sizes)
}

/// Reads at most `len` bytes, fewer only where the stream ends.
fn read_up_to(reader: &mut impl Read, len: usize, name: &Path) -> Result<Vec<u8>> {
    let mut buffer = Vec::with_capacity(len);
    reader
        .take(len as u64)
        .read_to_end(&mut buffer)
        .map_err(|e| gzip_error(name, &e))?;
    Ok(buffer)
}

fn check_magic(magic: u32, name: &Path, kind: Kind) -> Result<()> {
    if magic == kind.magic() {
        return Ok(());
    }
    let expected = kind.magic();
    let noun = kind.noun();
    let message = if magic == IMAGES_MAGIC || magic == LABELS_MAGIC {
        let found = if magic == IMAGES_MAGIC {
            "image"
        } else {
            "label"
        };
        format!(
            "this is an IDX {found} file (magic number {magic:#010x}) but an IDX {noun} \
             file (magic number {expected:#010x}) was expected; check that the image \
             and label files are not swapped"
        )
    } else if magic >> 16 != 0 {
        format!(
            "magic number {magic:#010x} is not an IDX magic number (expected \
             {expected:#010x} for an IDX {noun} file); this is not an IDX file or it \
             is damaged"
        )
    } else if (magic >> 8) & 0xff != 0x08 {
        format!(
            "IDX element type {:#04x} is not supported, only unsigned bytes (0x08) \
             are (expected magic number {expected:#010x})",
            (magic >> 8) & 0xff
        )
    } else {
        format!(
            "IDX file has {} dimensions but an IDX {noun} file has {} (expected magic \
             number {expected:#010x}); this is not an MNIST-style {noun} file",
            magic & 0xff,
            kind.dims()
        )
    };
    Err(Error::data(name, message))
}

/// Checks the sizes against the limits and returns the number of data bytes
/// they claim.
fn data_len(sizes: &[usize], name: &Path, kind: Kind) -> Result<usize> {
    let items = sizes[0];
    if items > MAX_ITEMS {
        return Err(Error::data(
            name,
            format!(
                "header claims {items} {noun}s, more than the maximum of {MAX_ITEMS}; \
                 the header is damaged or this is not an MNIST-style file",
                noun = kind.noun()
            ),
        ));
    }
    let per_item = match kind {
        Kind::Labels => 1,
        Kind::Images => image_pixels(sizes[1], sizes[2], name)?,
    };
    // Both factors are bounded above, so the product fits in 64 bits.
    usize::try_from(items as u64 * per_item as u64).map_err(|_| {
        Error::data(
            name,
            format!(
                "header claims {} bytes of {noun}s, more than this platform can address",
                items as u64 * per_item as u64,
                noun = kind.noun()
            ),
        )
    })
}

fn image_pixels(rows: usize, cols: usize, name: &Path) -> Result<usize> {
    let pixels = rows as u64 * cols as u64;
    if rows == 0 || cols == 0 || pixels > MAX_IMAGE_PIXELS as u64 {
        return Err(Error::data(
            name,
            format!(
                "header claims images of {rows}x{cols} pixels; rows and columns must be \
                 at least 1 and an image at most {MAX_IMAGE_PIXELS} pixels (4096x4096), \
                 so the header is damaged"
            ),
        ));
    }
    Ok(pixels as usize)
}

fn check_data_len(
    found: usize,
    expected: usize,
    sizes: &[usize],
    name: &Path,
    kind: Kind,
) -> Result<()> {
    let claim = match kind {
        Kind::Images => format!("{}x{}x{} images", sizes[0], sizes[1], sizes[2]),
        Kind::Labels => format!("{} labels", sizes[0]),
    };
    if found < expected {
        return Err(Error::data(
            name,
            format!(
                "header claims {claim} ({expected} bytes) but only {found} bytes follow; \
                 the file is truncated, download it again"
            ),
        ));
    }
    if found > expected {
        return Err(Error::data(
            name,
            format!(
                "header claims {claim} ({expected} bytes) but more bytes follow; the \
                 header or the file is damaged, download it again"
            ),
        ));
    }
    Ok(())
}

fn short_header(found: usize, header_len: usize, name: &Path, gzipped: bool) -> Error {
    let data_kind = if gzipped { "decompressed data" } else { "file" };
    Error::data(
        name,
        format!(
            "{data_kind} ends after {found} bytes, inside the {header_len}-byte IDX header; \
             the file is truncated or empty, download it again"
        ),
    )
}

fn gzip_error(name: &Path, error: &std::io::Error) -> Error {
    Error::data(
        name,
        format!(
            "gzip data is invalid ({error}); the file is damaged or truncated, download it again"
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use super::*;

    fn name() -> PathBuf {
        PathBuf::from("train-images-idx3-ubyte.gz")
    }

    fn image_file(n: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
        let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
        for size in [n, rows, cols] {
            bytes.extend_from_slice(&size.to_be_bytes());
        }
        bytes.extend_from_slice(pixels);
        bytes
    }

    fn label_file(labels: &[u8]) -> Vec<u8> {
        let mut bytes = LABELS_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        bytes.extend_from_slice(labels);
        bytes
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn error_text(result: Result<impl std::fmt::Debug>) -> String {
        result.expect_err("parsing must fail").to_string()
    }

    #[test]
    fn images_raw_and_gzip_agree() {
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| (i * 11) as u8).collect();
        let raw = image_file(2, 3, 4, &pixels);
        let from_raw = parse_images(&raw, &name()).unwrap();
        let from_gzip = parse_images(&gzip(&raw), &name()).unwrap();
        assert_eq!(from_raw, from_gzip);
        assert_eq!((from_raw.n, from_raw.rows, from_raw.cols), (2, 3, 4));
        assert_eq!(from_raw.pixels.len(), 24);
        assert_eq!(from_raw.pixels[1], 11.0 / 255.0);
    }

    #[test]
    fn images_scale_to_unit_range() {
        let raw = image_file(1, 1, 3, &[0, 128, 255]);
        let images = parse_images(&raw, &name()).unwrap();
        assert_eq!(images.pixels, vec![0.0, 128.0 / 255.0, 1.0]);
    }

    #[test]
    fn labels_raw_and_gzip_agree() {
        let raw = label_file(&[0, 9, 3]);
        assert_eq!(parse_labels(&raw, &name(), 10).unwrap(), vec![0, 9, 3]);
        assert_eq!(
            parse_labels(&gzip(&raw), &name(), 10).unwrap(),
            vec![0, 9, 3]
        );
    }

    #[test]
    fn label_out_of_range_names_index() {
        let message = error_text(parse_labels(&label_file(&[1, 2, 10, 4]), &name(), 10));
        assert!(message.contains("train-images-idx3-ubyte.gz"), "{message}");
        assert!(message.contains("label 10 at index 2"), "{message}");
        assert!(message.contains("10 classes"), "{message}");
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let mut raw = image_file(1, 1, 1, &[0]);
        raw[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        let message = error_text(parse_images(&raw, &name()));
        assert!(message.contains("train-images-idx3-ubyte.gz"), "{message}");
        assert!(message.contains("magic number 0x12345678"), "{message}");
        assert!(message.contains("not an IDX file"), "{message}");
    }

    #[test]
    fn swapped_files_are_named_as_such() {
        let message = error_text(parse_images(&label_file(&[1]), &name()));
        assert!(message.contains("IDX label file"), "{message}");
        assert!(message.contains("swapped"), "{message}");
        let message = error_text(parse_labels(&image_file(1, 1, 1, &[0]), &name(), 10));
        assert!(message.contains("IDX image file"), "{message}");
    }

    #[test]
    fn unsupported_type_and_dims_are_rejected() {
        let mut raw = image_file(1, 1, 1, &[0]);
        raw[..4].copy_from_slice(&0x0000_0d03u32.to_be_bytes());
        let message = error_text(parse_images(&raw, &name()));
        assert!(message.contains("element type 0x0d"), "{message}");

        raw[..4].copy_from_slice(&0x0000_0804u32.to_be_bytes());
        let message = error_text(parse_images(&raw, &name()));
        assert!(message.contains("4 dimensions"), "{message}");
    }

    #[test]
    fn truncated_data_is_rejected() {
        let raw = image_file(3, 2, 2, &[0; 10]);
        for bytes in [raw.clone(), gzip(&raw)] {
            let message = error_text(parse_images(&bytes, &name()));
            assert!(message.contains("train-images-idx3-ubyte.gz"), "{message}");
            assert!(message.contains("header claims 3x2x2 images"), "{message}");
            assert!(message.contains("only 10 bytes follow"), "{message}");
            assert!(message.contains("truncated"), "{message}");
        }
    }

    #[test]
    fn trailing_data_is_rejected() {
        let raw = label_file(&[1, 2, 3]);
        let mut longer = raw.clone();
        longer.push(0);
        for bytes in [longer.clone(), gzip(&longer)] {
            let message = error_text(parse_labels(&bytes, &name(), 10));
            assert!(message.contains("more bytes follow"), "{message}");
        }
    }

    #[test]
    fn truncated_header_is_rejected() {
        let raw = image_file(1, 1, 1, &[0]);
        for len in [0, 3, 4, 15] {
            let message = error_text(parse_images(&raw[..len], &name()));
            assert!(message.contains("16-byte IDX header"), "{len}: {message}");
        }
        let message = error_text(parse_images(&gzip(&raw[..9]), &name()));
        assert!(
            message.contains("decompressed data ends after 9 bytes"),
            "{message}"
        );
    }

    #[test]
    fn huge_claim_fails_without_allocating() {
        // 2^31 images of 28x28 would be 1.7 TB; the limit rejects it first.
        let raw = image_file(1 << 31, 28, 28, &[0; 100]);
        let message = error_text(parse_images(&raw, &name()));
        assert!(message.contains("2147483648 images"), "{message}");
        assert!(message.contains("maximum of 10000000"), "{message}");

        // Within the limits, the claim of 7.8 GB still meets only 100 bytes.
        let raw = image_file(10_000_000, 28, 28, &[0; 100]);
        for bytes in [raw.clone(), gzip(&raw)] {
            let message = error_text(parse_images(&bytes, &name()));
            assert!(
                message.contains("header claims 10000000x28x28 images"),
                "{message}"
            );
            assert!(message.contains("only 100 bytes follow"), "{message}");
        }

        let raw = label_file(&[]);
        let mut huge = raw[..4].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let message = error_text(parse_labels(&huge, &name(), 10));
        assert!(message.contains("4294967295 labels"), "{message}");
    }

    #[test]
    fn oversized_or_empty_image_shape_is_rejected() {
        for (rows, cols) in [(4097, 4096), (0, 28), (28, 0), (u32::MAX, u32::MAX)] {
            let raw = image_file(1, rows, cols, &[]);
            let message = error_text(parse_images(&raw, &name()));
            assert!(
                message.contains(&format!("{rows}x{cols} pixels")),
                "{message}"
            );
        }
    }

    #[test]
    fn corrupt_gzip_is_rejected() {
        let mut bytes = gzip(&image_file(2, 4, 4, &[7; 32]));
        let middle = bytes.len() / 2;
        bytes.truncate(middle);
        let message = error_text(parse_images(&bytes, &name()));
        assert!(message.contains("train-images-idx3-ubyte.gz"), "{message}");
        assert!(
            message.contains("gzip data is invalid") || message.contains("truncated"),
            "{message}"
        );
    }

    #[test]
    fn empty_file_parses_as_zero_items() {
        let images = parse_images(&image_file(0, 28, 28, &[]), &name()).unwrap();
        assert_eq!(images.n, 0);
        assert!(images.pixels.is_empty());
        assert!(parse_labels(&label_file(&[]), &name(), 10)
            .unwrap()
            .is_empty());
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_images(&bytes, &name());
            let _ = parse_labels(&bytes, &name(), 10);
            let _ = parse_images(&gzip(&bytes), &name());
            let mut gzip_magic_first = GZIP_MAGIC.to_vec();
            gzip_magic_first.extend_from_slice(&bytes);
            let _ = parse_labels(&gzip_magic_first, &name(), 10);
        }

        #[test]
        fn random_headers_never_panic(
            sizes in proptest::array::uniform3(proptest::num::u32::ANY),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            gzipped in proptest::bool::ANY,
        ) {
            let raw = image_file(sizes[0], sizes[1], sizes[2], &body);
            let bytes = if gzipped { gzip(&raw) } else { raw };
            let _ = parse_images(&bytes, &name());
            let mut labels = label_file(&[]);
            labels.truncate(4);
            labels.extend_from_slice(&sizes[0].to_be_bytes());
            labels.extend_from_slice(&body);
            let _ = parse_labels(&labels, &name(), 10);
        }
    }
}
