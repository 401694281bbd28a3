"""CPU cost of the builtin judge per 1024x1024 image, stage by stage, at batch 1 and 4.

    python benchmarks/builtin_image.py [--rounds 30] [--variants]

Stages are the judge's own code (guard.judges.builtin.NudityDetector): decode (`read`),
preprocessing (`prepare`: pad to a square, resize to 320x320, scale), NudeNet inference (`infer`,
per image of the batch), postprocess (`postprocess`: threshold, boxes, NMS), and prompt scoring
(the term matcher on a 40-word prompt); "judge() end to end" is BuiltinJudge.judge on a batch,
worker threads and verdicts included. Images: the benchmark's noisy 1024x1024 PNG
(benchmarks/fake_image_server.py) and the same pixels as a JPEG of quality 90.

CPU time is the process's (user + system, all threads; resource.getrusage), the median of
`--rounds` rounds in which every measurement takes its turn, so that a machine shared with
other work weighs on all of them alike. `--variants` adds the alternatives that were measured
for each stage: other decoders and reduced decoding, other resizing, ONNX Runtime options and
batch sizes; where a variant changes the model's input it prints how far the class scores move.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import openvino
from fake_image_server import make_png  # benchmarks/ is on sys.path when run as a script
from PIL import Image

from guard.core.policy import POLICIES_DIR, load_policy
from guard.core.terms import matcher_for
from guard.core.types import GeneratedImage, JudgeInput
from guard.judges.builtin import BuiltinJudge, NudityDetector

PROMPT = ("portrait of a woman standing in a sunlit meadow with wild flowers, holding a straw "
          "hat, golden hour, soft light, highly detailed, 8k, trending on artstation, by greg "
          "rutkowski and alphonse mucha, sharp focus, intricate, elegant, cinematic")


def cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1000


def measure(cases: dict[str, Callable[[], Any]], rounds: int,
            per: dict[str, int] | None = None) -> dict[str, float]:
    """Median CPU ms of each case (divided by its `per` count), the cases taking turns."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in cases.items():
            start = cpu_ms()
            fn()
            times[name].append((cpu_ms() - start) / (per or {}).get(name, 1))
    return {k: statistics.median(v) for k, v in times.items()}


def images() -> dict[str, bytes]:
    png = make_png(1024)
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, "JPEG", quality=90)
    return {"PNG": png, "JPEG": buf.getvalue()}


def stages(runtime: str, precision: str, data: dict[str, bytes], rounds: int) -> None:
    policy = load_policy(POLICIES_DIR / "default.yaml")
    matcher = matcher_for(policy)
    loop = asyncio.new_event_loop()
    det = NudityDetector(runtime=runtime, precision=precision)  # type: ignore[arg-type]
    judge = BuiltinJudge(runtime=runtime, precision=precision)  # type: ignore[arg-type]
    loop.run_until_complete(judge.start())

    def judged(items: list[JudgeInput]) -> Any:
        return loop.run_until_complete(judge.judge(items, policy))

    cases: dict[str, Callable[[], Any]] = {}
    per: dict[str, int] = {}
    for fmt, raw in data.items():
        mat = NudityDetector.read(raw)
        blob, w, h = NudityDetector.prepare(mat)
        out = det.infer(blob)[0]
        cases[f"{fmt} decode"] = partial(NudityDetector.read, raw)
        cases[f"{fmt} prep"] = partial(NudityDetector.prepare, mat)
        cases[f"{fmt} post"] = partial(NudityDetector.postprocess, out, w, h)
        for n in (1, 4):
            cases[f"{fmt} infer {n}"] = partial(det.infer, np.vstack([blob] * n))
            items = [JudgeInput(prompt=PROMPT, original_prompt=PROMPT,
                                image=GeneratedImage(data=raw))] * n
            cases[f"{fmt} judge {n}"] = partial(judged, items)
            per[f"{fmt} infer {n}"] = per[f"{fmt} judge {n}"] = n
    cases["prompt"] = lambda: matcher.scan(PROMPT)
    got = measure(cases, rounds, per)
    loop.run_until_complete(judge.aclose())
    loop.close()
    cols = [(fmt, n) for fmt in data for n in (1, 4)]
    print(f"\nNudeNet on {det.name} (runtime: {runtime}, precision: {precision})")
    print(f"{'CPU ms per image':<24}" + "".join(f"{f'{fmt} batch {n}':>14}" for fmt, n in cols))
    rows = [("decode", "decode"), ("preprocessing", "prep"), ("NudeNet inference", "infer"),
            ("postprocess", "post"), ("prompt scoring", None)]
    totals = dict.fromkeys(cols, 0.0)
    for label, key in rows:
        line = f"{label:<24}"
        for fmt, n in cols:
            value = got["prompt"] if key is None else got[
                f"{fmt} {key} {n}" if key == "infer" else f"{fmt} {key}"]
            totals[fmt, n] += value
            line += f"{value:>14.2f}"
        print(line)
    print(f"{'total':<24}" + "".join(f"{totals[c]:>14.2f}" for c in cols))
    print(f"{'judge() end to end':<24}"
          + "".join(f"{got[f'{fmt} judge {n}']:>14.2f}" for fmt, n in cols))


