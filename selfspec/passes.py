"""The passes a decoding round runs (trunk, drafter-head step, verify), eager or replayed as CUDA graphs.

On a GPU a 135M model at batch 1 is bound by launches, not by arithmetic: an eager SmolLM2 step issues
~450 kernels in ~19 ms of Python for ~2.6 ms of GPU work (torch.profiler on an H200). gpt-fast's recipe
removes the gap: a KV cache at fixed addresses whose positions live in device tensors, so that a pass of
m tokens can be captured once as a CUDA graph and replayed at every position.

Modes (`--passes`, the `passes` config key):
- `eager`: SplitModel itself, per-layer cache lengths and attention over exactly the filled part (the
  CPU path).
- `static`: StaticPasses without graphs: positions in device tensors over one reused StaticKVCache,
  attention over its whole capacity masked by position, run eagerly. What the graphs replay, and a path
  the CPU tests check against `eager`.
- `graphs`: StaticPasses capturing each pass shape (kind, batch bucket, m tokens wide) the first time it runs
  and replaying it after that; a batch of B rows runs in the smallest bucket of BATCH_BUCKETS that holds it,
  the spare rows writing into free slots (vLLM captures per bucketed batch size the same way). Prefill and
  anything wider than MAX_GRAPH_TOKENS stay eager.
- `auto`: `graphs` on CUDA, `eager` elsewhere.
"""
from __future__ import annotations

import warnings
from typing import Callable, Protocol

import torch

from selfspec.kv_cache import Block, StaticKVCache
from selfspec.split import SplitModel

PASS_MODES = ("auto", "eager", "static", "graphs")  # dvi.cli.args repeats them (no torch import there)
MAX_GRAPH_TOKENS = 16  # a round passes at most γ+1 <= 9 tokens; longer blocks are prompts
CAPACITY_STEP = 256  # the shared cache grows in these steps, so that requests of similar length share graphs
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # batch sizes captured as graphs; larger batches run eagerly


class PassRunner(Protocol):
    """What a decoder runs its passes on: SplitModel itself (eager) or StaticPasses (static, graphs).
    `start` is the block's first position (one row) or a Block (a row per sequence of the batch, each
    from its own position); a row's cache covers [0, start) before the call."""
    config: object  # the model's transformers config
    device: torch.device

    def new_cache(self, capacity: int, slots: int = 1): ...
    def trunk(self, token_ids: torch.Tensor, start: int | Block, cache) -> torch.Tensor: ...  # layers [0, k): hidden
    def verify(self, hidden: torch.Tensor, start: int | Block, cache,
               last: int | None = None) -> torch.Tensor: ...  # layers [k, L) + lm_head (of each row's last tokens)
    def head_logits(self, head, hidden: torch.Tensor, start: int, head_cache) -> torch.Tensor: ...


def pass_runner(split: SplitModel, mode: str = "auto") -> PassRunner:
    """The PassRunner for `mode`."""
    if mode not in PASS_MODES:
        raise ValueError(f"unknown passes mode {mode!r}: choose one of {', '.join(PASS_MODES)}")
    if mode == "auto":
        mode = "graphs" if split.device.type == "cuda" else "eager"
    if mode == "eager":
        return split
    if mode == "graphs" and split.device.type != "cuda":
        raise ValueError(f"passes mode 'graphs' needs a CUDA device, the model is on {split.device}: "
                         f"use --passes eager (or static)")
    return StaticPasses(split, graphs=mode == "graphs")


def passes_mode(passes: PassRunner) -> str:
    """The mode `passes` runs in now: `graphs` turns into `static` if a capture failed (see .fallback)."""
    if not isinstance(passes, StaticPasses):
        return "eager"
    return "graphs" if passes.graphs and passes.fallback is None else "static"


