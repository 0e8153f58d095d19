"""A real ONNX model whose input decides how long it runs: tests of deadlines and circuit breakers.

Input "work" (FP32, rows x 1, 0 to 1e9 by its manifest) is the number of iterations of an ONNX Loop
(about 1.5 µs each here): 0 answers at once, 1e9 runs for about half an hour unless stopped. The
answer is [0.5, 0.5] for every row. Nothing in it is a test double: onnxruntime runs the graph as
it runs any served model, and stops it only through `RunOptions.terminate`.
"""

from __future__ import annotations

from pathlib import Path

from bastion.manifest import InputSpec, Manifest, OutputSpec, write_manifest

FAST = 0.0
HANG = 1e9


def slow_model_bytes() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    nodes = [
        helper.make_node("ReduceMax", ["work"], ["most"], keepdims=0),
        helper.make_node("Cast", ["most"], ["trips"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trips", "true", "zero"], ["counted"], body=body),
        # The answer depends on the loop's result, so no optimiser can drop the loop.
        helper.make_node("Mul", ["counted", "zero"], ["nothing"]),
        helper.make_node("Mul", ["work", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "nothing"], ["still_zeros"]),
        helper.make_node("Add", ["still_zeros", "half"], ["p"]),
        helper.make_node("Concat", ["p", "p"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("work", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [
            helper.make_tensor("true", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnxruntime 1.16+ reads it
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def slow_manifest(name: str = "slow") -> Manifest:
    return Manifest(
        name=name,
        version="1",
        runtime="onnx",
        file="model.onnx",
        inputs=[InputSpec(name="work", datatype="FP32", shape=[-1, 1], min=0.0, max=HANG)],
        outputs=OutputSpec(classes=["a", "b"]),
        description="A model whose input sets its running time (tests of deadlines)",
    )


def write_slow_model(model_dir: Path, name: str = "slow") -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.onnx").write_bytes(slow_model_bytes())
    write_manifest(model_dir, slow_manifest(name))


def slow_request(work: float, rows: int = 1) -> dict[str, object]:
    return {"inputs": [{"name": "work", "datatype": "FP32", "shape": [rows, 1], "data": [work] * rows}]}
