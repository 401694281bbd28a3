"""The `vlm` judge itself: items to probes, probes through the micro-batchers to scores, and an
explanation decoded where the policy wants one."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from guard.core.policy import Policy
from guard.core.types import JudgeInput, Verdict
from guard.judges.batching import MicroBatcher
from guard.judges.profiles import Explain, Probe, Profile, Slot, assessed, get_profile
from guard.judges.vlm.collate import Encoded, collate, encode_prompt
from guard.judges.vlm.generation import decode
from guard.judges.vlm.loading import Loaded, load
from guard.judges.vlm.options import VLMOptions
from guard.judges.vlm.prefix import PromptKV
from guard.judges.vlm.scoring import Row, read_slots
from guard.support.errors import ConfigError, JudgeError


@dataclass(slots=True)
class _Prepared:
    item: JudgeInput
    policy: Policy
    rows: list[tuple[Probe, Row]]


@dataclass(slots=True)
class _Scored:
    scores: dict[str, float]
    batch_size: int
    forward_ms: float
    prompts: list[PromptKV | None]  # per probe row: its prompt's KV cache, where kept


@dataclass(slots=True)
class _ExplainJob:
    explain: Explain
    encoded: Encoded
    prefix: list[int]
    banned: list[int]
    kv: PromptKV | None = None  # the scoring pass's cache of `encoded`, where kept


@dataclass(slots=True)
class _Explained:
    text: str
    tokens: int
    batch_size: int
    decode_ms: float
    reused_prefill: bool


class VLMJudge:
    def __init__(self, options: VLMOptions, *, model: Any = None, processor: Any = None) -> None:
        """`model`/`processor`: already loaded objects (benchmarks, tests); else loaded from
        `options.model` at `start()`."""
        self.options = options
        self.profile: Profile = get_profile(options.profile, options.profile_options)
        name = Path(options.model).name or options.model
        if options.adapter:
            name += "+" + (Path(options.adapter).name or options.adapter)
        self.id = options.id or f"vlm:{options.profile}:{name}"
        if (model is None) != (processor is None):
            raise TypeError("pass both a loaded model and its processor, or neither")
        self._given = (model, processor) if model is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-judge")
        self._loading: Future[Loaded] | None = None
        self._scorer: MicroBatcher[_Prepared, _Scored] = MicroBatcher(
            self._score_batch, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms,
            executor=self._executor)
        self._explainer: MicroBatcher[_ExplainJob, _Explained] = MicroBatcher(
            self._explain_batch, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms,
            executor=self._executor)

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> VLMJudge:
        try:
            return cls(VLMOptions.model_validate(dict(options)))
        except ValidationError as exc:
            raise ConfigError.from_validation("judge (vlm)", exc) from exc

    # --- lifecycle ------------------------------------------------------------------------------

    def _start_loading(self) -> Future[Loaded]:
        if self._loading is None:
            self._loading = self._executor.submit(
                lambda: load(self.options, self.id, self._given))
        return self._loading

    async def start(self) -> None:
        """Load the model in the judge's thread; returns when it is ready (raises JudgeError if
        loading failed)."""
        try:
            await asyncio.wrap_future(self._start_loading())
        except Exception as exc:
            raise JudgeError(f"vlm judge could not load {self.options.model!r}: {exc}") from exc

    async def ready(self) -> bool:
        loading = self._start_loading()
        return loading.done() and loading.exception() is None

    async def aclose(self) -> None:
        await self._scorer.aclose()
        await self._explainer.aclose()
        loading, self._loading = self._loading, None
        self._given = None
        if loading is not None and loading.done() and loading.exception() is None:
            loaded = loading.result()
            loaded.model = None
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def model(self) -> Any:
        """The loaded model (for inspection); None before loading."""
        loading = self._loading
        return loading.result().model if loading and loading.done() and not loading.exception() \
            else None

    def _loaded(self) -> Loaded:
        assert self._loading is not None
        return self._loading.result()

    def coverage(self, policy: Policy) -> dict[str, set[str]]:
        """What the profile's model assesses (a model trained on fixed categories, such as
        ShieldGemma 2's or LlavaGuard's, says nothing of the rest): guard.plugins.Covering."""
        declared = self.profile.coverage(policy)
        return declared if declared is not None else {c: {"text", "image"}
                                                      for c in policy.categories}

    # --- the judge ------------------------------------------------------------------------------

    async def judge(self, items: Sequence[JudgeInput], policy: Policy) -> list[Verdict]:
        if not items:
            return []
        await self.start()
        t0 = time.perf_counter()
        try:
            prepared = await asyncio.gather(
                *(asyncio.to_thread(self._prepare, item, policy) for item in items))
            scored = await self._scorer.submit_many(prepared)
            todo: dict[int, tuple[str, ...]] = {}
            if self.profile.explains:
                for i, sc in enumerate(scored):
                    if self.options.explain == "always" or policy.wants_explanation(sc.scores):
                        # The explanation is forced to start from this verdict.
                        todo[i] = policy.decide(sc.scores).flagged
            explained: dict[int, _Explained] = {}
            if todo:
                jobs = await asyncio.gather(*(self._explain_job(prepared[i], scored[i], flagged)
                                              for i, flagged in todo.items()))
                explained = dict(zip(todo, await self._explainer.submit_many(jobs), strict=True))
        except JudgeError:
            raise
        except Exception as exc:
            raise JudgeError(f"vlm judge failed: {type(exc).__name__}: {exc}") from exc
        latency = (time.perf_counter() - t0) * 1000.0
        return [self._verdict(prepared[i], scored[i], explained.get(i), latency)
                for i in range(len(items))]

    def _verdict(self, prep: _Prepared, sc: _Scored, ex: _Explained | None,
                 latency_ms: float) -> Verdict:
        details: dict[str, Any] = {"batch_size": sc.batch_size,
                                   "forward_ms": round(sc.forward_ms, 3), "decoded_tokens": 0}
        # what the profile's model was not trained to judge has no score (profiles.assessed)
        scores, assessed_on, unassessed = assessed(self.profile, prep.item, prep.policy,
                                                   sc.scores)
        if unassessed:
            details["unassessed"] = unassessed
        if ex is None:
            return Verdict(scores=scores, judge_id=self.id, latency_ms=latency_ms,
                           details=details, assessed_on=assessed_on)
        parsed = self.profile.parse([ex.text], prep.policy)
        details.update(decoded_tokens=ex.tokens, decode_ms=round(ex.decode_ms, 3),
                       explain_batch_size=ex.batch_size, reused_prefill=ex.reused_prefill)
        if not parsed.ok:
            details["parse_error"] = parsed.error
        return Verdict(scores=scores, judge_id=self.id, thought=parsed.thought,
                       refined_prompt=parsed.refined_prompt, raw=ex.text, latency_ms=latency_ms,
                       details=details, assessed_on=assessed_on)

    async def _explain_job(self, prep: _Prepared, sc: _Scored,
                           flagged: Sequence[str]) -> _ExplainJob:
        explain = self.profile.explain(prep.item, prep.policy, sc.scores, flagged)
        assert explain is not None
        return await asyncio.to_thread(self._prepare_explain, prep, explain, sc.prompts)

    # --- preprocessing (default thread pool) ---------------------------------------------------

    def _image(self, item: JudgeInput) -> Any:
        if item.image is None:
            return None
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(item.image.data)).convert("RGB")
        except Exception as exc:
            raise JudgeError(f"vlm judge cannot read the image: {exc}") from exc
        side = self.options.max_image_side
        if side and max(image.size) > side:
            image.thumbnail((side, side))
        return image

    def _prepare(self, item: JudgeInput, policy: Policy) -> _Prepared:
        image = self._image(item)
        loaded = self._loaded()
        rows = []
        for probe in self.profile.probes(item, policy):
            encoded = encode_prompt(loaded, probe.messages, image, self.profile.encoding)
            answer: list[int] = []
            slots = []
            before = ""
            for piece in probe.answer:
                if isinstance(piece, Slot):
                    ids = {label: loaded.option_id(before, text)
                           for label, text in piece.options.items()}
                    if len(set(ids.values())) < len(ids):
                        raise JudgeError(f"profile {self.profile.name}: answers "
                                         f"{sorted(piece.options.values())} share a first "
                                         "token in this tokenizer")
                    slots.append((piece, len(answer) - 1, ids))
                else:
                    answer += loaded.piece_ids(piece)
                    before = piece
            rows.append((probe, Row(encoded, answer, slots)))
        return _Prepared(item, policy, rows)

    def _prepare_explain(self, prep: _Prepared, explain: Explain,
                         prompts: list[PromptKV | None]) -> _ExplainJob:
        loaded = self._loaded()
        j = next((j for j, (probe, _) in enumerate(prep.rows)
                  if probe.messages == explain.messages), None)
        # The same prompt was scored: its encoding, and its KV cache where the pass kept it.
        encoded = prep.rows[j][1].encoded if j is not None else encode_prompt(
            loaded, explain.messages, self._image(prep.item), self.profile.encoding)
        kv = prompts[j] if j is not None else None
        banned = [loaded.option_id(explain.prefix, word) for word in explain.banned_first]
        return _ExplainJob(explain, encoded, loaded.piece_ids(explain.prefix), banned, kv)

    # --- model work (the judge's thread) --------------------------------------------------------

    def _score_batch(self, batch: list[_Prepared]) -> list[_Scored | BaseException]:
        t0 = time.perf_counter()
        loaded = self._loaded()
        rows = [row for prep in batch for _, row in prep.rows]
        per_row, kvs = read_slots(loaded, rows, keep_prompts=loaded.reuse_prefill
                                  and self.profile.explains) if rows else ([], [])
        forward_ms = (time.perf_counter() - t0) * 1000.0
        out: list[_Scored | BaseException] = []
        r = 0
        for prep in batch:
            n = len(prep.rows)
            combined = self.profile.combine(per_row[r:r + n], prep.policy)
            scores = {c: float(v) if v is not None else 1.0 for c, v in combined.items()}
            out.append(_Scored(scores, len(batch), forward_ms, kvs[r:r + n]))
            r += n
        return out

    def _explain_batch(self, batch: list[_ExplainJob]) -> list[_Explained | BaseException]:
        loaded = self._loaded()
        t0 = time.perf_counter()
        inputs, _ = collate([(job.encoded, job.prefix) for job in batch], loaded)
        # Alone, an explanation continues from its scoring pass's prefill where it was kept.
        kv = batch[0].kv if len(batch) == 1 else None
        new, reused = decode(loaded, inputs, max_new_tokens=self.options.max_new_tokens,
                             max_cache_len=self.options.max_cache_len,
                             stops=sorted({s for job in batch for s in job.explain.stop}),
                             banned=[job.banned for job in batch], prompt_kv=kv)
        decode_ms = (time.perf_counter() - t0) * 1000.0
        eos = loaded.eos_ids()
        results: list[_Explained | BaseException] = []
        for job, tokens in zip(batch, new, strict=True):
            n = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
            text = job.explain.prefix + loaded.tokenizer.decode(tokens[:n],
                                                                skip_special_tokens=True)
            results.append(_Explained(text, n, len(batch), decode_ms, reused))
        return results
