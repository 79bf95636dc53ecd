"""More training prompts, written by the model itself from seed prompts (few-shot self-instruct).

Spec-Bench has 480 questions; a learning curve to 2,000 training prompts needs more. The model is
shown three seed requests of one category as a numbered list and continues it with a fourth,
sampled. A plain list works where an instruction ("write a new request like this one") does not:
a 135M chat model answers the seed instead of imitating it. The shots' common prefix
("Summarize: ", "Translate German to English: ") is given, so task framing carries over. Seeds
should be training prompts only, so that no held-out text leaks into the new prompts.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from selfspec.prompts import Prompt, left_padded, pad_id

SHOT_CHARS = 400  # per seed shown; long documents are cut so a batch stays cheap
SHOTS = 3


def _common_prefix(texts: list[str]) -> str:
    prefix = os.path.commonprefix(texts)
    return prefix[:prefix.rfind(" ") + 1] if " " in prefix else ""  # whole words only


def _few_shot(shots: list[Prompt]) -> tuple[str, str]:
    """(the model's input, the prefix the new request starts with)."""
    texts = [p.text[:SHOT_CHARS] for p in shots]
    prefix = _common_prefix(texts)
    listing = "".join(f"Request {i + 1}:\n{text}\n\n" for i, text in enumerate(texts))
    return f"{listing}Request {len(texts) + 1}:\n{prefix}", prefix


def _first_request(continuation: str) -> str:
    return continuation.split("\n\nRequest")[0].split("\nRequest ")[0].strip()


@dataclass(frozen=True)
class SynthOptions:
    batch_size: int = 16
    max_new_tokens: int = 80  # length cap of one written prompt
    temperature: float = 0.9
    top_p: float = 0.95
    seed: int = 0
    max_barren_batches: int = 20  # batches in a row that add nothing before giving up
    progress: bool = True


@torch.inference_mode()
def synthesize_prompts(model, tokenizer, seeds: list[Prompt], n: int,
                       options: SynthOptions = SynthOptions()) -> list[Prompt]:
    """n new prompts, each in the category of the seeds it imitates (categories keep the seeds' mix)."""
    o = options
    batch_size, max_barren_batches = o.batch_size, o.max_barren_batches
    if not seeds:
        raise ValueError("synthesize_prompts needs at least one seed prompt")
    rng = random.Random(o.seed)
    torch.manual_seed(o.seed)
    by_category: dict[str, list[Prompt]] = {}
    for p in seeds:
        by_category.setdefault(p.category, []).append(p)
    pad = pad_id(tokenizer)
    made: list[Prompt] = []
    seen = {p.text for p in seeds}
    barren = 0  # batches in a row that added nothing: a model that only repeats or stops at once
    with tqdm(total=n, desc="synthetic prompts", unit="prompt", disable=not o.progress) as bar:
        while len(made) < n:
            if barren == max_barren_batches:
                raise RuntimeError(f"{barren} batches in a row wrote no new prompt ({len(made)}/{n} written): the "
                                   f"model only repeats its seeds or stops at once; try a higher temperature")
            categories = [rng.choice(seeds).category for _ in range(batch_size)]
            jobs = [_few_shot(rng.sample(by_category[c], min(SHOTS, len(by_category[c])))) for c in categories]
            encoded = [tokenizer(text)["input_ids"] for text, _ in jobs]
            input_ids, mask = left_padded(encoded, pad)
            width = input_ids.shape[1]
            out = model.generate(input_ids, attention_mask=mask, do_sample=True, temperature=o.temperature,
                                 top_p=o.top_p, max_new_tokens=o.max_new_tokens, pad_token_id=pad)
            before = len(made)
            for category, (_, prefix), row in zip(categories, jobs, out):
                body = _first_request(tokenizer.decode(row[width:], skip_special_tokens=True))
                text = (prefix + body).strip()
                if len(body) < 8 or text in seen or len(made) == n:  # empty, a copy, or enough already
                    continue
                seen.add(text)
                made.append(Prompt(f"synthetic-{len(made)}", f"synthetic-{category}", text))
                bar.update(1)
            barren = 0 if len(made) > before else barren + 1
    return made


def write_spec_bench_jsonl(prompts: list[Prompt], path: str | Path) -> None:
    """The Spec-Bench question format, so `load_prompts(path)` and every `--workload` read it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": p.id, "category": p.category, "turns": [p.text]}) + "\n"
                            for p in prompts))
