"""What the guard's loop costs: generate -> judge -> refine -> regenerate, timed through the proxy.

A fake image backend taking S seconds per call (streamed partials when asked) and a fake remote
judge taking v seconds per verdict and e per explanation (benchmarks/loop_fakes.py) sit behind
the real proxy (`python -m guard.cli serve`, started from `--source`), called with the openai SDK.
Scenarios (prompt markers, see loop_fakes):
  safe               "a cat on a mat"                        passed
  fixed in 1         UNSAFE_1 ...: red, refined -> safe      edited
  fixed in 2         UNSAFE_2 ...: red, red, blue            edited
  stuck              STUCK ...: the refiner has nothing new  refused (rounds run out)
  refused (image)    HATE_IMG ...: the image is hateful      refused (`hate` is a refuse category)
  refused (prompt)   HATE_TEXT ...: the prompt is hateful    refused at the prescreen (n = 1)
  1 of 4 unsafe      ONE_OF_4 ...: only image 0 is red       edited (n = 4)
Mechanisms (issue 18), each a change to the generated config, run in the scenarios it affects:
  today       the policy as it is (prescreen: true, rounds.max 3, on_exhausted: refuse)
  partials    backend option `partial_images: 2` (partials at 25% and 60% of S)
  concurrent  policy `prescreen: concurrent`
  deadline    policy `rounds.deadline_s` = v + 2 (S + v + e) + S/2: too short for fixed in 2,
              which must then end in HTTP 504 guard_deadline_exceeded by the deadline
  hedge       policy `hedge: {band: [0.3, 0.7]}` (marked prompts prescreen at 0.4)
  all         partials + concurrent
A tree whose config validation refuses an option shows that mechanism as n/a. Every response is
checked (decision, returned images' colours); a mismatch is printed loudly and the exit code is 1.

Floors (issue 18's Goals; f = time of the first unsafe partial with partials on, else S;
"x best floor" takes f from the partials whatever the row's config):
  safe S + v; fixed in 1 and 1 of 4: f + v + e + S + v; fixed in 2: 2 (f + v + e) + S + v;
  stuck f + v + e; refused (image) f + v; refused (prompt) v; a deadline row: the deadline.

Run: .venv/bin/python benchmarks/loop_latency.py [--quick | --full] [--source DIR]
     [--reps 3] [--verdict-s 0.05 --explain-s 0.15 | --issue-judge] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_fakes import FakeImageBackend, FakeJudge, ThreadServer, colour_of_png  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
DEADLINE_CODE = "guard_deadline_exceeded"


@dataclass(frozen=True)
class Params:
    verdict_s: float
    explain_s: float
    partial_at: tuple[float, ...]


@dataclass(frozen=True)
class Scenario:
    name: str
    prompt: str
    expect: str                     # passed | edited | refused
    ns: tuple[int, ...]
    floor: Callable[[float, float, Params], float]   # (S, f = first unsafe image, params)


SCENARIOS = [
    Scenario("safe", "a cat on a mat", "passed", (1, 4),
             lambda s, f, p: s + p.verdict_s),
    Scenario("fixed in 1", "UNSAFE_1 a cat on a mat", "edited", (1, 4),
             lambda s, f, p: f + p.verdict_s + p.explain_s + s + p.verdict_s),
    Scenario("fixed in 2", "UNSAFE_2 a cat on a mat", "edited", (1, 4),
             lambda s, f, p: 2 * (f + p.verdict_s + p.explain_s) + s + p.verdict_s),
    Scenario("stuck", "STUCK a cat on a mat", "refused", (1, 4),
             lambda s, f, p: f + p.verdict_s + p.explain_s),
    Scenario("refused (image)", "HATE_IMG a cat on a mat", "refused", (1, 4),
             lambda s, f, p: f + p.verdict_s),
    Scenario("refused (prompt)", "HATE_TEXT a cat on a mat", "refused", (1,),
             lambda s, f, p: p.verdict_s),
    Scenario("1 of 4 unsafe", "ONE_OF_4 a cat on a mat", "edited", (4,),
             lambda s, f, p: f + p.verdict_s + p.explain_s + s + p.verdict_s),
]
BY_NAME = {s.name: s for s in SCENARIOS}
IMAGE_SCENARIOS = tuple(s.name for s in SCENARIOS if s.name != "refused (prompt)")


@dataclass(frozen=True)
class Mechanism:
    name: str
    scenarios: tuple[str, ...]
    partials: bool = False
    concurrent: bool = False
    deadline: bool = False
    hedge: bool = False


MECHANISMS = [
    Mechanism("today", tuple(BY_NAME)),
    Mechanism("partials", IMAGE_SCENARIOS, partials=True),
    Mechanism("concurrent", ("safe", "fixed in 1", "refused (image)", "refused (prompt)"),
              concurrent=True),
    Mechanism("deadline", ("safe", "fixed in 2"), deadline=True),
    Mechanism("hedge", ("safe", "fixed in 1", "1 of 4 unsafe"), hedge=True),
    Mechanism("all", tuple(BY_NAME), partials=True, concurrent=True),
]


def deadline_s(s: float, p: Params) -> float:
    """Room for the prescreen, two full rounds and half a generation: not for a third round."""
    return p.verdict_s + 2 * (s + p.verdict_s + p.explain_s) + 0.5 * s


def expected(scn: Scenario, mech: Mechanism) -> str:
    return "failed" if mech.deadline and scn.name == "fixed in 2" else scn.expect


# --- the proxy --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, tag: str, mech: Mechanism, backend_url: str, judge_url: str,
                 deadline: float | None) -> Path:
    rounds: dict[str, Any] = {"max": 3, "on_exhausted": "refuse"}
    if deadline is not None:
        rounds["deadline_s"] = round(deadline, 3)
    policy: dict[str, Any] = {
        "id": "bench", "version": 1, "description": "loop_latency.py",
        "prescreen": "concurrent" if mech.concurrent else True,
        "categories": {
            "violence": {"threshold": 0.5, "action": "edit", "description": "Graphic violence."},
            "hate": {"threshold": 0.5, "action": "refuse", "description": "Hate symbols."}},
        "rounds": rounds}
    if mech.hedge:
        policy["hedge"] = {"band": [0.3, 0.7]}
    policies = tmp / f"policies-{tag}"
    policies.mkdir()
    (policies / "bench.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    backend: dict[str, Any] = {"kind": "openai-compatible", "api_base": backend_url,
                               "timeout_s": 120}
    if mech.partials:
        backend["partial_images"] = 2
    config = {
        "policy": "bench", "policy_paths": [str(policies)], "policy_reload_s": 0,
        "backends": {"bench": backend}, "routes": {"*": {"backend": "bench"}},
        "judge": {"kind": "remote", "api_base": judge_url, "model": "fake-judge",
                  "profile": "safeeditor", "timeout_s": 60, "retries": 0},
        "audit": {"kind": "sqlite", "path": str(tmp / f"audit-{tag}.db")},
    }
    path = tmp / f"config-{tag}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Proxy:
    tag: str
    mech: Mechanism
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    unavailable: str = ""           # why there is no proxy for this row ("" = it runs)


def start_proxy(python: str, source: Path, config: Path, tmp: Path, proxy: Proxy) -> None:
    port = free_port()
    log_path = tmp / f"proxy-{proxy.tag}.log"
    with log_path.open("wb") as log:
        proxy.proc = subprocess.Popen(
            [python, "-m", "guard.cli", "serve", "--config", str(config), "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=source, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(source)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proxy.proc.poll() is not None:
            proxy.unavailable = why_not(log_path.read_text(errors="replace"))
            return
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                proxy.url = url
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proxy.unavailable = "n/a (proxy not ready after 120 s)"


def why_not(log: str) -> str:
    """The row's n/a text from the log of a proxy that exited: a config or policy validation
    error means this tree does not know the mechanism's option yet."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    detail = [line.split(" error: ", 1)[1] for line in lines if " error: " in line]  # policies
    errors = [line for line in lines if "ConfigError: " in line]
    if errors:
        reason = detail[0] if detail else errors[-1].split("ConfigError: ", 1)[1]
        return f"n/a (not supported by this tree: {reason[:120]})"
    return f"n/a (proxy failed to start: {(lines or ['no output'])[-1][:120]})"


