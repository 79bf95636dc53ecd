"""The Transition record: one verification round, everything the learner needs, as numpy arrays.

Every position a round verified is a row: the verifier computed the full model's distribution there
and the trunk the layer-k hidden state, so each row is a distillation target whatever drafted it.
Each row has a `kind`: `drafted` (the head proposed the next token: behaviour fields, and a reward
up to the first reject), `copied` (an n-gram of the request's own text proposed it), `remembered` (the traffic memory did:
what other requests were served, selfspec.suffix_index), `plain` (nothing did: the pending
token of a round without drafts, or the last verified position), `distill` (a position of known text
distilled on: a prompt or a sampled response). Rows of any kind but `drafted` carry KL targets only:
`accept_mask` and `on_path` False, `draft_tokens` -1 and no behaviour log-prob.

A transition is self-contained: because the trunk is frozen, the stored layer-k hidden states stay
valid training inputs whatever head version reads them later. Only numpy (no torch tensors) so that
it crosses Ray and Redis boundaries cheaply and without pickling.

The decoder's records are built here from a round's values (`round_transition`, `prompt_transition`
for prefill's prompt rows); the greedy-path simulation builds its own through `make_transition`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from selfspec.engine import Draft

KINDS = ("drafted", "copied", "plain", "distill", "remembered")  # new kinds go last: stored values stay
DRAFTED, COPIED, PLAIN, DISTILL, REMEMBERED = range(len(KINDS))

# name -> (dtype, trailing shape spec). "n" = verified positions (rows), "K" = top-k, "d" = hidden size,
# "W" = context window. Used by validation here and by the wire codec.
ARRAY_FIELDS: dict[str, tuple[np.dtype, tuple[str, ...]]] = {
    "hidden": (np.dtype(np.float16), ("n", "d")),
    "draft_tokens": (np.dtype(np.int32), ("n",)),
    "draft_logprobs": (np.dtype(np.float32), ("n",)),
    "draft_topk_ids": (np.dtype(np.int32), ("n", "K")),
    "draft_topk_logprobs": (np.dtype(np.float32), ("n", "K")),
    "target_topk_ids": (np.dtype(np.int32), ("n", "K")),
    "target_topk_logprobs": (np.dtype(np.float32), ("n", "K")),
    "target_tokens": (np.dtype(np.int32), ("n",)),
    "accept_mask": (np.dtype(np.bool_), ("n",)),
    "on_path": (np.dtype(np.bool_), ("n",)),
    "kind": (np.dtype(np.int8), ("n",)),
    "context_hidden": (np.dtype(np.float16), ("W", "d")),
}
class TransitionError(ValueError):
    """A transition whose arrays do not agree with each other or with the contract."""


@dataclass
class RoundMeta:
    """The scalar fields of a Transition: who drafted, where, when."""
    run_id: str
    actor_id: int
    request_id: str
    round: int
    head_version: int
    workload: str
    t_start: float  # wall-clock seconds (time.time()) when the round began drafting
    t_end: float  # ... and when verification finished
    temperature: float  # 0.0 = greedy


SCALAR_FIELDS = tuple(f.name for f in fields(RoundMeta))


@dataclass
class Transition(RoundMeta):
    """One verified round: its RoundMeta, then the arrays."""
    hidden: np.ndarray  # [n, d] float16: the layer-k hidden state the head saw at each drafted position
    draft_tokens: np.ndarray  # [n] int32: full-vocabulary ids
    draft_logprobs: np.ndarray  # [n] float32: behaviour log-prob of each drafted token
    draft_topk_ids: np.ndarray  # [n, K] int32
    draft_topk_logprobs: np.ndarray  # [n, K] float32
    target_topk_ids: np.ndarray  # [n, K] int32: verifier distribution at the same positions
    target_topk_logprobs: np.ndarray  # [n, K] float32
    target_tokens: np.ndarray  # [n] int32: the verifier's choice at each position
    accept_mask: np.ndarray  # [n] bool: True on the accepted prefix
    on_path: np.ndarray  # [n] bool: positions before or at the first reject (these carry reward)
    kind: np.ndarray  # [n] int8: index into KINDS (drafted, copied, plain, distill)
    # [w, d] float16, w <= W: trunk hidden of the last w committed positions before the draft (fewer
    # than the head's window W only at the start of a short request); [0, 0] for single-position heads.
    context_hidden: np.ndarray = field(
        default_factory=lambda: np.zeros((0, 0), np.float16))

    @property
    def transition_id(self) -> str:
        return f"{self.run_id}:{self.actor_id}:{self.request_id}:{self.round}"

    @property
    def n(self) -> int:
        return int(self.draft_tokens.shape[0])

    def validate(self) -> "Transition":
        """Check dtypes and that every array agrees on n, K and d; raise TransitionError naming the field."""
        dims: dict[str, int] = {}
        for name, (dtype, spec) in ARRAY_FIELDS.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray):
                raise TransitionError(f"{name}: expected numpy array, got {type(arr).__name__}")
            if arr.dtype != dtype:
                raise TransitionError(f"{name}: dtype {arr.dtype}, expected {dtype}")
            if arr.ndim != len(spec):
                raise TransitionError(f"{name}: shape {arr.shape}, expected {len(spec)} dims {spec}")
            if name == "context_hidden" and arr.shape[0] == 0:
                continue  # no context window: its hidden size is free
            for sym, size in zip(spec, arr.shape):
                if dims.setdefault(sym, size) != size:
                    raise TransitionError(f"{name}: dim {sym}={size} disagrees with {dims[sym]} seen before")
        accepted = self.accept_mask.astype(np.int8)
        if np.any(np.diff(accepted) > 0):
            raise TransitionError("accept_mask: accepted positions must form a prefix")
        if np.any(self.accept_mask & ~self.on_path):
            raise TransitionError("accept_mask: an accepted position must be on_path")
        if np.any((self.kind < 0) | (self.kind >= len(KINDS))):
            raise TransitionError(f"kind: values must index {KINDS}")
        if np.any(self.on_path & (self.kind != DRAFTED)):
            raise TransitionError("on_path: only rows the head drafted carry a reward")
        return self

    def scalars(self) -> dict:
        return {name: getattr(self, name) for name in SCALAR_FIELDS}

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_FIELDS}

    @classmethod
    def from_parts(cls, scalars: dict, arrays: dict[str, np.ndarray]) -> "Transition":
        names = {f.name for f in fields(cls)}
        unknown = (set(scalars) | set(arrays)) - names
        if unknown:
            raise TransitionError(f"unknown fields {sorted(unknown)}")
        return cls(**scalars, **arrays).validate()


def make_transition(meta: RoundMeta, drafted: dict[str, np.ndarray], verified: dict[str, np.ndarray],
                    n_accepted: int) -> Transition:
    """The one way a round becomes a Transition, for the decoder and the greedy-path simulation alike.

    `drafted`: what the head saw and proposed (`hidden`, `context_hidden`, `kind`, `draft_*`);
    `verified`: the verifier's side (`target_*`). Of the `drafted` rows, the first `n_accepted` were
    accepted and the next one was the first reject; n_accepted = -1: nothing was judged."""
    positions = np.arange(len(drafted["draft_tokens"]))
    judged = drafted["kind"] == DRAFTED
    return Transition(**asdict(meta), **drafted, **verified, accept_mask=(positions < n_accepted) & judged,
                      on_path=(positions <= n_accepted) & judged).validate()


def undrafted_fields(rows: int, k: int) -> dict[str, np.ndarray]:
    """The draft side of rows the head did not draft: no token, no behaviour distribution."""
    return {"draft_tokens": np.full(rows, -1, np.int32), "draft_logprobs": np.zeros(rows, np.float32),
            "draft_topk_ids": np.full((rows, k), -1, np.int32),
            "draft_topk_logprobs": np.full((rows, k), -np.inf, np.float32)}


@dataclass
class VerifiedRound:
    """What a decoding round verified, as the decoder holds it (torch tensors)."""
    draft: Draft
    hidden: object  # [1, rows, d]: the rows' layer-k states
    context: list  # the committed window's states before the rows ([d] each)
    target_logits: object  # [rows, V]: the verifier's
    emitted: list[int]  # the accepted drafts, then the verifier's own token


@dataclass
class Prefill:
    """What prefill verified: the prompt (a tensor of ids), its layer-k states [1, len, d], the verifier's
    logits [len, V] and the first generated token."""
    prompt: object
    hidden: object
    logits: object
    first: int


def round_transition(meta: RoundMeta, verified: VerifiedRound, k: int, head=None) -> Transition:
    """A decoding round's record. Every position it verified is a row: the drafts' (head, copied or remembered) and the
    last one, whose next token nothing drafted (plain); a round without drafts is one plain row. `head`:
    the drafter, for the draft side of drafted rows; `k`: the top-K of both sides."""
    import torch  # here, not above: the buffer imports this module and never needs torch

    draft, target_logits, emitted = verified.draft, verified.target_logits, verified.emitted
    rows, n = target_logits.shape[0], len(draft.tokens)
    kind = np.full(rows, PLAIN, np.int8)
    kind[:n] = {"drafted": DRAFTED, "copied": COPIED, "remembered": REMEMBERED}.get(draft.kind, PLAIN)
    drafted = undrafted_fields(rows, k)
    if draft.kind == "drafted":
        tau = meta.temperature or 1.0  # greedy: store the head's own (T=1) distribution
        draft_logp = torch.log_softmax(torch.stack(draft.logits) / tau, -1)
        for name, value in head.draft_fields(draft_logp, torch.tensor(draft.tokens), k).items():
            drafted[name][:n] = value
    # the verifier's choice: what it emitted up to the first reject, its argmax after
    target_tokens = emitted + target_logits[len(emitted):].argmax(-1).tolist()
    drafted.update(kind=kind, **_states(verified.hidden, torch.stack(verified.context) if verified.context else None))
    return make_transition(meta, drafted, _verified(target_logits, target_tokens, meta.temperature, k),
                           len(emitted) - 1)


def prompt_transition(meta: RoundMeta, prefill: Prefill, rows: int, k: int) -> Transition:
    """The prompt's last `rows` positions as KL rows (kind distill, round 0): their next tokens are the
    prompt's own, then the first generated one."""
    rows = min(rows, prefill.prompt.numel())
    targets = (prefill.prompt[1:].tolist() + [prefill.first])[-rows:]
    drafted = undrafted_fields(rows, k)
    drafted.update(kind=np.full(rows, DISTILL, np.int8), **_states(prefill.hidden[:, -rows:], None))
    return make_transition(meta, drafted, _verified(prefill.logits[-rows:], targets, meta.temperature, k), -1)


def _verified(target_logits, target_tokens: list[int], temperature: float, k: int) -> dict[str, np.ndarray]:
    """The verifier's side of the rows: its top-K at the request's temperature, and its tokens."""
    target_top = (target_logits.float() / (temperature or 1.0)).log_softmax(-1).topk(k, -1)
    return {"target_topk_ids": target_top.indices.int().cpu().numpy(),
            "target_topk_logprobs": target_top.values.float().cpu().numpy(),
            "target_tokens": np.asarray(target_tokens, np.int32)}


def _states(hidden, window) -> dict[str, np.ndarray]:
    """The layer-k states a transition stores: the rows' own, and the committed window before them
    ([w, d]; None: no window)."""
    return {"hidden": hidden[0].half().cpu().numpy(),
            "context_hidden": window.half().cpu().numpy() if window is not None else np.zeros((0, 0), np.float16)}
