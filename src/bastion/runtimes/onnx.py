"""ONNX models through onnxruntime (CPU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bastion.breaker import Cancel
from bastion.errors import ModelLoadError
from bastion.manifest import Manifest

_ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


class OnnxRuntime:
    def __init__(
        self, session: ort.InferenceSession, input_names: list[str], output: str, width: int
    ) -> None:
        self._session = session
        self._input_names = input_names
        self._output = output
        self._width = width

    @classmethod
    def load(cls, path: Path, data: bytes, manifest: Manifest) -> OnnxRuntime:
        """`path` names the model in errors; the bytes are what is loaded (never written to disk)."""
        options = ort.SessionOptions()
        # One request at a time per core is the serving pattern here; avoid thread oversubscription.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"{path}: not a loadable ONNX model: {type(e).__name__}") from None
        model_inputs = {i.name: i for i in session.get_inputs()}
        for spec in manifest.inputs:
            node = model_inputs.get(spec.name)
            if node is None:
                raise ModelLoadError(
                    f"{path}: manifest input {spec.name!r} is not an input of the model "
                    f"(model inputs: {', '.join(model_inputs)})"
                )
            dtype = _ORT_TO_V2.get(node.type)
            if dtype != spec.datatype:
                raise ModelLoadError(
                    f"{path}: input {spec.name!r} is {node.type} in the model but {spec.datatype} in the manifest"
                )
            if len(node.shape) != len(spec.shape) or any(
                isinstance(m, int) and m != s for m, s in zip(node.shape, spec.shape, strict=True)
            ):
                raise ModelLoadError(
                    f"{path}: input {spec.name!r} has shape {node.shape} in the model but "
                    f"{spec.shape} in the manifest"
                )
        missing = set(model_inputs) - {s.name for s in manifest.inputs}
        if missing:
            raise ModelLoadError(
                f"{path}: model inputs missing from the manifest: {', '.join(sorted(missing))}"
            )
        floats = [o for o in session.get_outputs() if o.type in ("tensor(float)", "tensor(double)")]
        what = "value" if manifest.outputs.is_regression else "probability"
        if not floats:
            raise ModelLoadError(f"{path}: the model has no float {what} output")
        columns = floats[0].shape[-1] if len(floats[0].shape) > 1 else 1
        if isinstance(columns, int) and columns != manifest.outputs.width:
            raise ModelLoadError(
                f"{path}: the model's {what} output {floats[0].name!r} has {columns} columns "
                f"but the manifest declares {manifest.outputs.width}"
            )
        return cls(session, [s.name for s in manifest.inputs], floats[0].name, manifest.outputs.width)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        (out,) = self._session.run([self._output], {n: inputs[n] for n in self._input_names})
        return np.asarray(out).reshape(-1, self._width)

    def stoppable(self, inputs: dict[str, np.ndarray]) -> tuple[Callable[[], np.ndarray], Cancel]:
        """`predict` as a call another thread can stop (the deadline): onnxruntime checks
        `RunOptions.terminate` between nodes and loop iterations, and the stopped run raises."""
        options = ort.RunOptions()
        options.log_severity_level = 4  # a stopped run is the deadline's doing, not an error to log
        feeds = {n: inputs[n] for n in self._input_names}

        def run() -> np.ndarray:
            (out,) = self._session.run([self._output], feeds, options)
            return np.asarray(out).reshape(-1, self._width)

        def stop() -> None:
            options.terminate = True

        return run, Cancel(stop)
