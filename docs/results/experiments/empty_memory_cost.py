"""What an empty traffic memory adds to a round: the copy proposals of one sequence over a 400-token text,
with the request's own text alone and with an empty memory beside it (best of 5 x 20,000 calls).

Run from the project root with the venv: python docs/results/experiments/empty_memory_cost.py"""
import random
import time

from selfspec.copy_sources import CopySources
from selfspec.suffix_index import SuffixIndex

random.seed(0)
text = [random.randrange(49152) for _ in range(400)]
for name, sources in (("own text only", CopySources(1)), ("own text + empty memory", CopySources(1, SuffixIndex()))):
    index, runs = sources.text_index(text), []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20000):
            sources.propose(index, 4)
        runs.append((time.perf_counter() - start) / 20000 * 1e6)
    print(f"{name}: {min(runs):.2f} us per sequence-round")
