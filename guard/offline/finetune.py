"""A LoRA fine-tune (peft) of the `vlm` judge's model on a dataset from `safeedit dataset export`.

Each record becomes one example: the chat messages the judge itself sends for the item (the
profile's own template, with the image and the slot's earlier rounds) and the answer the judge
should have written, in the profile's format. The loss is on the answer's tokens only.

What the answer says (`target_of`, a pure function):
- a `false_positive` label: safe (only its category, when it names one; others flagged stay);
- a `missed` label: unsafe in its category too, and, where a later round of the slot was judged
  with another prompt (or the judge wrote one), that refined prompt as the refinement;
- a `correct` label, and an item nobody labelled: the recorded decision (flagged categories,
  thought, refined prompt). Unlabelled items are weak targets: the judge of the day said so, no
  one checked. `unlabelled: skip` leaves them out; the default keeps them so the format and the
  decisions nobody disputed are kept while the labelled mistakes are corrected.
A record whose image was not exported (not retained by the policy) is skipped: its verdict was
about an image the example would not show.

Answer format per profile: `safeeditor` writes the judgement block (`c: yes|no` per policy
category, in the policy's order); for an unsafe item with a known refinement it goes on with the
thought (the recorded one when the label agrees with the recorded decision, else a sentence naming
the categories) and `<refined_prompt>`. `ipr` answers `keep`, or the refined prompt (the guard's
rule-based refiner when none is known, as the engine would).

Training: AdamW on the LoRA weights, a tqdm progress bar, a held-back split whose mean token
loss is measured before and after. The adapter is saved with `save_pretrained` and loads back as
`judge: {kind: vlm, adapter: A}`.

It cannot fool itself (guard.offline.finetune_eval):
- examples of one class only (every target safe, or every one unsafe: say, only
  `false_positive` labels) are refused unless `allow_one_class`: such an adapter learns to give
  that answer to everything;
- the held-back split (whole traces) has at least 10 items of each class, else there is too
  little to judge the adapter and it is written only with `no_eval` (which holds back `holdout`
  of the examples, as a loss check only);
- the split is judged by the `vlm` judge before (the base model) and after (with the adapter):
  precision and recall per class and per category, with counts;
- the adapter is written only when its unsafe recall on the split falls by no more than
  `max_recall_drop` (absolute); otherwise nothing is written and the report says why.
`eval_only` (an adapter folder) judges an existing adapter on the same split, trains nothing.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guard.core.policy import Policy
from guard.core.refiner import refine_prompt
from guard.core.types import GeneratedImage, HistoryEntry, JudgeInput
from guard.judges.profiles import Message, Profile, get_profile
from guard.judges.profiles.safeeditor import judgement_lines
from guard.offline.dataset import SPLIT_DIR, read_records
from guard.offline.finetune_eval import (
    Evaluation,
    class_of,
    evaluate_model,
    gate,
    stratified_split,
    table,
)
from guard.support.errors import ConfigError

# The language model's attention and MLP projections (Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma 3):
# the vision tower stays as it is.
DEFAULT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PolicyLookup = Callable[[str], Policy]


class FinetuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: Path
    model: str
    adapter_out: Path = Path("adapter")
    profile: Literal["safeeditor", "ipr"] = "safeeditor"
    unlabelled: Literal["decision", "skip"] = "decision"
    epochs: int = Field(3, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    batch_size: int = Field(1, ge=1, description="examples per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    rank: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha/rank)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: str = Field(DEFAULT_TARGETS,
                                description="modules to adapt: a regex over names, or all-linear")
    holdout: float = Field(0.1, ge=0, lt=1, description="share of examples held back")
    seed: int = Field(0, description="seed of the split, the order and the LoRA init")
    max_image_side: int | None = Field(None, ge=16,
                                       description="shrink larger images to this side, as the "
                                                   "judge's option of the same name")
    device: str = Field("auto", description="auto | cuda | cuda:N | mps | cpu")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto | bfloat16 | float16 | float32")
    gradient_checkpointing: bool = False
    allow_one_class: bool = Field(False, description="train on examples of one class only")
    no_eval: bool = Field(False, description="write the adapter without judging it on a "
                                             "held-back split")
    max_recall_drop: float = Field(0.05, ge=0, le=1, description="largest fall of unsafe "
                                   "recall on the held-back split (absolute) the adapter may "
                                   "cause and still be written")
    eval_only: Path | None = Field(None, description="judge this adapter on the held-back "
                                                     "split; train nothing")

    @classmethod
    def build(cls, **values: Any) -> FinetuneOptions:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError.from_validation("finetune", exc) from exc


# --- targets: what the judge should have answered (pure) ---------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    flagged: tuple[str, ...]
    thought: str = ""
    refined_prompt: str | None = None


def target_of(record: Mapping[str, Any], policy: Policy,
              unlabelled: str = "decision") -> Target | None:
    """The verdict `record` should have got, from its label or, without one, its recorded
    decision (None: `unlabelled` is `skip`)."""
    label = record.get("label") or {}
    verdict = label.get("verdict")
    if verdict is None and unlabelled == "skip":
        return None
    recorded = [c for c in record.get("flagged") or () if c in policy.categories]
    flagged = list(recorded)
    category = label.get("category")
    if verdict == "false_positive":
        flagged = [c for c in recorded if c != category] if category else []
    elif verdict == "missed" and category not in flagged:
        flagged.append(category)
    flagged = [c for c in policy.categories if c in flagged]  # the policy's order
    if not flagged:
        return Target(())
    refined = record.get("refined_prompt") or record.get("next_prompt")
    thought = record.get("thought") or ""
    if flagged != [c for c in policy.categories if c in recorded] or not thought:
        what = "prompt" if record.get("slot") is None else "image"
        thought = f"The {what} is unsafe under: {', '.join(flagged)}."
    return Target(tuple(flagged), thought, refined)


def answer_text(target: Target, profile: str, policy: Policy, prompt: str) -> str:
    """The answer in the profile's format."""
    if profile == "ipr":
        if not target.flagged:
            return "keep"
        # Nothing benign left (the rule refiner says None): its categories' append words, which
        # still answer "unsafe" as the profile needs.
        return target.refined_prompt or refine_prompt(prompt, target.flagged, policy) or ", ".join(
            t.append for c in target.flagged if (t := policy.terms.get(c)) and t.append)
    text = f"<judgement>\n{judgement_lines(policy, target.flagged)}\n</judgement>"
    if target.flagged and target.refined_prompt:
        text += (f"\n<thought>{target.thought}</thought>\n"
                 f"<refined_prompt>{target.refined_prompt}</refined_prompt>")
    return text


