//! Evaluation of the shape operators that exporters apply to constants.
//!
//! PyTorch's TorchScript exporter writes the amounts of a `Pad` node as a
//! small computation on constants (`ConstantOfShape`, `Concat`, `Reshape`,
//! `Slice`, `Transpose`, `Cast`) rather than as one initializer. The
//! importer evaluates such nodes when every input is a constant, so the
//! `Pad` reads a plain constant.

use super::tensor::TensorData;

/// Largest number of values a folded constant may have. Shape
/// computations need a few dozen; the cap keeps a small hostile file from
/// asking `ConstantOfShape` for gigabytes.
pub const MAX_FOLDED_VALUES: usize = 1 << 16;

/// The operators [`fold`] evaluates.
pub const FOLDED_OPS: [&str; 6] = ["ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast"];

/// The attributes of a node that [`fold`] reads.
#[derive(Debug, Default)]
pub struct FoldAttributes {
    /// `Concat`'s `axis`.
    pub axis: i64,
    /// `Transpose`'s `perm`; empty for the default (reversed axes).
    pub perm: Vec<i64>,
    /// `ConstantOfShape`'s fill value (0 when absent).
    pub fill: f64,
    /// Whether `Cast` converts to an integer type, which truncates.
    pub cast_to_integer: bool,
}

/// Evaluates `op` on constant `inputs` (`None` for an absent optional
/// input). Errors name the invalid input or attribute.
pub fn fold(op: &str, inputs: &[Option<&TensorData>], attributes: &FoldAttributes) -> Result<TensorData, String> {
    let input = |i: usize| inputs.get(i).copied().flatten().ok_or_else(|| format!("input {i} is missing"));
    let out = match op {
        "ConstantOfShape" => {
            let dims = to_dims(&input(0)?.values)?;
            let count = element_count(&dims)?;
            TensorData { dims, values: vec![attributes.fill; count] }
        }
        "Concat" => concat(inputs, attributes.axis)?,
        "Reshape" => reshape(input(0)?, &input(1)?.values)?,
        "Slice" => slice(input(0)?, inputs)?,
        "Transpose" => transpose(input(0)?, &attributes.perm)?,
        "Cast" => {
            let x = input(0)?;
            let values = if attributes.cast_to_integer { x.values.iter().map(|v| v.trunc()).collect() } else { x.values.clone() };
            TensorData { dims: x.dims.clone(), values }
        }
        _ => return Err(format!("{op} is not a foldable operator")),
    };
    Ok(out)
}

fn to_dims(values: &[f64]) -> Result<Vec<usize>, String> {
    values
        .iter()
        .map(|&v| if v >= 0.0 && v.fract() == 0.0 && v <= MAX_FOLDED_VALUES as f64 { Ok(v as usize) } else { Err(format!("invalid dimension {v}")) })
        .collect()
}

fn element_count(dims: &[usize]) -> Result<usize, String> {
    let count = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).unwrap_or(usize::MAX);
    if count > MAX_FOLDED_VALUES {
        return Err(format!(
            "the constant of shape {dims:?} has more than {MAX_FOLDED_VALUES} values, more than a shape computation needs"
        ));
    }
    Ok(count)
}

