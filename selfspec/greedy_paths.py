"""Fast training data and exact acceptance measurement along greedy paths.

Greedy self-speculative decoding is lossless, so the committed tokens of a request are the full
model's greedy path whatever the head. The path is generated in batches (several times faster than
batch-1 decoding on the CPU), then one forward per sequence gives the layer-k hidden state and the
verifier's top-K at every position. Drafting is then simulated exactly: in a round whose pending
token sits at p, the head drafts from h_p, h_p+1, ...; the accepted prefix is where its argmax
equals the path, exactly as `SelfSpecDecoder` would decide. Simulated transitions hold the on-path
positions only (the accepted prefix and the first reject): the real decoder's later positions
see the rejected drafts' context, which a greedy path does not have.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from selfspec.prompts import Prompt, chat_ids, left_padded, pad_id
from selfspec.acceptance import mean_accepted_length as rounds_mal
from selfspec.model import eos_ids
from selfspec.transitions import DISTILL, DRAFTED, RoundMeta, Transition, make_transition


@dataclass
class GreedyPath:
    prompt_id: str
    category: str
    tokens: np.ndarray  # [T] prompt then greedy continuation
    prompt_len: int
    hidden: np.ndarray  # [T, d] float16: layer-k hidden state at every position
    target_topk_ids: np.ndarray  # [T, K] int32: verifier top-K at every position (predicting position + 1)
    target_topk_logprobs: np.ndarray  # [T, K] float32


@dataclass(frozen=True)
class Sampling:
    """Sampled rather than greedy continuations: more varied training text."""
    temperature: float
    top_p: float = 1.0
    seed: int = 0  # seeds torch's global RNG before a batch of samples is drawn (selfspec.path_cache)


@dataclass(frozen=True)
class PathSpec:
    """What a path is: the model (a spec, also the cache key), its length, where it is annotated."""
    model: str
    max_new_tokens: int
    exit_layer: int
    batch_size: int = 8  # of generation
    sampling: Sampling | None = None  # None: greedy


@torch.inference_mode()
def generate_paths(model, tokenizer, prompts: list[Prompt], spec: PathSpec,
                   progress: bool = True) -> list[tuple[list[int], int]]:
    """(prompt + continuation, prompt length) per prompt, generated in left-padded batches: greedy, or
    sampled (from torch's global RNG) when the spec says so."""
    encoded = [chat_ids(tokenizer, p.text) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    results: dict[int, tuple[list[int], int]] = {}
    pad = pad_id(tokenizer)
    eos = eos_ids(model.generation_config)
    s = spec.sampling
    sampling = ({"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0} if s
                else {"do_sample": False})
    desc = "sampled paths" if s else "greedy paths"
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), spec.batch_size):
            idx = order[start:start + spec.batch_size]
            input_ids, mask = left_padded([encoded[i] for i in idx], pad)
            width = input_ids.shape[1]
            out = model.generate(input_ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=spec.max_new_tokens, pad_token_id=pad, **sampling)
            for row, i in enumerate(idx):
                gen = out[row, width:].tolist()
                cut = next((j + 1 for j, tok in enumerate(gen) if tok in eos), len(gen))
                results[i] = (encoded[i] + gen[:cut], len(encoded[i]))
            bar.update(len(idx))
    return [results[i] for i in range(len(prompts))]


@torch.inference_mode()
def annotate_path(model, tokens: list[int], prompt_len: int, exit_layer: int, topk: int) -> GreedyPath:
    """One forward over a finished sequence: layer-k hidden states and verifier top-K at every position
    (prompt id and category left empty: `dataclasses.replace` them in)."""
    out = model(torch.tensor([tokens], device=model.device), output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].float(), -1).topk(topk, -1)
    return GreedyPath("", "", np.asarray(tokens, np.int32), prompt_len,
                      out.hidden_states[exit_layer][0].half().cpu().numpy(), logp.indices.int().cpu().numpy(),
                      logp.values.cpu().numpy())


@dataclass(frozen=True)
class RecordSpec:
    """How simulated rounds become Transitions: the ids they carry and the top-K they keep."""
    head_version: int = 0
    topk: int = 16
    run_id: str = "online"


def _head_logp(path: GreedyPath, head, start: int, end: int) -> torch.Tensor:
    """The head's log-probs (draft vocabulary) at positions start..end-1 of the path, teacher-forced."""
    param = next(head.parameters())
    hidden = torch.from_numpy(path.hidden[:end]).to(param.device, param.dtype)
    return torch.log_softmax(head.path_logits(hidden, start, end).float(), -1)