# --- examples ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Example:
    id: str
    trace_id: str
    messages: tuple[Message, ...]
    image: bytes | None
    answer: str
    flagged: tuple[str, ...] = ()  # what the answer flags: its class and categories
    item: JudgeInput | None = None  # as the judge sees it, for the held-back evaluation
    policy: Policy | None = None


def build_examples(records: Sequence[Mapping[str, Any]], directory: Path, profile: Profile,
                   policy_of: PolicyLookup, unlabelled: str = "decision"
                   ) -> tuple[list[Example], Counter[str]]:
    """The examples of the records, and why the others were skipped."""
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    policies: dict[str, Policy | None] = {}
    for record in records:
        pid = str((record.get("policy") or {}).get("id"))
        if pid not in policies:
            try:
                policies[pid] = policy_of(pid)
            except ConfigError:
                policies[pid] = None
        policy = policies[pid]
        if policy is None:
            skipped[f"policy {pid!r} not found"] += 1
            continue
        category = (record.get("label") or {}).get("category")
        if category is not None and category not in policy.categories:
            skipped[f"label category {category!r} not in policy {pid!r}"] += 1
            continue
        image = None
        if record.get("image_sha256"):
            if not record.get("file_name"):
                skipped["image not in the dataset"] += 1
                continue
            image = (Path(directory) / SPLIT_DIR / record["file_name"]).read_bytes()
        target = target_of(record, policy, unlabelled)
        if target is None:
            skipped["unlabelled (--unlabelled skip)"] += 1
            continue
        item = JudgeInput(
            prompt=record["prompt"], original_prompt=record.get("original_prompt") or "",
            image=GeneratedImage(data=image) if image is not None else None,
            history=tuple(HistoryEntry(prompt=h["prompt"], scores=h.get("scores") or {},
                                       flagged=tuple(h.get("flagged") or ()),
                                       thought=h.get("thought") or "",
                                       refined_prompt=h.get("refined_prompt"))
                          for h in record.get("history") or ()))
        [probe, *_] = profile.probes(item, policy)
        examples.append(Example(record["id"], record["trace_id"], probe.messages, image,
                                answer_text(target, profile.name, policy, record["prompt"]),
                                target.flagged, item, policy))
    return examples, skipped