def stop_proxy(proxy: Proxy) -> None:
    if proxy.proc is not None and proxy.proc.poll() is None:
        proxy.proc.terminate()
        try:
            proxy.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proxy.proc.kill()


def guard_file(python: str, source: Path) -> str:
    out = subprocess.run([python, "-c", "import guard; print(guard.__file__)"], cwd=source,
                         env={**os.environ, "PYTHONPATH": str(source)}, capture_output=True,
                         text=True, timeout=120)
    return out.stdout.strip() or f"(import failed: {out.stderr.strip()[-300:]})"


# --- one request ------------------------------------------------------------------------------

@dataclass
class Result:
    seconds: float
    outcome: str                    # passed | edited | refused | failed | error ...
    ok: bool
    problem: str = ""
    trace_id: str | None = None
    backend_calls: list[dict[str, Any]] = field(default_factory=list)
    judge_calls: list[dict[str, Any]] = field(default_factory=list)

    def calls(self) -> str:
        gens = len(self.backend_calls)
        imgs = sum(c["n"] for c in self.backend_calls)
        cut = sum(c["closed_early"] for c in self.backend_calls)
        streamed = sum(c["stream"] for c in self.backend_calls)
        verdicts = sum(c["kind"] == "verdict" for c in self.judge_calls)
        explains = len(self.judge_calls) - verdicts
        text = f"{gens} gen ({imgs} img{', ' + str(streamed) + ' streamed' if streamed else ''}"
        text += f"{', ' + str(cut) + ' cut' if cut else ''}), {verdicts} v + {explains} e"
        return text