/// Resolves a possibly negative axis of a rank-`rank` tensor.
fn resolve_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let resolved = if axis < 0 { axis + rank as i64 } else { axis };
    if (0..rank as i64).contains(&resolved) {
        Ok(resolved as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

/// Row-major strides of `dims`.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

/// Returns the multi-index of flat position `flat` in a tensor of `dims`.
fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for i in (0..dims.len()).rev() {
        index[i] = flat % dims[i].max(1);
        flat /= dims[i].max(1);
    }
    index
}

fn concat(inputs: &[Option<&TensorData>], axis: i64) -> Result<TensorData, String> {
    let parts: Vec<&TensorData> = inputs.iter().copied().collect::<Option<_>>().ok_or("an input is missing")?;
    let first = parts.first().ok_or("Concat has no inputs")?;
    let axis = resolve_axis(axis, first.dims.len())?;
    let mut dims = first.dims.clone();
    dims[axis] = 0;
    for part in &parts {
        let same_rest = part.dims.len() == first.dims.len()
            && part.dims.iter().zip(&first.dims).enumerate().all(|(i, (a, b))| i == axis || a == b);
        if !same_rest {
            return Err(format!("inputs of shapes {:?} and {:?} differ outside axis {axis}", first.dims, part.dims));
        }
        dims[axis] = dims[axis].checked_add(part.dims[axis]).ok_or("the result has too many values")?;
    }
    element_count(&dims)?;
    // Each part contributes blocks of dims[axis..] per index of the
    // leading axes.
    let outer: usize = dims[..axis].iter().product();
    let mut values = Vec::new();
    for o in 0..outer {
        for part in &parts {
            let block: usize = part.dims[axis..].iter().product();
            values.extend_from_slice(&part.values[o * block..(o + 1) * block]);
        }
    }
    Ok(TensorData { dims, values })
}

fn reshape(x: &TensorData, shape: &[f64]) -> Result<TensorData, String> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut inferred = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            -1.0 if inferred.is_none() => {
                inferred = Some(i);
                dims.push(1);
            }
            0.0 => dims.push(*x.dims.get(i).ok_or_else(|| format!("shape {shape:?} copies dimension {i}, which the input lacks"))?),
            s if s >= 1.0 && s.fract() == 0.0 && s <= MAX_FOLDED_VALUES as f64 => dims.push(s as usize),
            _ => return Err(format!("invalid target shape {shape:?}")),
        }
    }
    let known = element_count(&dims)?;
    if let Some(i) = inferred {
        if known == 0 || x.values.len() % known != 0 {
            return Err(format!("shape {shape:?} does not fit {} values", x.values.len()));
        }
        dims[i] = x.values.len() / known;
    }
    if element_count(&dims)? != x.values.len() {
        return Err(format!("shape {shape:?} does not fit {} values", x.values.len()));
    }
    Ok(TensorData { dims, values: x.values.clone() })
}

/// Evaluates `Slice(data, starts, ends, axes, steps)` (opset 10 and later).
fn slice(x: &TensorData, inputs: &[Option<&TensorData>]) -> Result<TensorData, String> {
    let list = |i: usize| inputs.get(i).copied().flatten().map(|t| t.values.iter().map(|&v| v as i64).collect::<Vec<i64>>());
    let starts = list(1).ok_or("starts (input 1) is missing")?;
    let ends = list(2).ok_or("ends (input 2) is missing")?;
    let rank = x.dims.len();
    let axes = list(3).unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = list(4).unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    // Per axis: first index, step, count.
    let mut ranges: Vec<(i64, i64, usize)> = x.dims.iter().map(|&d| (0, 1, d)).collect();
    for (((&start, &end), &axis), &step) in starts.iter().zip(&ends).zip(&axes).zip(&steps) {
        let axis = resolve_axis(axis, rank)?;
        let d = x.dims[axis] as i64;
        if step == 0 {
            return Err("a step of 0".into());
        }
        let clamp = |v: i64, lo: i64, hi: i64| {
            let v = if v < 0 { v.saturating_add(d) } else { v };
            v.clamp(lo, hi)
        };
        if d == 0 {
            ranges[axis] = (0, step, 0);
            continue;
        }
        let (first, last) = if step > 0 { (clamp(start, 0, d), clamp(end, 0, d)) } else { (clamp(start, 0, d - 1), clamp(end, -1, d - 1)) };
        let span = if step > 0 { last - first } else { first - last };
        // unsigned_abs: a step of i64::MIN has no positive i64 magnitude.
        let count = if span <= 0 { 0 } else { ((span as u64 - 1) / step.unsigned_abs() + 1) as usize };
        ranges[axis] = (first, step, count);
    }
    let dims: Vec<usize> = ranges.iter().map(|r| r.2).collect();
    let count = element_count(&dims)?;
    let source = strides(&x.dims);
    let values = (0..count)
        .map(|flat| {
            let index = unravel(flat, &dims);
            let offset: i64 = index.iter().zip(&ranges).zip(&source).map(|((&i, r), &s)| (r.0 + i as i64 * r.1) * s as i64).sum();
            x.values[offset as usize]
        })
        .collect();
    Ok(TensorData { dims, values })
}