def split(examples: Sequence[Example], holdout: float,
          seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held back): whole traces held back, in an order fixed by the seed, until
    `holdout` of the examples (at least one) are; never every trace."""
    traces = sorted({e.trace_id for e in examples},
                    key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    want = max(1, round(holdout * len(examples))) if holdout > 0 else 0
    held: set[str] = set()
    count = 0
    for trace_id in traces[:-1]:
        if count >= want:
            break
        held.add(trace_id)
        count += sum(1 for e in examples if e.trace_id == trace_id)
    return ([e for e in examples if e.trace_id not in held],
            [e for e in examples if e.trace_id in held])


# --- training ---------------------------------------------------------------------------------

@dataclass
class FinetuneReport:
    adapter: str
    model: str
    profile: str
    train: int
    held: int
    skipped: dict[str, int]
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step
    held_loss_before: float | None = None
    held_loss_after: float | None = None
    seconds: float = 0.0
    device: str = ""
    train_ids: list[str] = field(default_factory=list)
    held_ids: list[str] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)  # training examples per class
    before: dict[str, Any] | None = None  # the held-back split judged by the base model
    after: dict[str, Any] | None = None   # ... with the adapter
    recall_drop: float | None = None
    max_recall_drop: float | None = None
    written: bool = False
    table: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        saved = f"adapter saved to {self.adapter}" if self.written else "no adapter written"
        out = [f"trained {self.steps} steps on {self.train} examples in {self.seconds:.1f} s "
               f"on {self.device}; {saved}"] if self.steps else [saved]
        if self.losses:
            out.append(f"train loss: {self.losses[0]:.4f} (first step) -> "
                       f"{self.losses[-1]:.4f} (last)")
        if self.held_loss_before is not None and self.held_loss_after is not None:
            out.append(f"held-back loss ({self.held} examples): {self.held_loss_before:.4f} "
                       f"before -> {self.held_loss_after:.4f} after")
        elif self.steps:
            out.append("held-back loss: none (no example held back)")
        for reason, count in sorted(self.skipped.items()):
            out.append(f"skipped {count}: {reason}")
        out += self.table
        if self.recall_drop is not None:
            verdict = "within" if self.recall_drop <= (self.max_recall_drop or 0.0) + 1e-12 \
                else "over"
            out.append(f"unsafe recall fell by {self.recall_drop:.3f}, {verdict} "
                       f"--max-recall-drop {self.max_recall_drop:g}")
        return out


def finetune(options: FinetuneOptions, policy_of: PolicyLookup,
             progress: bool = True) -> FinetuneReport:
    """Train a LoRA adapter on the dataset and save it to `options.adapter_out` when it passes
    the held-back evaluation (`report.written`); with `eval_only`, judge that adapter instead."""
    records = read_records(options.dataset)
    profile = get_profile(options.profile)
    examples, skipped = build_examples(records, options.dataset, profile, policy_of,
                                       options.unlabelled)
    if not examples:
        reasons = "; ".join(f"{n} {why}" for why, n in skipped.items()) or "no records"
        raise ConfigError(f"no training examples in {options.dataset} ({reasons})")
    judged = not options.no_eval or options.eval_only is not None
    if judged:
        try:
            train, held = stratified_split(examples, options.holdout, options.seed)
        except ValueError as exc:
            raise ConfigError(f"finetune: {exc}; --no-eval writes the adapter without "
                              "judging it") from None
    else:
        train, held = split(examples, options.holdout, options.seed)
    classes = {c: sum(1 for e in train if class_of(e.flagged) == c) for c in ("safe", "unsafe")}
    if min(classes.values()) == 0 and not options.allow_one_class and options.eval_only is None:
        only = next(c for c, n in classes.items() if n)
        raise ConfigError(f"finetune: all {classes[only]} training examples are {only}: an "
                          f"adapter trained on one class learns to answer {only!r} to "
                          "everything. Add examples of the other class, or pass "
                          "--allow-one-class")
    t0 = time.perf_counter()
    trainer = _Trainer(options)
    report = FinetuneReport(str(options.eval_only or options.adapter_out), options.model,
                            options.profile, len(train), len(held), dict(skipped),
                            device=str(trainer.device), train_ids=[e.id for e in train],
                            held_ids=[e.id for e in held], classes=classes)
    if options.eval_only is not None:
        with trainer.model.disable_adapter():
            before = trainer.judge(held)
        _judged(report, before, trainer.judge(held), options)
        report.written = False
        report.seconds = round(time.perf_counter() - t0, 2)
        return report
    before_eval = trainer.judge(held) if judged else None  # LoRA starts as the base model
    report.held_loss_before = trainer.evaluate(held)
    report.losses = trainer.train(train, progress)
    report.steps = len(report.losses)
    report.held_loss_after = trainer.evaluate(held)
    passed = True
    if before_eval is not None:
        passed = _judged(report, before_eval, trainer.judge(held), options)
    report.seconds = round(time.perf_counter() - t0, 2)
    if passed:
        trainer.save(options.adapter_out, report)
        report.written = True
    return report


def _judged(report: FinetuneReport, before: Evaluation, after: Evaluation,
            options: FinetuneOptions) -> bool:
    passed, drop = gate(before, after, options.max_recall_drop)
    report.before, report.after = before.to_dict(), after.to_dict()
    report.recall_drop, report.max_recall_drop = round(drop, 6), options.max_recall_drop
    report.table = table(before, after)
    return passed


class _Trainer:
    """The judge's own loading and encoding, a peft LoRA over the model, a plain torch loop."""

    def __init__(self, options: FinetuneOptions) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        from guard.judges.vlm.loading import load
        from guard.judges.vlm.options import VLMOptions

        self.options = options
        torch.manual_seed(options.seed)
        self.loaded = load(VLMOptions(model=options.model, device=options.device,
                                      dtype=options.dtype), "finetune")
        targets: str | list[str] = options.target_modules
        if options.eval_only is not None:
            from peft import PeftModel

            from guard.judges.vlm.loading import _adapter_key_mapping

            model = PeftModel.from_pretrained(self.loaded.model, str(options.eval_only),
                                              key_mapping=_adapter_key_mapping(
                                                  self.loaded.model))
        else:
            model = get_peft_model(self.loaded.model, LoraConfig(
                r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                target_modules=targets))
        if options.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self.loaded.model = model
        self.device = self.loaded.device
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=options.lr,
            weight_decay=0.0) if options.eval_only is None else None

    def _image(self, data: bytes | None) -> Any:
        if data is None:
            return None
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        side = self.options.max_image_side
        if side and max(image.size) > side:
            image.thumbnail((side, side))
        return image

    def _loss(self, batch: Sequence[Example]) -> tuple[Any, int]:
        """Summed cross-entropy over the answers' tokens, and their number."""
        import torch
        import torch.nn.functional as F

        from guard.judges.vlm.collate import collate, encode_prompt

        rows = [(encode_prompt(self.loaded, e.messages, self._image(e.image)),
                 self.loaded.piece_ids(e.answer)) for e in batch]
        inputs, _ = collate(rows, self.loaded)
        k = max(len(answer) for _, answer in rows)
        labels = torch.full((len(rows), k), -100, dtype=torch.long)
        for r, (_, answer) in enumerate(rows):
            labels[r, k - len(answer):] = torch.tensor(answer, dtype=torch.long)
        # Answers end every left-padded row: only the last k + 1 positions need logits.
        try:
            logits = self.model(**inputs, use_cache=False, logits_to_keep=k + 1).logits
        except TypeError:  # a model without logits_to_keep
            logits = self.model(**inputs, use_cache=False).logits[:, -(k + 1):]
        logits = logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               labels.reshape(-1).to(logits.device), ignore_index=-100,
                               reduction="sum")
        return loss, int((labels != -100).sum())

    def train(self, examples: Sequence[Example], progress: bool) -> list[float]:
        from tqdm import tqdm

        o = self.options
        per_step = o.batch_size * o.grad_accum
        total = o.max_steps or o.epochs * math.ceil(len(examples) / per_step)
        rng = random.Random(o.seed)
        losses: list[float] = []
        self.model.train()
        with tqdm(total=total, desc="finetune", unit="step", disable=not progress) as bar:
            while len(losses) < total:
                order = list(examples)
                rng.shuffle(order)
                for start in range(0, len(order), per_step):
                    group = order[start:start + per_step]
                    losses.append(self._step(group))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    if len(losses) >= total:
                        break
        return losses

    def _step(self, group: Sequence[Example]) -> float:
        size = self.options.batch_size
        batches = [group[i:i + size] for i in range(0, len(group), size)]
        answers = [self.loaded.piece_ids(e.answer) for e in group]
        tokens = max(1, sum(len(a) for a in answers))
        assert self.optimizer is not None  # not under eval_only
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            loss, _ = self._loss(batch)
            (loss / tokens).backward()
            total += float(loss.detach())
        self.optimizer.step()
        return total / tokens

    def judge(self, examples: Sequence[Example]) -> Evaluation:
        """`examples` judged by the `vlm` judge over the model as it is now."""
        evaluation = evaluate_model(self.model, self.loaded.processor, self.options.model,
                                    self.options.profile, examples)
        self.model.train()
        return evaluation

    def evaluate(self, examples: Sequence[Example]) -> float | None:
        """Mean token loss over `examples` (None when there are none)."""
        if not examples:
            return None
        import torch

        self.model.eval()
        total, tokens = 0.0, 0
        size = self.options.batch_size
        with torch.no_grad():
            for i in range(0, len(examples), size):
                loss, n = self._loss(examples[i:i + size])
                total += float(loss)
                tokens += n
        self.model.train()
        return total / max(1, tokens)

    def save(self, path: Path, report: FinetuneReport) -> None:
        import orjson

        self.model.save_pretrained(str(path))
        summary = {k: v for k, v in report.to_dict().items() if k not in ("train_ids",
                                                                          "held_ids")}
        (Path(path) / "safeedit-finetune.json").write_bytes(
            orjson.dumps(summary, option=orjson.OPT_INDENT_2))