def check(body: dict[str, Any], scn: Scenario, mech: Mechanism, n: int) -> str:
    """What is wrong with a 200 answer ("" = nothing)."""
    guard = body.get("guard") or {}
    data = body.get("data") or []
    if len(data) != n:
        return f"{len(data)} image(s) for n={n}"
    colours = [colour_of_png(base64.b64decode(d.get("b64_json") or "")) for d in data]
    if any(c != "blue" for c in colours):
        return f"returned images {colours}: an unsafe image reached the client"
    if scn.name == "1 of 4 unsafe" and not mech.hedge:
        slots = [i.get("decision") for i in sorted(guard.get("images") or [],
                                                   key=lambda i: i.get("index", 0))]
        if slots != ["edited", "passed", "passed", "passed"]:
            return f"per-image decisions {slots}, expected edited, passed, passed, passed"
    return ""


def one_request(client: openai.OpenAI, scn: Scenario, mech: Mechanism, n: int,
                backend: FakeImageBackend, judge: FakeJudge) -> Result:
    want = expected(scn, mech)
    backend.take_calls()
    judge.take_calls()
    t0 = time.perf_counter()
    trace_id: str | None = None
    problem = ""
    try:
        raw = client.images.with_raw_response.generate(model=MODEL, prompt=scn.prompt, n=n,
                                                       response_format="b64_json")
        seconds = time.perf_counter() - t0
        trace_id = raw.headers.get("x-guard-trace-id")
        body = raw.http_response.json()
        outcome = str((body.get("guard") or {}).get("decision"))
        problem = check(body, scn, mech, n) if outcome == want else ""
    except openai.APIStatusError as exc:
        seconds = time.perf_counter() - t0
        trace_id = exc.response.headers.get("x-guard-trace-id")
        if exc.status_code == 400 and exc.code == "content_policy_violation":
            outcome = "refused"
        elif exc.status_code == 504 and exc.code == DEADLINE_CODE:
            outcome = "failed"
        else:
            outcome = f"HTTP {exc.status_code} {exc.code}"
    ok = outcome == want and not problem
    if outcome != want:
        problem = f"outcome {outcome!r}, expected {want!r}"

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 4)

    return Result(round(seconds, 4), outcome, ok, problem, trace_id,
                  [{**asdict(c), "start": rel(c.start), "end": rel(c.end)}
                   for c in backend.take_calls()],
                  [{**asdict(c), "start": rel(c.start), "end": rel(c.end)}
                   for c in judge.take_calls()])


# --- the run ----------------------------------------------------------------------------------

Cell = tuple[float, int]


