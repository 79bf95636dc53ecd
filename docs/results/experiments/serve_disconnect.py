"""How fast a replica is free again when a client leaves a long stream: the next request's time to first token,
against an idle replica's (docs/serving.md, Client disconnects). `python serve_disconnect.py OUT_DIR`."""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import openai
from run_fixtures import ServeProcess, free_port, write_serve
tmp = Path(sys.argv[1]); tmp.mkdir(parents=True, exist_ok=True)
proc = ServeProcess(write_serve(tmp, free_port(), **{"learn": False, "serve.served_model_name": "tiny", "model": "smollm2-135m", "exit_layer": 4}))
c = openai.OpenAI(base_url=proc.url, api_key="none", max_retries=0, timeout=120)
def ttft(**kw):
    t = time.perf_counter()
    s = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "eta"}], max_tokens=4, stream=True, **kw)
    next(iter(s)); first = time.perf_counter() - t
    for _ in s: pass
    return first
idle = [ttft() for _ in range(5)]
after = []; long_e2e = []
for _ in range(5):
    t = time.perf_counter()
    full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Write a long story about a dragon who learns to cook."}], max_tokens=200, temperature=0)
    long_e2e.append(time.perf_counter() - t)
    s = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Write a long story about a dragon who learns to cook."}], max_tokens=200, temperature=0, stream=True)
    next(iter(s)); s.close()
    after.append(ttft())
print("idle TTFT s", [round(x, 3) for x in idle], "median", round(statistics.median(idle), 3))
print("TTFT right after a client left a 200-token stream", [round(x, 3) for x in after], "median", round(statistics.median(after), 3))
print("a full 200-token request takes s", [round(x, 2) for x in long_e2e])
print("exit", proc.stop())
