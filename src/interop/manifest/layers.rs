//! Reading and checking the layers of a manifest and their tensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::{ActivationSpec, AffineSpec, ManifestLayer, ROUTE_COMPLEMENT};
use crate::nonneg::{AffineOp, NonnegAffine, NonnegElman, NonnegLayer, NonnegResidual};

/// Reads manifest layers, taking their tensors out of `tensors`.
pub(super) struct LayerReader<'a> {
    /// The file's schema version; layers of a later version are errors.
    pub(super) version: u32,
    pub(super) tensors: &'a mut HashMap<String, Tensor>,
    pub(super) tensors_path: &'a Path,
}

impl LayerReader<'_> {
    /// Reads and checks `layers`; errors start with their path, `{at}[i]`.
    pub(super) fn read_layers(&mut self, layers: &[ManifestLayer], at: &str) -> std::result::Result<Vec<NonnegLayer>, String> {
        layers
            .iter()
            .enumerate()
            .map(|(i, layer)| self.read_layer(layer).map_err(|m| format!("{at}[{i}]: {m}")))
            .collect()
    }

    fn read_layer(&mut self, layer: &ManifestLayer) -> std::result::Result<NonnegLayer, String> {
        if layer.min_version() > self.version {
            return Err(format!(
                "this layer type needs schema_version {}, but the file has {}",
                layer.min_version(),
                self.version
            ));
        }
        let path = self.tensors_path;
        Ok(match layer {
            ManifestLayer::Linear { name, affine, .. } => NonnegLayer::Affine(read_affine(name, affine, AffineOp::Linear, Vec::new(), self.tensors, path)?),
            ManifestLayer::Conv2d { name, stride, padding, dilation, groups, pad, affine, .. } => {
                let op = AffineOp::Conv2d { stride: *stride, padding: *padding, dilation: *dilation, groups: *groups };
                NonnegLayer::Affine(read_affine(name, affine, op, pad.clone(), self.tensors, path)?)
            }
            ManifestLayer::Conv1d { name, kernel, stride, padding, dilation, groups, pad, affine } => {
                let op = AffineOp::Conv1d { stride: *stride, padding: *padding, dilation: *dilation, groups: *groups };
                let a = read_affine(name, affine, op, pad.clone(), self.tensors, path)?;
                if a.positive.dims()[2] != *kernel {
                    return Err(format!("{name}: kernel {kernel} does not match the weights {:?}", a.positive.dims()));
                }
                NonnegLayer::Affine(a)
            }
            ManifestLayer::Activation { activation, input_offset, output_offset, output_range } => {
                let spec = ActivationSpec { activation: activation.clone(), input_offset: *input_offset, output_offset: *output_offset, output_range: *output_range };
                NonnegLayer::Activation(spec.read()?)
            }
            ManifestLayer::AvgPool2d { pool } => NonnegLayer::AvgPool2d(*pool),
            ManifestLayer::MaxPool2d { pool } => NonnegLayer::MaxPool2d(*pool),
            ManifestLayer::PaddedAvgPool2d { pool, pad } => NonnegLayer::PaddedAvgPool2d { pool: *pool, pad: pad.clone() },
            ManifestLayer::Flatten => NonnegLayer::Flatten,
            ManifestLayer::GlobalAvgPool => NonnegLayer::GlobalAvgPool,
            ManifestLayer::AdaptiveAvgPool2d { size } => NonnegLayer::AdaptiveAvgPool2d(*size),
            ManifestLayer::Dropout { p } => NonnegLayer::Dropout(*p),
            ManifestLayer::Residual { main, shortcut } => {
                if main.is_empty() {
                    return Err("a residual block needs at least one layer in main".into());
                }
                NonnegLayer::Residual(NonnegResidual {
                    main: self.read_layers(main, "main")?,
                    shortcut: self.read_layers(shortcut, "shortcut")?,
                })
            }
            ManifestLayer::Elman { name, features, hidden, initial_state, state, affine } => {
                let a = read_affine(name, affine, AffineOp::Linear, Vec::new(), self.tensors, path)?;
                if a.positive.dims() != [*hidden, features + hidden] {
                    return Err(format!(
                        "{name}: weights {:?} do not fit {features} features and {hidden} state values; expected [{hidden}, {}]",
                        a.positive.dims(),
                        features + hidden
                    ));
                }
                if !initial_state.is_finite() {
                    return Err(format!("{name}: initial_state {initial_state} must be finite"));
                }
                NonnegLayer::Elman(NonnegElman { affine: a, activation: state.read()?, initial_state: *initial_state })
            }
        })
    }
}

