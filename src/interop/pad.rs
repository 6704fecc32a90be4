//! Reading of ONNX `Pad` amounts as isonn's padding of a convolution or
//! pool, which is the same on all four sides of the two spatial axes.

/// Returns the padding of every spatial side from the `pads` of a `Pad`
/// node on a `[batch, channels, height, width]` tensor. `pads` lists the
/// begins of the padded axes, then their ends; `axes` names those axes
/// (opset 18), all four when `None`.
///
/// # Errors
/// Padding of the batch or channel axis, negative pads (cropping) and
/// pads that differ between sides or axes, each with the pads read.
pub fn symmetric_spatial_padding(pads: &[i64], axes: Option<&[i64]>) -> Result<usize, String> {
    const RANK: usize = 4;
    let axes: Vec<i64> = axes.map_or_else(|| (0..RANK as i64).collect(), <[i64]>::to_vec);
    if pads.len() != 2 * axes.len() {
        return Err(format!("pads {pads:?} has {} entries for {} axes; expected two per axis", pads.len(), axes.len()));
    }
    let (mut begin, mut end) = ([0i64; RANK], [0i64; RANK]);
    for (i, &axis) in axes.iter().enumerate() {
        let resolved = if axis < 0 { axis + RANK as i64 } else { axis };
        let Some(slot) = usize::try_from(resolved).ok().filter(|&a| a < RANK) else {
            return Err(format!("axis {axis} is out of range for a rank-4 tensor"));
        };
        begin[slot] = pads[i];
        end[slot] = pads[i + axes.len()];
    }
    if begin[..2].iter().chain(&end[..2]).any(|&p| p != 0) {
        return Err(format!(
            "pads {pads:?} pad the batch or channel axis; isonn pads only height and width"
        ));
    }
    let sides = [begin[2], end[2], begin[3], end[3]];
    if sides.iter().any(|&p| p < 0) {
        return Err(format!("pads {pads:?} are negative, which crops the image; isonn has no cropping layer"));
    }
    if sides.iter().any(|&p| p != sides[0]) {
        return Err(format!(
            "pads {pads:?} differ between sides (height {} before, {} after; width {} before, {} \
             after); isonn's convolutions and pools pad all four sides equally, so pad \
             symmetrically (nn.ZeroPad2d(p) or padding=p)",
            sides[0], sides[1], sides[2], sides[3]
        ));
    }
    usize::try_from(sides[0]).map_err(|_| format!("pads {pads:?} are too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_pads_are_read() {
        assert_eq!(symmetric_spatial_padding(&[0, 0, 2, 2, 0, 0, 2, 2], None), Ok(2));
        assert_eq!(symmetric_spatial_padding(&[1, 1, 1, 1], Some(&[2, -1])), Ok(1));
        assert_eq!(symmetric_spatial_padding(&[0; 8], None), Ok(0));
    }

    #[test]
    fn other_pads_are_rejected() {
        let asymmetric = symmetric_spatial_padding(&[0, 0, 1, 0, 0, 0, 1, 0], None).unwrap_err();
        assert!(asymmetric.contains("width 0 before, 0 after"), "{asymmetric}");
        let channel = symmetric_spatial_padding(&[0, 1, 0, 0, 0, 1, 0, 0], None).unwrap_err();
        assert!(channel.contains("channel axis"), "{channel}");
        let crop = symmetric_spatial_padding(&[0, 0, -1, -1, 0, 0, -1, -1], None).unwrap_err();
        assert!(crop.contains("crops"), "{crop}");
        let short = symmetric_spatial_padding(&[1, 1], None).unwrap_err();
        assert!(short.contains("two per axis"), "{short}");
    }
}
