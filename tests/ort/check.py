"""Check an ONNX file with onnx.checker and run it with ONNX Runtime.

Usage: check.py MODEL.onnx INPUTS.npy OUTPUTS.npy

Runs onnx.checker.check_model with full_check=True (which includes shape
inference), then runs the model on INPUTS (float32, fed to the graph's
only input) on the CPU and saves its only output as float32 to OUTPUTS.
Exits 1 with a message on any failure. The Rust test tests/onnx_export.rs
calls it and compares OUTPUTS with isonn's own forward pass.

Needs onnx, onnxruntime and numpy (.ci/run pins the versions).
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    model_path, inputs_path, outputs_path = sys.argv[1:]
    onnx.checker.check_model(model_path, full_check=True)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    (graph_output,) = session.get_outputs()
    inputs = np.load(inputs_path).astype(np.float32)
    (outputs,) = session.run([graph_output.name], {graph_input.name: inputs})
    np.save(outputs_path, np.ascontiguousarray(outputs, dtype=np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