/// Takes and checks the tensors of one affine layer.
fn read_affine(
    name: &str,
    spec: &AffineSpec,
    op: AffineOp,
    pad: Vec<f64>,
    tensors: &mut HashMap<String, Tensor>,
    path: &Path,
) -> std::result::Result<NonnegAffine, String> {
    let mut take = |part: &str| tensors.remove(&format!("{name}.{part}")).ok_or_else(|| format!("tensor {name}.{part} is missing from {}", path.display()));
    let (positive, negative, bias, routing) = (take("positive")?, take("negative")?, take("bias")?, take("routing")?);

    for (part, t) in [("positive", &positive), ("negative", &negative), ("bias", &bias)] {
        if t.dtype() != DType::F32 {
            return Err(format!("tensor {name}.{part} is {:?}; expected f32", t.dtype()));
        }
        let values = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string())?;
        if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(format!("tensor {name}.{part} contains {v}; every weight and bias must be finite and >= 0"));
        }
    }
    let rank = match op {
        AffineOp::Linear => 2,
        AffineOp::Conv2d { .. } => 4,
        AffineOp::Conv1d { .. } => 3,
    };
    if positive.rank() != rank || negative.dims() != positive.dims() || routing.dims() != positive.dims() {
        return Err(format!(
            "{name}: positive {:?}, negative {:?} and routing {:?} must have one shape of rank {rank}",
            positive.dims(),
            negative.dims(),
            routing.dims()
        ));
    }
    if bias.dims() != [positive.dims()[0]] {
        return Err(format!("{name}.bias has shape {:?}; expected [{}]", bias.dims(), positive.dims()[0]));
    }

    let expected = positive
        .gt(0.0)
        .and_then(|p| p.to_dtype(DType::U8))
        .and_then(|p| p.add(&negative.gt(0.0)?.to_dtype(DType::U8)?.affine(ROUTE_COMPLEMENT as f64, 0.0)?))
        .map_err(|e| e.to_string())?;
    let routing_matches = routing.dtype() == DType::U8
        && expected.eq(&routing).and_then(|m| m.to_dtype(DType::F32)?.min_all()?.to_scalar::<f32>()).map_err(|e| e.to_string())? == 1.0;
    if !routing_matches {
        return Err(format!(
            "{name}.routing must be u8 with 1 where positive > 0, 2 where negative > 0 and 3 where both are"
        ));
    }

    let inputs = positive.dims()[1];
    let lengths_ok = |v: &[f64]| !v.is_empty() && v.iter().all(|x| x.is_finite());
    if !lengths_ok(&spec.lo) || !lengths_ok(&spec.alpha) || spec.alpha.iter().any(|&a| a < 0.0) {
        return Err(format!("{name}: lo and alpha must be non-empty lists of finite values, alpha >= 0"));
    }
    if rank == 2 && [spec.lo.len(), spec.alpha.len()].iter().any(|&n| n != 1 && n != inputs) {
        return Err(format!("{name}: lo and alpha need one value or {inputs}"));
    }
    if !(spec.shift.is_finite() && spec.shift >= 0.0) {
        return Err(format!("{name}: shift {} must be finite and >= 0", spec.shift));
    }
    Ok(NonnegAffine {
        op,
        positive,
        negative,
        bias,
        lo: spec.lo.clone(),
        alpha: spec.alpha.clone(),
        shift: spec.shift,
        out_max: spec.output_range.hi,
        pad,
    })
}