def _session(**options: Any) -> ort.InferenceSession:
    import nudenet

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = options.get("threads", 1)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = options.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if options.get("daz"):
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.enable_cpu_mem_arena = options.get("arena", True)
    if options.get("parallel"):
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    path = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _blob(mat: Any) -> Any:
    return cv2.dnn.blobFromImage(mat, 1 / 255.0, (320, 320), (0, 0, 0), swapRB=True, crop=False)


def variants(det: NudityDetector, data: dict[str, bytes], rounds: int) -> None:
    png, jpg = (np.frombuffer(data[k], np.uint8) for k in ("PNG", "JPEG"))
    mat = NudityDetector.read(data["PNG"])

    def pil(raw: bytes, draft: bool = False) -> Any:
        im = Image.open(io.BytesIO(raw))
        if draft:
            im.draft("RGB", (320, 320))
        return np.asarray(im.convert("RGB"))[:, :, ::-1]

    decoders: dict[str, Callable[[], Any]] = {
        "PNG cv2.imdecode (used)": lambda: cv2.imdecode(png, cv2.IMREAD_COLOR),
        "PNG cv2 IMREAD_REDUCED_COLOR_2": lambda: cv2.imdecode(png, cv2.IMREAD_REDUCED_COLOR_2),
        "PNG PIL": lambda: pil(data["PNG"]),
        "JPEG cv2.imdecode (used)": lambda: cv2.imdecode(jpg, cv2.IMREAD_COLOR),
        "JPEG cv2 IMREAD_REDUCED_COLOR_2": lambda: cv2.imdecode(jpg, cv2.IMREAD_REDUCED_COLOR_2),
        "JPEG cv2 IMREAD_REDUCED_COLOR_4": lambda: cv2.imdecode(jpg, cv2.IMREAD_REDUCED_COLOR_4),
        "JPEG PIL draft (DCT scaling)": lambda: pil(data["JPEG"], draft=True),
    }
    prep: dict[str, Callable[[], Any]] = {
        "prepare (used; no pad copy)": lambda: NudityDetector.prepare(mat),
        "pad copy + blobFromImage": lambda: _blob(cv2.copyMakeBorder(mat, 0, 0, 0, 0,
                                                                     cv2.BORDER_CONSTANT)),
        "INTER_AREA to 320 + blob": lambda: _blob(cv2.resize(mat, (320, 320),
                                                             interpolation=cv2.INTER_AREA)),
    }
    ref = det.infer(_blob(mat))[0, 4:]
    jref = det.infer(_blob(cv2.imdecode(jpg, cv2.IMREAD_COLOR)))[0, 4:]

    def moved(pixels: Any, against: Any) -> str:
        diff = np.abs(det.infer(_blob(np.ascontiguousarray(pixels)))[0, 4:] - against).max()
        return f"class scores move up to {diff:.3f}"

    notes = {
        "PNG cv2 IMREAD_REDUCED_COLOR_2": moved(cv2.imdecode(png, cv2.IMREAD_REDUCED_COLOR_2),
                                                ref),
        "JPEG cv2 IMREAD_REDUCED_COLOR_2": moved(cv2.imdecode(jpg, cv2.IMREAD_REDUCED_COLOR_2),
                                                 jref),
        "JPEG cv2 IMREAD_REDUCED_COLOR_4": moved(cv2.imdecode(jpg, cv2.IMREAD_REDUCED_COLOR_4),
                                                 jref),
        "JPEG PIL draft (DCT scaling)": moved(pil(data["JPEG"], draft=True), jref),
        "INTER_AREA to 320 + blob": moved(cv2.resize(mat, (320, 320),
                                                     interpolation=cv2.INTER_AREA), ref),
    }
    level = ort.GraphOptimizationLevel
    sessions = {
        "ORT all optimisations, 1 thread": _session(),
        "ORT basic optimisations": _session(level=level.ORT_ENABLE_BASIC),
        "ORT extended optimisations": _session(level=level.ORT_ENABLE_EXTENDED),
        "ORT 2 intra-op threads": _session(threads=2),
        "ORT denormals as zero": _session(daz=True),
        "ORT no memory arena": _session(arena=False),
        "ORT parallel execution mode": _session(parallel=True),
    }
    blob = _blob(mat)
    infer: dict[str, Callable[[], Any]] = {
        name: partial(s.run, None, {"images": blob}) for name, s in sessions.items()}
    for precision in ("f32", "bf16"):
        try:
            vino = NudityDetector(runtime="openvino", precision=precision)  # type: ignore[arg-type]
        except Exception as exc:  # bf16 needs a CPU that has it
            print(f"OpenVINO {precision}: {exc}")
            continue
        infer[f"OpenVINO {precision}"] = partial(vino.infer, blob)
        notes[f"OpenVINO {precision}"] = "class scores move up to " + (
            f"{np.abs(vino.infer(blob)[0, 4:] - ref).max():.3f}")
    per = {}
    for n in (2, 4, 8):
        infer[f"ORT at batch {n}, per image"] = partial(det.infer, np.vstack([blob] * n))
        per[f"ORT at batch {n}, per image"] = n
    for title, cases, counts in (("decode", decoders, None), ("preprocessing", prep, None),
                                 ("NudeNet inference", infer, per)):
        got = measure(cases, rounds, counts)
        print(f"\n{title + ' variants':<40} {'CPU ms':>8}")
        for name, value in got.items():
            print(f"{name:<40} {value:>8.2f}  {notes.get(name, '')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--variants", action="store_true", help="also measure the alternatives")
    args = ap.parse_args()
    data = images()
    print(f"1024x1024: PNG {len(data['PNG']) / 1e6:.2f} MB, JPEG {len(data['JPEG']) / 1e6:.2f} MB;"
          f" median of {args.rounds} rounds; onnxruntime {ort.__version__}, openvino "
          f"{openvino.__version__.split('-')[0]}, opencv "
          f"{cv2.__version__}, {os.cpu_count()} CPUs\n")
    # The judge's default (OpenVINO, bfloat16 where the CPU has it), then ONNX Runtime in f32,
    # the runtime NudeNet itself uses and the judge's default before OpenVINO.
    for runtime, precision in (("auto", "auto"), ("onnxruntime", "f32")):
        stages(runtime, precision, data, args.rounds)
    if args.variants:
        variants(NudityDetector(runtime="onnxruntime"), data, args.rounds)


if __name__ == "__main__":
    main()