@torch.no_grad()
def simulate_rounds(path: GreedyPath, head, gamma: int, record: RecordSpec | None = None
                    ) -> tuple[list[int], list[Transition]]:
    """Replay greedy self-speculative decoding of this path with `head` and a fixed γ.

    Returns the accepted drafts per round and, with `record`, the rounds' transitions. The first
    generated token comes from prefill, so rounds start with the pending token at position prompt_len."""
    tokens, start = path.tokens, path.prompt_len
    end = len(tokens) - 1  # positions start..end-1 draft the token after them
    if end <= start:
        return [], []
    logp = _head_logp(path, head, start, end)
    match = head.to_full_ids(logp.argmax(-1)).cpu().numpy() == tokens[start + 1:end + 1]
    accepted, transitions, p = [], [], 0  # p: pending position, relative to start
    while p < end - start:
        n = min(gamma, end - start - p - 1)  # the bonus token needs one slot of what is left
        n_acc = int(np.argmin(np.append(match[p:p + n], False)))
        accepted.append(n_acc)
        if record is not None and n > 0:
            # Only on-path positions: off the path the simulation would repeat the greedy context of the
            # next round's positions, which adds compute, not information (on-path positions tile the path).
            kept = min(n, n_acc + 1)
            span = _Span(start + p, n_acc, _meta(path, record, path.prompt_id, len(accepted)))
            transitions.append(_path_transition(path, head, logp[p:p + kept], span, record.topk))
        p += n_acc + 1
    return accepted, transitions


@torch.no_grad()
def distill_transitions(path: GreedyPath, head, rows: range, request_id: str, record: RecordSpec) -> list[Transition]:
    """Distillation-only transitions over positions rows.start..rows.stop-1 of `path` (each predicting
    the next token), rows.step positions each. Nothing was drafted or judged there, so they carry no
    reward (on_path all False): only the KL term learns from them. Serves two sources of extra
    positions: the prompt's own (the verifier's distribution there comes with prefill, at the price of
    the output projection over the prompt) and sampled responses, whose tokens greedy verification
    would not have produced, so an accept/reject along them would be made up."""
    if rows.stop <= rows.start:
        return []
    logp = _head_logp(path, head, rows.start, rows.stop)
    return [_path_transition(path, head, logp[p - rows.start:min(p + rows.step, rows.stop) - rows.start],
                             _Span(p, -1, _meta(path, record, request_id, i)), record.topk)
            for i, p in enumerate(rows)]


def prompt_transitions(path: GreedyPath, head, span: int, record: RecordSpec) -> list[Transition]:
    """Distillation-only transitions over the prompt's positions, the last one predicting the first
    generated token."""
    return distill_transitions(path, head, range(0, path.prompt_len, span), f"{path.prompt_id}:prompt", record)


def response_transitions(path: GreedyPath, head, span: int, tag: str, record: RecordSpec) -> list[Transition]:
    """Distillation-only transitions over a (sampled) response's positions."""
    return distill_transitions(path, head, range(path.prompt_len, len(path.tokens) - 1, span),
                               f"{path.prompt_id}:{tag}", record)


def _meta(path: GreedyPath, record: RecordSpec, request_id: str, round_no: int) -> RoundMeta:
    now = time.time()
    return RoundMeta(record.run_id, 0, request_id, round_no, record.head_version, path.category, now, now, 0.0)


@dataclass
class _Span:
    pos: int  # the first position a transition covers
    n_accepted: int  # -1: nothing judged
    meta: RoundMeta


def _path_transition(path: GreedyPath, head, logp: torch.Tensor, span: _Span, topk: int) -> Transition:
    """The transition of positions span.pos.. (one row of `logp` each)."""
    pos, n = span.pos, logp.shape[0]
    k = min(topk, logp.shape[-1], path.target_topk_ids.shape[1])  # same K on both sides, within what is stored
    window = head.config.context_window
    kind = DRAFTED if span.n_accepted >= 0 else DISTILL
    drafted = {"hidden": path.hidden[pos:pos + n], "kind": np.full(n, kind, np.int8),
               "context_hidden": path.hidden[max(0, pos - window):pos] if window else np.zeros((0, 0), np.float16),
               **head.draft_fields(logp, head.to_full_ids(logp.argmax(-1)), k)}
    verified = {"target_topk_ids": path.target_topk_ids[pos:pos + n, :k],
                "target_topk_logprobs": path.target_topk_logprobs[pos:pos + n, :k],
                "target_tokens": path.tokens[pos + 1:pos + n + 1].astype(np.int32)}
    return make_transition(span.meta, drafted, verified, span.n_accepted)


def mean_accepted_length(paths: list[GreedyPath], head, gamma: int) -> float:
    """Mean accepted drafts + 1 per verification round over these paths, γ fixed."""
    return rounds_mal(a for path in paths for a in simulate_rounds(path, head, gamma)[0])
