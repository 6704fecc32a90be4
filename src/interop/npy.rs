//! NumPy `.npy` arrays, the exchange format for inputs, labels and outputs
//! with Python tools.
//!
//! Only what `numpy.save` writes for a plain array is read: format version
//! 1, 2 or 3, C order. Inputs are float32 or float64 ([`read_npy`]) and
//! labels any integer type ([`parse_npy_integers`]), either byte order.

use std::path::Path;

use super::tensor::TensorData;
use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Largest `.npy` file isonn reads (4 GiB).
pub const MAX_NPY_BYTES: u64 = 4 << 30;

/// The element type of an array, from the header's `descr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dtype {
    /// `'f'` (float), `'i'` (signed integer) or `'u'` (unsigned integer).
    kind: char,
    /// Bytes per element.
    size: usize,
    big_endian: bool,
}

/// The parsed header of a `.npy` file and the bytes that follow it.
struct Array<'a> {
    dtype: Dtype,
    dims: Vec<usize>,
    data: &'a [u8],
}

/// An integer array, such as class labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegerData {
    /// The array's shape.
    pub dims: Vec<usize>,
    /// The elements in C order, widened to `i128` so that every int64 and
    /// uint64 value is exact.
    pub values: Vec<i128>,
}

/// Reads a float array from `path`.
pub fn read_npy(path: &Path) -> Result<TensorData> {
    let bytes = crate::fsio::read_capped(path, MAX_NPY_BYTES, ".npy array")?;
    parse_npy(&bytes).map_err(|m| Error::data(path, m))
}

/// The fix named in the error for a float array of another type.
const FLOAT_FIX: &str = "save the array with numpy.save as float32 or float64, e.g. x.astype(numpy.float32)";

/// The fix named in the error for an integer array of another type.
const INTEGER_FIX: &str = "save the array with numpy.save as an integer type such as int64";

/// Parses the bytes of a `.npy` file of float32 or float64 values.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<TensorData, String> {
    let array = parse_array(bytes, FLOAT_FIX)?;
    let Dtype { kind: 'f', size: size @ (4 | 8), .. } = array.dtype else {
        return Err(format!("the dtype {:?} is not float32 or float64; {FLOAT_FIX}", array.dtype.describe()));
    };
    let values = little_endian_elements(&array)
        .map(|raw| {
            if size == 4 {
                f32::from_le_bytes(raw[..4].try_into().expect("4 bytes")) as f64
            } else {
                f64::from_le_bytes(raw[..8].try_into().expect("8 bytes"))
            }
        })
        .collect();
    Ok(TensorData { dims: array.dims, values })
}

/// Parses the bytes of a `.npy` file of signed or unsigned integers of 1,
/// 2, 4 or 8 bytes.
pub fn parse_npy_integers(bytes: &[u8]) -> std::result::Result<IntegerData, String> {
    let array = parse_array(bytes, INTEGER_FIX)?;
    let Dtype { kind: kind @ ('i' | 'u'), size, .. } = array.dtype else {
        return Err(format!("the dtype {:?} is not an integer type; {INTEGER_FIX}", array.dtype.describe()));
    };
    let values = little_endian_elements(&array)
        .map(|mut raw| {
            // Sign-extend a negative signed value from its top byte.
            if kind == 'i' && raw[size - 1] & 0x80 != 0 {
                raw[size..].fill(0xff);
            }
            i128::from_le_bytes(raw)
        })
        .collect();
    Ok(IntegerData { dims: array.dims, values })
}

impl Dtype {
    /// Parses a `descr` such as `<f4`, `>i8` or `|u1`.
    fn parse(descr: &str) -> std::result::Result<Dtype, String> {
        let mut chars = descr.chars();
        let (order, kind) = (chars.next(), chars.next());
        let size: usize = chars.as_str().parse().map_err(|_| format!("unsupported dtype {descr:?}"))?;
        let big_endian = match order {
            Some('<') => false,
            Some('>') => true,
            Some('|') if size == 1 => false,
            _ => return Err(format!("unsupported dtype {descr:?}: expected a byte order < or >")),
        };
        let supported = match kind {
            Some('f') => matches!(size, 4 | 8),
            Some('i' | 'u') => matches!(size, 1 | 2 | 4 | 8),
            _ => false,
        };
        if !supported {
            return Err(format!("unsupported dtype {descr:?}"));
        }
        Ok(Dtype { kind: kind.expect("checked above"), size, big_endian })
    }

