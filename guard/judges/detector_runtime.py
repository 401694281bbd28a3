"""Where the builtin judge's NudeNet model runs: ONNX Runtime or OpenVINO, on the CPU.

Both take the same ONNX file and the same input blobs (n, 3, 320, 320) and give the same output
(n, 4 + classes, 2100). They differ in cost and in exactness:

- `onnxruntime`, float32: NudeNet's own runtime; scores match NudeNet's pipeline to 1e-3.
- `openvino`, float32: the same scores as ONNX Runtime (to 1e-6), at about the same cost.
- `openvino`, bfloat16 (the `auto` precision on a CPU with native bfloat16, AVX512-BF16 or
  AMX): about half the inference cost; detection scores move by up to ~0.02 and boxes by a few
  pixels (benchmarks/builtin_image.py measures both on the same images).

Which one judged an image is in its trace (`details.detector`), so scores stay explicable.
"""

from __future__ import annotations

import importlib.util
import queue
from typing import Any, Literal, Protocol

from guard.support.errors import ConfigError

Runtime = Literal["auto", "onnxruntime", "openvino"]
Precision = Literal["auto", "f32", "bf16"]


class DetectorRuntime(Protocol):
    name: str  # "<runtime>/<precision>", as recorded in traces

    def run(self, blobs: Any) -> Any:
        """The model's raw output for a batch of blobs; safe to call from several threads."""


def open_runtime(path: str, runtime: Runtime = "auto", precision: Precision = "auto",
                 threads: int | None = None, streams: int = 2) -> DetectorRuntime:
    """The model at `path` on `runtime` (`auto`: OpenVINO where installed, else ONNX Runtime).
    `threads` per inference (default 1: the least CPU per image); `streams`: inferences that may
    run at once (the judge's worker threads)."""
    check_runtime(runtime, precision)
    if runtime == "auto":
        runtime = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    if runtime == "openvino":
        return _OpenVino(path, precision, threads or 1, streams)
    return _OnnxRuntime(path, threads or 1)


def check_runtime(runtime: Runtime, precision: Precision) -> None:
    """A ConfigError for a choice no CPU can run, before anything loads."""
    if runtime == "onnxruntime" and precision == "bf16":
        raise ConfigError("judge.precision: bf16 needs runtime: openvino (ONNX Runtime runs "
                          "NudeNet in f32 only)")


class _OnnxRuntime:
    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # All graph optimisations (ORT's default, stated here): the NCHWc layout and fused
        # activations save a third of the CPU time of the basic level.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One thread per inference spends the least CPU per image; concurrent calls run side by
        # side in the judge's worker threads.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spinning threads burn CPU while waiting for work; a guard shares its CPUs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.name = "onnxruntime/f32"

    def run(self, blobs: Any) -> Any:
        return self._session.run(None, {self._input: blobs})[0]


class _OpenVino:
    def __init__(self, path: str, precision: Precision, threads: int, streams: int) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ConfigError("judge.runtime: openvino is not installed "
                              "(pip install openvino), or use runtime: onnxruntime") from exc
        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in capabilities:
            raise ConfigError("judge.precision: bf16 needs a CPU with native bfloat16 "
                              "(AVX512-BF16 or AMX); this one has not: use auto or f32")
        wanted = precision if precision != "auto" else ("bf16" if "BF16" in capabilities
                                                         else "f32")
        self._model = core.compile_model(path, "CPU", {
            "INFERENCE_PRECISION_HINT": wanted,
            "NUM_STREAMS": streams,
            "INFERENCE_NUM_THREADS": threads * streams,
            # Each inference on its own core, no spinning threads between calls.
            "ENABLE_HYPER_THREADING": False,
        })
        got = str(self._model.get_property("INFERENCE_PRECISION_HINT"))
        self.name = "openvino/" + ("bf16" if "bf" in got.lower() else "f32")
        # An infer request runs one inference at a time; each call borrows one.
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def run(self, blobs: Any) -> Any:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._model.create_infer_request()
        try:
            return request.infer({0: blobs})[0].copy()  # the request's buffer is reused
        finally:
            self._requests.put(request)