def run(args: argparse.Namespace, params: Params) -> int:
    sizes: list[float] = args.sizes + ([10.0] if args.full and 10.0 not in args.sizes else [])
    cells: list[Cell] = [(s, n) for s in sizes for n in args.n]
    mechs = [m for m in MECHANISMS if m.name in args.mechanisms]
    source = args.source.resolve()
    where = guard_file(args.python, source)
    print(f"proxy: {args.python} -m guard.cli serve, cwd {source}; guard = {where}")
    if not where.startswith(str(source)):
        print(f"!! guard is not imported from --source {source}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="safeedit-loop-"))
    backend = FakeImageBackend(partial_at=params.partial_at)
    judge = FakeJudge(params.verdict_s, params.explain_s)
    results: dict[tuple[Cell, str, str], list[Result]] = {}
    proxies: dict[tuple[str, float | None], Proxy] = {}
    started = time.monotonic()
    with ThreadServer(backend.app(), free_port()) as bsrv, \
            ThreadServer(judge.app(), free_port()) as jsrv:
        try:
            for mech in mechs:
                for s in (sizes if mech.deadline else [None]):
                    tag = mech.name + (f"-{s:g}" if s is not None else "")
                    proxy = Proxy(tag, mech)
                    proxies[(mech.name, s)] = proxy
                    config = write_config(tmp, tag, mech, bsrv.url + "/v1", jsrv.url + "/v1",
                                          deadline_s(s, params) if s is not None else None)
                    start_proxy(args.python, source, config, tmp, proxy)
                    print(f"  {tag:<14} {proxy.unavailable or 'up at ' + proxy.url}")
                    if not proxy.unavailable:
                        warm_up(proxy, backend, judge)
            if proxies[("today", None)].unavailable:
                print(f"!! the baseline proxy did not start; see {tmp}", file=sys.stderr)
                return 2
            rep_times: list[float] = []
            for rep in range(args.reps):
                t_rep = time.monotonic()
                for s, n in cells:
                    backend.sleep_s = s
                    for mech in mechs:
                        proxy = proxies[(mech.name, s if mech.deadline else None)]
                        if proxy.unavailable:
                            continue
                        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="bench",
                                               max_retries=0, timeout=600)
                        for name in mech.scenarios:
                            scn = BY_NAME[name]
                            if n not in scn.ns or name not in args.scenarios:
                                continue
                            r = one_request(client, scn, mech, n, backend, judge)
                            results.setdefault(((s, n), mech.name, name), []).append(r)
                            if not r.ok:
                                print(f"!! OUTCOME MISMATCH S={s:g} n={n} {name} [{mech.name}]: "
                                      f"{r.problem} (trace {r.trace_id})", file=sys.stderr)
                rep_times.append(time.monotonic() - t_rep)
                elapsed = time.monotonic() - started
                print(f"  rep {rep + 1}/{args.reps} done in {rep_times[-1]:.0f} s "
                      f"({elapsed:.0f} s so far)")
                if rep + 1 < args.reps and elapsed + rep_times[-1] > args.budget_s:
                    print(f"  stopping after {rep + 1} rep(s): another would pass --budget-s "
                          f"{args.budget_s:g}")
                    break
        finally:
            for proxy in proxies.values():
                stop_proxy(proxy)
    rows = report(cells, mechs, proxies, results, params, args)
    print(f"proxy logs, configs, policies and audit DBs (traces): {tmp}")
    bad = [r for r in rows if r.get("mismatches")]
    if args.json:
        Path(args.json).write_text(json.dumps({
            "source": str(source), "guard_file": where, "params": asdict(params),
            "reps": args.reps, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    if bad:
        print(f"\n!! {len(bad)} row(s) with OUTCOME MISMATCHES: their timings measure the wrong "
              "thing", file=sys.stderr)
        return 1
    return 0


def warm_up(proxy: Proxy, backend: FakeImageBackend, judge: FakeJudge) -> None:
    """First requests pay for imports, connections and the audit store: not measured."""
    backend.sleep_s = 0.0
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="bench", max_retries=0,
                           timeout=120)
    for name in ("safe", "fixed in 1"):
        one_request(client, BY_NAME[name], proxy.mech, 1, backend, judge)


def report(cells: list[Cell], mechs: list[Mechanism], proxies: dict[tuple[str, float | None],
           Proxy], results: dict[tuple[Cell, str, str], list[Result]], params: Params,
           args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    first = params.partial_at[0] if params.partial_at else 1.0
    print(f"\nLoop latency (p50 of up to {args.reps} reps; v = {params.verdict_s:g} s, "
          f"e = {params.explain_s:g} s, partials at {params.partial_at} of S; "
          f"{os.cpu_count()} CPUs)")
    for s, n in cells:
        print(f"\n### S = {s:g} s, n = {n}\n")
        print("| scenario | mechanism | p50 s | x safe | floor s | x floor | x best floor "
              "| calls (p50 request) | outcome |")
        print("|---|---|---|---|---|---|---|---|---|")
        for scn in SCENARIOS:
            if n not in scn.ns or scn.name not in args.scenarios:
                continue
            for mech in mechs:
                if scn.name not in mech.scenarios:
                    continue
                got = results.get(((s, n), mech.name, scn.name))
                if not got:
                    continue
                lat = sorted(r.seconds for r in got)
                p50 = statistics.median(lat)
                safe = results.get(((s, n), mech.name, "safe"))
                x_safe = p50 / statistics.median(r.seconds for r in safe) if safe else None
                dead = expected(scn, mech) == "failed"
                floor = deadline_s(s, params) if dead else \
                    scn.floor(s, first * s if mech.partials else s, params)
                best = floor if dead else scn.floor(s, first * s, params)
                mid = sorted(got, key=lambda r: r.seconds)[(len(got) - 1) // 2]
                wrong = [r.problem for r in got if not r.ok]
                outcome = expected(scn, mech) if not wrong else \
                    f"**MISMATCH {len(wrong)}/{len(got)}: {wrong[0]}**"
                print(f"| {scn.name} | {mech.name} | {p50:.2f} | "
                      f"{'-' if x_safe is None else f'{x_safe:.2f}x'} | "
                      f"{floor:.2f}{' (deadline)' if dead else ''} | {p50 / floor:.2f}x | "
                      f"{p50 / best:.2f}x | {mid.calls()} | {outcome} |")
                rows.append({"S": s, "n": n, "scenario": scn.name, "mechanism": mech.name,
                             "p50_s": round(p50, 4), "x_safe": x_safe, "floor_s": round(floor, 4),
                             "x_floor": round(p50 / floor, 4), "best_floor_s": round(best, 4),
                             "x_best_floor": round(p50 / best, 4), "expected": expected(scn, mech),
                             "mismatches": wrong, "seconds": lat,
                             "requests": [asdict(r) for r in got]})
        for mech in mechs:
            proxy = proxies[(mech.name, s if mech.deadline else None)]
            if proxy.unavailable:
                names = [x for x in mech.scenarios if n in BY_NAME[x].ns]
                print(f"| {', '.join(names)} | {mech.name} | {proxy.unavailable} | | | | | | |")
                rows.append({"S": s, "n": n, "mechanism": mech.name, "scenarios": names,
                             "unavailable": proxy.unavailable})
    print(f"\nfloor: issue 18's serial work that cannot be avoided with this row's config (see "
          f"the module docstring); best floor: the same with the backend's partials used (the "
          f"first unsafe one at {first:g} S). x safe: against the safe p50 of the same S, n and "
          "mechanism. The backend makes a call's n images in parallel (S per call). "
          "calls: backend generations (images, streamed, cut short) and judge requests "
          "(v = verdict, e = explanation) of the p50 request.")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="checkout whose proxy is measured (default: this repository)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs the proxy (default: this one)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.5],
                        help="backend seconds per call, S (default 0.5 2.5)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4], choices=[1, 4])
    parser.add_argument("--full", action="store_true", help="add S = 10 s")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke: S = 0.5 only, 2 reps (under a minute today)")
    parser.add_argument("--reps", type=int, default=3, help="requests per row (default 3)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="start no further rep past this many seconds (default 540)")
    parser.add_argument("--verdict-s", type=float, default=0.05, help="judge verdict, v")
    parser.add_argument("--explain-s", type=float, default=0.15, help="judge explanation, e")
    parser.add_argument("--issue-judge", action="store_true",
                        help="v = 0.3 s, e = 1.0 s, as in issue 18's first measurement")
    parser.add_argument("--partial-at", type=float, nargs="+", default=[0.25, 0.6],
                        help="when the backend's partials arrive, as fractions of S")
    parser.add_argument("--mechanisms", nargs="+", default=[m.name for m in MECHANISMS],
                        choices=[m.name for m in MECHANISMS])
    parser.add_argument("--scenarios", nargs="+", default=list(BY_NAME), choices=list(BY_NAME),
                        metavar="SCENARIO", help=f"subset of: {', '.join(BY_NAME)}")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps = [0.5], min(args.reps, 2)
    if "today" not in args.mechanisms:
        args.mechanisms.insert(0, "today")
    if args.issue_judge:
        args.verdict_s, args.explain_s = 0.3, 1.0
    params = Params(args.verdict_s, args.explain_s, tuple(sorted(args.partial_at)))
    return run(args, params)


if __name__ == "__main__":
    sys.exit(main())