fn transpose(x: &TensorData, perm: &[i64]) -> Result<TensorData, String> {
    let rank = x.dims.len();
    let perm: Vec<usize> = if perm.is_empty() {
        (0..rank).rev().collect()
    } else {
        perm.iter().map(|&p| resolve_axis(p, rank)).collect::<Result<_, _>>()?
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..rank).collect::<Vec<_>>() {
        return Err(format!("perm {perm:?} is not a permutation of {rank} axes"));
    }
    let dims: Vec<usize> = perm.iter().map(|&p| x.dims[p]).collect();
    let source = strides(&x.dims);
    let values = (0..x.values.len())
        .map(|flat| {
            let index = unravel(flat, &dims);
            let offset: usize = index.iter().zip(&perm).map(|(&i, &p)| i * source[p]).sum();
            x.values[offset]
        })
        .collect();
    Ok(TensorData { dims, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dims: &[usize], values: &[f64]) -> TensorData {
        TensorData { dims: dims.to_vec(), values: values.to_vec() }
    }

    /// The pads computation of the TorchScript exporter (opset 13) for
    /// `F.pad(x, (1, 2, 3, 4))` on a rank-4 input, evaluated step by step.
    #[test]
    fn torchscript_pads_chain_folds() {
        let none = FoldAttributes::default();
        let zeros = fold("ConstantOfShape", &[Some(&t(&[1], &[4.0]))], &none).unwrap();
        let axis0 = FoldAttributes { axis: 0, ..Default::default() };
        let pads = fold("Concat", &[Some(&t(&[4], &[1.0, 2.0, 3.0, 4.0])), Some(&zeros)], &axis0).unwrap();
        let pairs = fold("Reshape", &[Some(&pads), Some(&t(&[2], &[-1.0, 2.0]))], &none).unwrap();
        assert_eq!(pairs.dims, vec![4, 2]);
        let reversed = fold(
            "Slice",
            &[Some(&pairs), Some(&t(&[1], &[-1.0])), Some(&t(&[1], &[-9.2e18])), Some(&t(&[1], &[0.0])), Some(&t(&[1], &[-1.0]))],
            &none,
        )
        .unwrap();
        assert_eq!(reversed.values, vec![0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 1.0, 2.0]);
        let transposed = fold("Transpose", &[Some(&reversed)], &FoldAttributes { perm: vec![1, 0], ..Default::default() }).unwrap();
        let flat = fold("Reshape", &[Some(&transposed), Some(&t(&[1], &[-1.0]))], &none).unwrap();
        // ONNX order: begins of n, c, h, w, then ends.
        assert_eq!(flat.values, vec![0.0, 0.0, 3.0, 1.0, 0.0, 0.0, 4.0, 2.0]);
    }

    /// Inputs a damaged file can give: an empty axis, extreme steps and
    /// dimensions whose sum overflows. Each is a result, not a panic.
    #[test]
    fn extreme_inputs_do_not_panic() {
        let none = FoldAttributes::default();
        let empty = t(&[0], &[]);
        let reversed = fold("Slice", &[Some(&empty), Some(&t(&[1], &[-1.0])), Some(&t(&[1], &[-1e19])), None, Some(&t(&[1], &[-1.0]))], &none);
        assert_eq!(reversed.unwrap().dims, vec![0]);
        let values = t(&[4], &[1.0, 2.0, 3.0, 4.0]);
        let huge_step = fold("Slice", &[Some(&values), Some(&t(&[1], &[0.0])), Some(&t(&[1], &[4.0])), None, Some(&t(&[1], &[-1e19]))], &none);
        assert_eq!(huge_step.unwrap().values, Vec::<f64>::new());
        let forward = fold("Slice", &[Some(&values), Some(&t(&[1], &[0.0])), Some(&t(&[1], &[4.0])), None, Some(&t(&[1], &[1e19]))], &none);
        assert_eq!(forward.unwrap().values, vec![1.0]);
        let wide = t(&[0, usize::MAX / 2 + 1], &[]);
        let axis1 = FoldAttributes { axis: 1, ..Default::default() };
        let overflow = fold("Concat", &[Some(&wide), Some(&wide)], &axis1).unwrap_err();
        assert!(overflow.contains("too many values"), "{overflow}");
    }

    #[test]
    fn huge_constant_of_shape_is_rejected() {
        let error = fold("ConstantOfShape", &[Some(&t(&[2], &[65536.0, 65536.0]))], &FoldAttributes::default()).unwrap_err();
        assert!(error.contains("more than 65536 values"), "{error}");
    }
}
