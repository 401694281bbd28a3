"""The `vlm` judge: a local multimodal model (transformers) behind the Judge protocol.

    judge:
      kind: vlm
      model: /models/Qwen2.5-VL-7B-Instruct   # a folder, or a hub id already in the local cache
      adapter: /models/ipr-7b                 # optional PEFT (LoRA) adapter over `model`
      profile: ipr                            # safeeditor | ipr | llavaguard | shieldgemma2

Options: `guard.judges.vlm.options`. The modules: `options` (the config), `loading` (model,
processor, PEFT adapter, device and dtype), `attention` (Qwen-VL vision windows in one SDPA call),
`collate` (prompts to padded tensors), `scoring` (the verdict from one forward pass), `generation`
(decoding an explanation), `judge` (the `VLMJudge` over them).

How the verdict is read (verdict first). Each profile turns an item into probes: the chat prompt
plus the start of the answer, teacher-forced, with slots where the model would write its verdict
(`safeeditor`: `<judgement>\\nsexual:` [slot] ` no\\nviolence:` [slot] ...). One forward pass over
all probes of a batch gives the logits at every slot; a category's score is the softmax of the
unsafe answer token's logit against the safe one's (`ipr`: 1 - P("keep") over the vocabulary), so
thresholds are probabilities the model itself assigns. Nothing is decoded for items that stay under
every threshold; for the others the answer is forced up to the reasoning with the actual verdict and
then decoded (greedy, `max_new_tokens`), and the profile's parser extracts the reasoning and refined
prompt. The scores stay those read from the logits; a reasoning text that does not parse is kept raw
in the trace, with `details.parse_error`.

Threads: the model is loaded and run in one dedicated thread, so the event loop never blocks on it
and the model never runs two batches at once; images are decoded and preprocessed in the default
thread pool, concurrently with the model's work on earlier batches.
"""

from guard.judges.vlm.judge import VLMJudge
from guard.judges.vlm.options import VLMOptions

__all__ = ["VLMJudge", "VLMOptions"]
