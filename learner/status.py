"""What the learner is doing, in words, for the driver's console.

Set-up can take minutes while the actors already serve: loading the model, choosing the draft
vocabulary from served tokens, generating the held-out greedy paths. Each activity keeps one line in
the run's `learner:status` hash; `dvi run`'s monitor prints a line whenever one changes. Best effort:
a status that cannot be written never stops the learner.
"""
from __future__ import annotations

import redis

from buffer.keys import RunKeys


class LearnerStatus:
    def __init__(self, client: redis.Redis | None, run_id: str):
        self.client, self.key = client, RunKeys(run_id).learner_status

    def set(self, activity: str, line: str) -> None:
        if self.client is None:
            return
        try:
            self.client.hset(self.key, activity, line)
        except redis.RedisError:
            pass

    def progress(self, activity: str, what: str, done: int, total: int) -> None:
        self.set(activity, f"{what} {done}/{total}" + (" (done)" if done >= total else ""))


def read_status(client: redis.Redis, run_id: str) -> dict[str, str]:
    """activity -> its latest line."""
    return {k.decode(): v.decode() for k, v in client.hgetall(RunKeys(run_id).learner_status).items()}
