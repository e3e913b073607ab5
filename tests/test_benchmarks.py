"""benchmarks/gpu.sh --device cpu --tiny: every step of the GPU check runs on CPU and the results block holds
each benchmark's numbers, so the script is known to work before a GPU runs it. TRL is optional: without it the
DPO comparison says it was skipped and why."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu():
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--device", "cpu", "--tiny"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    block = proc.stdout.split("---- results block for benchmarks/RESULTS.md ----")[1]
    titles = re.findall(r"^### (.+)$", block, re.M)
    assert titles == ["GPU-marked tests (skipped without CUDA)", "Sampler vs transformers generate",
                      "Fused log-prob op vs naive", "One DPO step vs TRL DPOTrainer"]
    assert ("needs a CUDA GPU" in block or " passed" in block) and "failed" not in block
    assert re.search(r"batch   1: transformers +[\d.]+ tok/s \| ours +[\d.]+ tok/s \([\d.]+x\)", block)
    assert re.search(r"batch   4: transformers", block)
    assert re.search(r"fused/naive: memory [\d.]+, time [\d.]+", block)
    assert re.search(r"train_dpo.py: +\d+ tokens/s, peak memory +\d+ MB", block)
    if importlib.util.find_spec("trl") is None:
        assert "trl: skipped (ModuleNotFoundError: No module named 'trl')" in block
    else:
        assert re.search(r"TRL DPOTrainer: +\d+ tokens/s", block) or "trl: skipped (" in block
    assert re.search(r"FSDP2 on two GPUs equal to one: not run \(\d+ CUDA device\(s\) visible", block)
