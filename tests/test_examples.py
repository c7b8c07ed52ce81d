"""The scripts in examples/ run as their docstrings say (what a user copies first must work)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_autograd_example_checks_its_gradients_and_learns():
    out = run_example("autograd.py")
    worst = float(re.search(r"largest relative difference (\S+)", out).group(1))
    assert worst < 1e-5
    accuracies = [float(a) for a in re.findall(r"test accuracy ([\d.]+)%", out)]
    assert len(accuracies) == 6 and accuracies[-1] >= 90, out


def test_autograd_example_refuses_cuda_without_a_gpu_or_runs_there():
    import pykernels as pk

    if pk.cuda_available():
        out = run_example("autograd.py", "--device", "cuda", "--steps", "50")
        assert "test accuracy" in out
    else:
        done = subprocess.run([sys.executable, str(EXAMPLES / "autograd.py"), "--device", "cuda"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "no CUDA backend" in done.stderr, done.stderr