class _Graph:
    """One pass captured as a CUDA graph, with its own input buffer; calling it copies the input in,
    replays, and returns a copy of the output (the next replay overwrites it)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, pool):
        self.input = example.clone()
        # Lazy set-up (cuBLAS workspaces, kernel choice) may not happen inside a capture: run once first,
        # on a side stream as torch.cuda.graphs asks. It writes the same KV entries the replay will.
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            fn(self.input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a Ray actor's control threads may touch CUDA while the decode thread captures
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn(self.input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        self.graph.replay()
        return self.output.clone()


class StaticPasses:
    """SplitModel's passes over one StaticKVCache that this decoder's sequences share (a slot each), grown
    when a request needs more room or the batch more slots; with `graphs`, replayed as CUDA graphs."""

    def __init__(self, split: SplitModel, graphs: bool):
        self.split, self.graphs = split, graphs
        self.config, self.device = split.config, split.device
        self.cache: StaticKVCache | None = None
        self.captured: dict[tuple[str, int, int], _Graph] = {}
        self._head: tuple[object, dict[int, _Graph]] | None = None  # the head (kept alive), its step per bucket
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self.fallback: str | None = None  # why graphs were turned off (a capture failed), if they were

    def new_cache(self, capacity: int, slots: int = 1) -> StaticKVCache:
        """The shared cache, with room for `slots` sequences of `capacity` positions. Growing it allocates a
        new one (and drops the captured graphs, which read the old addresses); the decoder copies its
        sequences over (selfspec.kv_cache.carry)."""
        slots = _bucket(slots) if self._use_graphs() else slots
        if self.cache is None or capacity > self.cache.capacity or slots > self.cache.slots:
            size = max(capacity, min(-(-capacity // CAPACITY_STEP) * CAPACITY_STEP, self.split.max_positions))
            if self.cache is not None:
                size, slots = max(size, self.cache.capacity), max(slots, self.cache.slots)
            self.captured.clear()  # graphs read the old cache's addresses
            self._head = None
            self.cache = None  # free it before allocating the next
            self.cache = StaticKVCache(self.config, size, self.split.dtype, self.device, slots)
        return self.cache

    def trunk(self, token_ids: torch.Tensor, start: int | Block, cache: StaticKVCache) -> torch.Tensor:
        ids = token_ids if token_ids.dim() == 2 else token_ids[None]
        return self._pass("trunk", self.split.trunk, ids, start, cache)

    def verify(self, hidden: torch.Tensor, start: int | Block, cache: StaticKVCache,
               last: int | None = None) -> torch.Tensor:
        block = Block.of(start, hidden.shape[1])
        if last is not None:  # a prefill: eager, as its width varies with every prompt
            cache.set_starts(block, hidden.shape[1])
            logits = self.split.verify(hidden, block, cache, last)
        else:
            logits = self._pass("verify", self.split.verify, hidden, block, cache)
        return logits if isinstance(start, Block) else logits[0]

    def head_logits(self, head, hidden: torch.Tensor, start: int, head_cache) -> torch.Tensor:
        """A head without attention layers reads only each row's newest hidden state [B, 1, d]: captured
        per head and batch bucket. Attention heads keep their own (dynamic) cache and run eagerly."""
        if not self._use_graphs() or head.attends or hidden.shape[1] != 1:
            return head.next_logits(hidden, start, head_cache)
        if self._head is None or self._head[0] is not head:
            self._head = (head, {})  # drop the last head's graphs (and the head) before capturing the next
        rows, bucket = hidden.shape[0], _bucket(hidden.shape[0])
        padded = torch.cat([hidden, hidden[:1].expand(bucket - rows, -1, -1)]) if bucket > rows else hidden
        graph = self._head[1].get(bucket)
        if graph is None:
            graph = self._capture(lambda x: head.next_logits(x, start, None), padded)
            if graph is None:
                return head.next_logits(hidden, start, head_cache)
            self._head[1][bucket] = graph
        return graph(padded)[:rows]

    def _pass(self, kind: str, fn, x: torch.Tensor, start: int | Block, cache: StaticKVCache) -> torch.Tensor:
        """x: ids [B, n] or hidden [B, n, d]; a graph per (kind, batch bucket, n), the spare rows of the
        bucket in the free slots after the batch's."""
        rows, n = x.shape[0], x.shape[1]
        block = Block.of(start, n)
        bucket = _bucket(rows)
        if (not self._use_graphs() or cache is not self.cache or n > MAX_GRAPH_TOKENS or block.first_slot != 0
                or bucket > cache.slots):
            cache.set_starts(block, n)
            return fn(x, block, cache)
        spare = bucket - rows
        cache.set_starts(Block(block.starts + (0,) * spare, block.counts + (n,) * spare), n)
        if spare:
            x = torch.cat([x, x[:1].expand(spare, *x.shape[1:])])
        graph = self.captured.get((kind, bucket, n))
        if graph is None:
            full = Block((0,) * bucket, (n,) * bucket)  # its starts are read from the cache when replayed
            graph = self._capture(lambda inp: fn(inp, full, cache), x)
            if graph is None:
                return fn(x, block, cache)[:rows]
            self.captured[(kind, bucket, n)] = graph
        return graph(x)[:rows]

    def _use_graphs(self) -> bool:
        return self.graphs and self.fallback is None

    def _capture(self, fn, example: torch.Tensor) -> _Graph | None:
        """Capture `fn`; if CUDA refuses, say why once and go on eagerly on the same static path."""
        try:
            return _Graph(fn, example, self._pool)
        except RuntimeError as e:
            self.fallback = f"CUDA graph capture failed, decoding eagerly: {e}"
            self.captured.clear()
            self._head = None
            warnings.warn(self.fallback, RuntimeWarning, stacklevel=3)
            return None


def _bucket(rows: int) -> int:
    """The smallest captured batch size that holds `rows` (rows itself beyond the largest)."""
    return next((b for b in BATCH_BUCKETS if b >= rows), rows)
