"""The held-out set every published version is scored on, generated on a background thread.

Greedy paths of the last `heldout.prompts` prompts of the held-out workload take minutes to generate on
a CPU. Nothing waits for them but the scores: the learner trains and publishes meanwhile, and the
versions published before the paths exist are scored as soon as they do (trainer.Learner._score).
Paths are cached per prompt (selfspec.path_cache), so a later run on the same prompts starts warm.
"""
from __future__ import annotations

import threading

from learner.config import HeldoutConfig, LearnerConfig
from learner.status import LearnerStatus


def heldout_prompts(h: HeldoutConfig, key: str = "heldout") -> list:
    """The last `h.prompts` prompts of the held-out workload; too few is a ValueError naming `key`."""
    from selfspec.prompts import load_prompts

    prompts = load_prompts(h.workload)  # a missing file says here what to run
    if h.prompts > len(prompts):
        raise ValueError(f"{key}.prompts = {h.prompts}: the workload {h.workload!r} has {len(prompts)} prompts")
    return prompts[len(prompts) - h.prompts:]


class HeldoutPaths:
    def __init__(self, paths: list | None = None):
        self._paths = paths
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def generate(cls, cfg: LearnerConfig, model, tokenizer, status: LearnerStatus) -> "HeldoutPaths":
        """Start generating the paths of `cfg.heldout` (the prompt count is checked here, at once)."""
        self = cls()
        self._thread = threading.Thread(target=self._generate, name="dvi-heldout-paths", daemon=True,
                                        args=(cfg, model, tokenizer, heldout_prompts(cfg.heldout), status))
        self._thread.start()
        return self

    def _generate(self, cfg: LearnerConfig, model, tokenizer, prompts: list, status: LearnerStatus) -> None:
        from selfspec.greedy_paths import PathSpec
        from selfspec.path_cache import cached_paths

        h = cfg.heldout
        spec = PathSpec(cfg.model, h.max_new_tokens, cfg.exit_layer, h.collect_batch)
        paths: list = []
        try:
            # a batch at a time, so the console can follow (cached prompts come back at once)
            for start in range(0, len(prompts), h.collect_batch):
                status.progress("heldout", "held-out greedy paths", len(paths), len(prompts))
                paths += cached_paths(model, tokenizer, prompts[start:start + h.collect_batch], spec)
            status.progress("heldout", "held-out greedy paths", len(paths), len(prompts))
            self._paths = paths
        except BaseException as err:  # noqa: BLE001 - surfaced to the loop by ready()/wait()
            status.set("heldout", f"failed: {type(err).__name__}: {err}")
            self._error = err

    def ready(self) -> list | None:
        """The paths once generated, else None; a failed generation raises here, in the learner's loop."""
        if self._error is not None:
            raise RuntimeError(f"held-out paths failed: {self._error}") from self._error
        return self._paths

    def wait(self) -> list:
        if self._thread is not None:
            self._thread.join()
        paths = self.ready()
        assert paths is not None
        return paths