    /// Returns the NumPy name of the type, e.g. `>i4`.
    fn describe(&self) -> String {
        let order = match (self.size, self.big_endian) {
            (1, _) => '|',
            (_, true) => '>',
            (_, false) => '<',
        };
        format!("{order}{}{}", self.kind, self.size)
    }
}

/// Returns the bytes of each element in little-endian order, padded with
/// zeros to 16 bytes.
fn little_endian_elements<'a>(array: &'a Array<'a>) -> impl Iterator<Item = [u8; 16]> + 'a {
    let Dtype { size, big_endian, .. } = array.dtype;
    array.data.chunks_exact(size).map(move |element| {
        let mut raw = [0u8; 16];
        raw[..size].copy_from_slice(element);
        if big_endian {
            raw[..size].reverse();
        }
        raw
    })
}

/// Parses the magic, header and shape, and checks that the data after the
/// header has exactly the size the shape and dtype imply. `dtype_fix` is
/// the fix an unsupported dtype's error names.
fn parse_array<'a>(bytes: &'a [u8], dtype_fix: &str) -> std::result::Result<Array<'a>, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or("the .npy header is cut short; the file is truncated, so save it again with numpy.save")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;

    let descr = header
        .split("'descr':")
        .nth(1)
        .ok_or_else(|| format!("header {header:?} has no dtype ('descr'); the file is damaged, so save it again"))?
        .trim_start();
    if descr.starts_with('[') {
        return Err(format!("the array has a structured dtype (named fields); save a plain array: {dtype_fix}"));
    }
    let descr = descr
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| format!("header {header:?} has an invalid dtype ('descr'); {dtype_fix}"))?;
    let dtype = Dtype::parse(descr).map_err(|m| format!("{m}; {dtype_fix}"))?;
    if header.contains("'fortran_order': True") {
        return Err("the array is in Fortran order; save a C-ordered copy, e.g. numpy.ascontiguousarray(x)".into());
    }
    let shape = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.trim().strip_prefix('('))
        .ok_or_else(|| format!("header {header:?} has no shape"))?;
    let mut dims = Vec::new();
    for part in shape.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        dims.push(part.parse::<usize>().map_err(|_| format!("invalid dimension {part:?} in the .npy shape"))?);
    }

    let data = &bytes[start + header_len..];
    let element_bytes = dtype.size;
    let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if count.and_then(|n| n.checked_mul(element_bytes)) != Some(data.len()) {
        return Err(format!(
            "the shape {dims:?} needs {} bytes of {element_bytes}-byte values but {} follow the header; \
             the file is truncated or damaged, so save it again with numpy.save",
            count.map_or("too many".to_string(), |n| (n as u128 * element_bytes as u128).to_string()),
            data.len()
        ));
    }
    Ok(Array { dtype, dims, data })
}

