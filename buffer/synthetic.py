"""Random, well-formed transitions shaped like real ones: for buffer benchmarks and tests."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from selfspec.transitions import RoundMeta, make_transition

VOCAB = 49152  # SmolLM2's


def random_transition(rng: np.random.Generator, n: int = 4, d: int = 576, k: int = 16, window: int = 0,
                      **scalars):
    """n drafted positions, hidden size d, top-k, a context window of `window` positions; `scalars`
    override the RoundMeta fields (run_id, request_id, round, head_version, ...)."""
    meta = replace(RoundMeta("run", 0, "r0", 0, 0, "random", 0.0, 0.0, 0.0), **scalars)
    drafted = {"hidden": rng.standard_normal((n, d)).astype(np.float16),
               "context_hidden": (rng.standard_normal((window, d)).astype(np.float16) if window
                                  else np.zeros((0, 0), np.float16)),
               "draft_tokens": rng.integers(0, VOCAB, n, dtype=np.int32),
               "draft_logprobs": -rng.random(n, dtype=np.float32),
               "draft_topk_ids": rng.integers(0, VOCAB, (n, k), dtype=np.int32),
               "draft_topk_logprobs": -rng.random((n, k), dtype=np.float32),
               "kind": np.zeros(n, np.int8)}  # all drafted
    verified = {"target_topk_ids": rng.integers(0, VOCAB, (n, k), dtype=np.int32),
                "target_topk_logprobs": -rng.random((n, k), dtype=np.float32),
                "target_tokens": rng.integers(0, VOCAB, n, dtype=np.int32)}
    return make_transition(meta, drafted, verified, int(rng.integers(0, n + 1)))
