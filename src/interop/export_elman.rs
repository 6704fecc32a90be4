//! Export of Elman cells as graphs unrolled over the time steps.
//!
//! A cell reads a sample `[channels, steps, width]` as `steps` vectors of
//! `channels * width` features. The graph makes them with `Transpose`,
//! `Reshape` and one `Gather` per step (`{layer}/step{t}/x`), then repeats
//! the cell's nodes once per step under `{layer}/step{t}/`, all steps
//! reading the same weight initializers. ONNX's `RNN` operator is not
//! used: it has no bounded activations such as ReLU-N or the photonic
//! ones, and the unrolled graph exports every cell the same way.

use super::export::{activation_nodes, affine_initializers, affine_nodes, nonneg_activation, values_f32};
use super::graph::{int, ints, GraphBuilder};
use super::tensor::int64_tensor;
use crate::error::{Error, Result};
use crate::model::Elman;
use crate::nonneg::NonnegElman;

/// Adds the regular cell `h_t = f(W_x x_t + b + W_h h_{t-1})`, `h_0 = 0`,
/// reading `x` of one-sample shape `shape`; returns the last state.
/// The first step leaves out `W_h h_0`, which is 0.
pub(super) fn regular_elman(graph: &mut GraphBuilder, name: &str, x: &str, cell: &Elman, shape: &[usize]) -> Result<String> {
    let steps = sequence_steps(graph, name, x, shape)?;
    let tensor = |graph: &mut GraphBuilder, part: &str, t: &candle_core::Tensor| -> Result<String> {
        Ok(graph.initializer(&format!("{name}.{part}"), t.dims(), &values_f32(t)?))
    };
    let input_weight = tensor(graph, "input_weight", &cell.input_weight)?;
    let recurrent_weight = tensor(graph, "recurrent_weight", &cell.recurrent_weight)?;
    let bias = tensor(graph, "bias", &cell.bias)?;

    let mut state: Option<String> = None;
    for (t, x_t) in steps.iter().enumerate() {
        let step = format!("{name}/step{t}");
        let transposed = vec![int("transB", 1)];
        let input = graph.node("Gemm", &format!("{step}/input"), &[x_t, &input_weight, &bias], transposed.clone());
        let z = match &state {
            None => input,
            Some(h) => {
                let recurrent = graph.node("Gemm", &format!("{step}/recurrent"), &[h, &recurrent_weight], transposed);
                graph.node("Add", &format!("{step}/sum"), &[&input, &recurrent], vec![])
            }
        };
        state = Some(activation_nodes(graph, &step, &z, &cell.activation)?);
    }
    Ok(state.expect("sequence_steps returns at least one step"))
}

/// Adds the non-negative cell: per step the affine layer reads
/// `[u_t; v]`, the step's physical input and the physical state, and the
/// activation device gives the next state. The state starts at the
/// physical value of `h_0 = 0`, `{layer}.initial_state`, expanded to
/// `[batch, hidden]` by `{layer}/initial_state`.
pub(super) fn nonneg_elman(graph: &mut GraphBuilder, name: &str, v: &str, cell: &NonnegElman, shape: &[usize]) -> Result<String> {
    let steps = sequence_steps(graph, name, v, shape)?;
    let initializers = affine_initializers(graph, &format!("{name}.affine"), &cell.affine, 1)?;

    // [batch, hidden] from the first step's [batch, features].
    let step_shape = graph.node("Shape", &format!("{name}/step_shape"), &[&steps[0]], vec![]);
    let zero = graph.tensor(int64_tensor(&format!("{name}/batch.start"), &[0]));
    let one = graph.tensor(int64_tensor(&format!("{name}/batch.end"), &[1]));
    let batch = graph.node("Slice", &format!("{name}/batch"), &[&step_shape, &zero, &one], vec![]);
    let hidden = graph.tensor(int64_tensor(&format!("{name}/state_shape.hidden"), &[cell.hidden() as i64]));
    let state_shape = graph.node("Concat", &format!("{name}/state_shape"), &[&batch, &hidden], vec![int("axis", 0)]);
    let initial = graph.scalar(&format!("{name}.initial_state"), cell.initial_state);
    let mut state = graph.node("Expand", &format!("{name}/initial_state"), &[&initial, &state_shape], vec![]);

    let inputs = [cell.features() + cell.hidden()];
    for (t, u_t) in steps.iter().enumerate() {
        let step = format!("{name}/step{t}");
        let u = graph.node("Concat", &format!("{step}/concat"), &[u_t, &state], vec![int("axis", 1)]);
        let z = affine_nodes(graph, &step, &u, &cell.affine, &initializers, &inputs)?;
        state = nonneg_activation(graph, &step, &z, &cell.activation)?;
    }
    Ok(state)
}

/// Splits `x` (`[batch, channels, steps, width]`) into its time steps, each
/// `[batch, channels * width]`, as `crate::model::sequence` does.
fn sequence_steps(graph: &mut GraphBuilder, name: &str, x: &str, shape: &[usize]) -> Result<Vec<String>> {
    let [channels, steps, width] = shape[..] else {
        return Err(Error::interop(name, format!("an Elman cell reads [channels, steps, width] signals, not {shape:?}")));
    };
    if steps == 0 {
        return Err(Error::interop(name, "the Elman cell's input has no time steps"));
    }
    let time_major = graph.node("Transpose", &format!("{name}/time_major"), &[x], vec![ints("perm", &[0, 2, 1, 3])]);
    // 0 copies the batch size.
    let target = graph.tensor(int64_tensor(&format!("{name}/sequence.shape"), &[0, steps as i64, (channels * width) as i64]));
    let sequence = graph.node("Reshape", &format!("{name}/sequence"), &[&time_major, &target], vec![]);
    let mut out = Vec::with_capacity(steps);
    for t in 0..steps {
        let mut index = int64_tensor(&format!("{name}/step{t}/x.index"), &[t as i64]);
        index.dims.clear(); // a scalar index drops the step axis
        let index = graph.tensor(index);
        out.push(graph.node("Gather", &format!("{name}/step{t}/x"), &[&sequence, &index], vec![int("axis", 1)]));
    }
    Ok(out)
}
