"""Cost to the decoder of emitting every verified position as a training row (SmolLM2, plain decoding).

Run from the project root with the venv: python docs/results/experiments/emit_cost.py (prints JSON)."""
import json, statistics, sys, time
import torch
import selfspec.engine as engine
from selfspec.engine import TransitionSink, SelfSpecDecoder
from selfspec.loading import load_drafter, make_policy
from selfspec.prompts import chat_ids, load_prompts

d = load_drafter("smollm2-135m", 4)
prompts = [chat_ids(d.tokenizer, p.text) for p in load_prompts("builtin")[28:34]]
sent = []
timed = []
plain = SelfSpecDecoder(d.split, None, make_policy("fixed", 0))
emitting = SelfSpecDecoder(d.split, None, make_policy("fixed", 0), sink=TransitionSink(sent.append))
build = engine.round_transition  # the record of a round, as the decoder builds it
def timed_build(*a):
    t = time.perf_counter(); tr = build(*a); timed.append(time.perf_counter() - t); return tr
engine.round_transition = timed_build
res = {"off": [], "on": []}
for ids in prompts * 2:
    for name, dec in (("off", plain), ("on", emitting)):
        t = time.perf_counter(); r = dec.generate(ids, max_new_tokens=64); res[name].append((len(r.tokens), time.perf_counter() - t))
tps = {k: sum(n for n, _ in v) / sum(s for _, s in v) for k, v in res.items()}
out = {"tokens_per_s_emit_off": tps["off"], "tokens_per_s_emit_on": tps["on"], "slowdown": 1 - tps["on"] / tps["off"],
       "transitions": len(sent), "build_ms_median": 1e3 * statistics.median(timed), "build_ms_mean": 1e3 * statistics.mean(timed),
       "threads": torch.get_num_threads()}
print(json.dumps(out, indent=1))
