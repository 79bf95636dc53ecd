"""Which joining prompts prefill together: one pass of several prompts, padded to the longest and masked by
position, saves a pass's fixed cost but computes the padding. SelfSpecDecoder.join_all asks it."""
from __future__ import annotations

# Prompts prefill together when padding them to the longest adds at most this share of their tokens, or at
# most PREFILL_SLACK tokens: on the 2-core CPU a pass costs what ~25 more prompt tokens cost (SmolLM2: 61 ms
# for 8 tokens, 734 ms for 400), and on a GPU far more. A pass holds at most PREFILL_TOKENS (padded) tokens.
PREFILL_PADDING, PREFILL_SLACK, PREFILL_TOKENS = 0.25, 64, 4096


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """The prompts (indices into `lengths`) that prefill in one pass: by length, shortest first, a prompt
    joining the pass before it while the padding stays within PREFILL_PADDING or PREFILL_SLACK, and the pass
    within PREFILL_TOKENS."""
    groups: list[list[int]] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups:
            padded = (len(groups[-1]) + 1) * lengths[i]  # sorted: the newest is the longest
            waste = padded - tokens - lengths[i]
            if padded <= PREFILL_TOKENS and waste <= max(PREFILL_PADDING * (tokens + lengths[i]), PREFILL_SLACK):
                groups[-1].append(i)
                tokens += lengths[i]
                continue
        groups.append([i])
        tokens = lengths[i]
    return groups
