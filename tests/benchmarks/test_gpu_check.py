"""make gpu-check without a GPU: one clear line, exit 2, no traceback."""

import os
import subprocess
import sys


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); "
        "run it on a machine with one H100/H200-class GPU"
    ]
    dry = subprocess.run(["make", "-n", "gpu-check"], capture_output=True, text=True, check=True)
    assert ".venv/bin/python benchmarks/gpu_check.py" in dry.stdout
