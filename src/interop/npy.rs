//! NumPy `.npy` arrays of f32 or f64 values, the exchange format for inputs
//! and outputs with Python tools.
//!
//! Only what `numpy.save` writes for a plain float array is read: format
//! version 1, 2 or 3, little-endian `<f4` or `<f8`, C order.

use std::path::Path;

use super::tensor::TensorData;
use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Largest `.npy` file isonn reads (4 GiB).
pub const MAX_NPY_BYTES: u64 = 4 << 30;

/// Reads a float array from `path`.
pub fn read_npy(path: &Path) -> Result<TensorData> {
    let bytes = crate::fsio::read_capped(path, MAX_NPY_BYTES, ".npy array")?;
    parse_npy(&bytes).map_err(|m| Error::data(path, format!("{m}; save it with numpy.save as float32 or float64")))
}

/// Parses the bytes of a `.npy` file.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<TensorData, String> {
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
        .ok_or("the .npy header is cut short")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;

    let element_bytes = if header.contains("'<f4'") {
        4
    } else if header.contains("'<f8'") {
        8
    } else {
        return Err(format!("header {header:?} has no little-endian float32 or float64 dtype"));
    };
    if header.contains("'fortran_order': True") {
        return Err("the array is in Fortran order; save a C-ordered copy".into());
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
    let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if count.and_then(|n| n.checked_mul(element_bytes)) != Some(data.len()) {
        return Err(format!(
            "the shape {dims:?} needs {} bytes of {element_bytes}-byte values but {} follow the header",
            count.map_or("too many".to_string(), |n| (n as u128 * element_bytes as u128).to_string()),
            data.len()
        ));
    }
    let values = if element_bytes == 4 {
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")) as f64)
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")))
            .collect()
    };
    Ok(TensorData { dims, values })
}

/// Encodes a float32 array of shape `dims` as `.npy` bytes (format 1.0).
pub fn encode_npy_f32(dims: &[usize], values: &[f32]) -> Vec<u8> {
    let shape: String = match dims {
        [d] => format!("({d},)"),
        _ => format!("({})", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // The header, newline included, pads the data start to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
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
}
