"""The one-command GPU proof on a machine without a GPU: it says so and exits 0 at once;
its model table runs (tiny models, any backend)."""

import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_without_gpu_says_so_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ftjax.gpu_check"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No NVIDIA GPU visible to jax" in out.stdout
    # No tests, benchmarks or models were run: importing jax is all it costs.
    assert "==" not in out.stdout
    assert time.perf_counter() - t0 < 60
    # The shell entry point checks before installing anything (no nvidia-smi on PATH).
    out = subprocess.run(["bash", os.path.join(REPO, "examples", "gpu_check.sh")],
                         env=dict(env, PATH="/usr/bin:/bin"), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "no NVIDIA GPU here" in out.stdout, out
    assert not os.path.exists(os.path.join(REPO, ".venv-gpu-check"))


@pytest.mark.slow
def test_gpu_check_model_table_runs(capsys):
    from ftjax import gpu_check

    assert gpu_check.run_model_table(True, [1], [8], 3, 1, 600.0, None,
                                     only=["tiny llama"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("tiny llama")]
    assert len(rows) == len(gpu_check.MODES), rows   # bf16, int8 weights, int8 KV
    assert not any("failed" in r or "skipped" in r for r in rows), rows
    assert gpu_check.peak_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert gpu_check.peak_gbps("NVIDIA H100 PCIe") == 2000
    assert gpu_check.peak_gbps("mystery accelerator") is None