/// Encodes an array of shape `dims` as `.npy` bytes (format 1.0): `descr`
/// is the NumPy type such as `<f4` or `>i8`, and `data` the elements' bytes
/// in C order and that byte order.
pub fn encode_npy(descr: &str, dims: &[usize], data: &[u8]) -> Vec<u8> {
    let shape: String = match dims {
        [d] => format!("({d},)"),
        _ => format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // The header, newline included, pads the data start to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Encodes a float32 array of shape `dims` as `.npy` bytes (format 1.0).
pub fn encode_npy_f32(dims: &[usize], values: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    encode_npy("<f4", dims, &data)
}

/// Writes a float32 array to `path` atomically.
pub fn write_npy_f32(path: &Path, dims: &[usize], values: &[f32]) -> Result<()> {
    crate::fsio::write_atomic(path, &encode_npy_f32(dims, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips() {
        let values = [1.0f32, -2.5, 3.25, 0.0, 7.0, -1e-8];
        let parsed = parse_npy(&encode_npy_f32(&[2, 3], &values)).unwrap();
        assert_eq!(parsed.dims, vec![2, 3]);
        assert_eq!(parsed.values, values.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let parsed = parse_npy(&encode_npy_f32(&[3], &values[..3])).unwrap();
        assert_eq!(parsed.dims, vec![3]);
    }

    #[test]
    fn npy_size_mismatch_is_an_error() {
        let mut bytes = encode_npy_f32(&[2, 3], &[0.0; 6]);
        bytes.truncate(bytes.len() - 4);
        assert!(parse_npy(&bytes).unwrap_err().contains("20 follow"));
        assert!(parse_npy(b"\x93NUMPY").is_err());
        assert!(parse_npy(b"not numpy at all").unwrap_err().contains("magic"));
    }

    /// Encodes `values` as NumPy integers of `size` bytes in either byte
    /// order, as `numpy.save` writes them.
    fn encode_integers(values: &[i128], signed: bool, size: usize, big_endian: bool) -> Vec<u8> {
        let mut data = Vec::new();
        for v in values {
            let mut bytes = v.to_le_bytes()[..size].to_vec();
            if big_endian {
                bytes.reverse();
            }
            data.extend(bytes);
        }
        let order = if size == 1 { '|' } else if big_endian { '>' } else { '<' };
        let kind = if signed { 'i' } else { 'u' };
        encode_npy(&format!("{order}{kind}{size}"), &[values.len()], &data)
    }

    #[test]
    fn integers_of_every_width_and_order() {
        for size in [1, 2, 4, 8] {
            for big_endian in [false, true] {
                let signed = [-1i128, 0, 7, -(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1];
                let parsed = parse_npy_integers(&encode_integers(&signed, true, size, big_endian)).unwrap();
                assert_eq!(parsed.values, signed, "int{} big_endian {big_endian}", 8 * size);
                assert_eq!(parsed.dims, vec![signed.len()]);

                let unsigned = [0i128, 9, (1i128 << (8 * size)) - 1];
                let parsed = parse_npy_integers(&encode_integers(&unsigned, false, size, big_endian)).unwrap();
                assert_eq!(parsed.values, unsigned, "uint{} big_endian {big_endian}", 8 * size);
            }
        }
    }

    #[test]
    fn integer_reader_rejects_floats_and_floats_reader_integers() {
        let floats = encode_npy_f32(&[2], &[1.0, 2.0]);
        let message = parse_npy_integers(&floats).unwrap_err();
        assert!(message.contains("not an integer type"), "{message}");
        let integers = encode_integers(&[1, 2], true, 8, false);
        let message = parse_npy(&integers).unwrap_err();
        assert!(message.contains("not float32 or float64"), "{message}");
        let booleans = encode_npy("|b1", &[2], &[0, 1]);
        let message = parse_npy_integers(&booleans).unwrap_err();
        assert!(message.contains("unsupported dtype \"|b1\""), "{message}");
    }

    #[test]
    fn big_endian_floats_are_read() {
        let data: Vec<u8> = [1.5f64, -2.0].iter().flat_map(|v| v.to_be_bytes()).collect();
        let parsed = parse_npy(&encode_npy(">f8", &[2], &data)).unwrap();
        assert_eq!(parsed.values, vec![1.5, -2.0]);
    }

    #[test]
    fn structured_dtype_is_named() {
        // numpy.save writes a structured dtype as a list, not a quoted string.
        let header = "{'descr': [('x', '<f4'), ('y', '<f4')], 'fortran_order': False, 'shape': (1,), }\n";
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 8]);
        let message = parse_npy(&bytes).unwrap_err();
        assert!(message.contains("structured dtype"), "{message}");
    }

    #[test]
    fn truncated_file_error_names_its_fix() {
        let mut bytes = encode_npy_f32(&[2], &[1.0, 2.0]);
        bytes.pop();
        let message = parse_npy(&bytes).unwrap_err();
        assert!(message.contains("truncated or damaged"), "{message}");
        assert!(!message.contains("float32 or float64"), "{message}");
    }

    #[test]
    fn truncated_integers_are_an_error() {
        let mut bytes = encode_integers(&[1, 2, 3], true, 4, false);
        bytes.pop();
        let message = parse_npy_integers(&bytes).unwrap_err();
        assert!(message.contains("11 follow"), "{message}");
    }

    proptest::proptest! {
        #[test]
        fn integers_round_trip(
            values in proptest::collection::vec(proptest::num::i64::ANY, 0..40),
            size_index in 0usize..4,
            signed: bool,
            big_endian: bool,
        ) {
            let size = [1, 2, 4, 8][size_index];
            let bits = 8 * size as u32;
            // Reduce each value into the range of the chosen type.
            let values: Vec<i128> = values
                .iter()
                .map(|&v| {
                    let modulus = 1i128 << bits;
                    let v = (v as i128).rem_euclid(modulus);
                    if signed && v >= modulus / 2 { v - modulus } else { v }
                })
                .collect();
            let parsed = parse_npy_integers(&encode_integers(&values, signed, size, big_endian)).unwrap();
            proptest::prop_assert_eq!(parsed.values, values);
        }
    }
}
