"""`ftjax bench` (issue 19): the fields of each cell, its flags, HF timed in a process of
its own, and the README table script's rendering. Behaviour only: no timing asserts."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

import ftjax
from ftjax.bench import cpu_description

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ftjax.demo_model_path()

ROW_FIELDS = {"batch", "input_len", "output_len", "latency_ms", "first_token_ms", "tok_s",
              "decode_tok_s", "decode_step_ms", "roofline_tok_s", "roofline_pct",
              "peak_rss_mib"}
HF_FIELDS = {"hf_latency_ms", "hf_first_token_ms", "hf_tok_s", "hf_decode_tok_s", "speedup",
             "decode_speedup"}


def _bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "ftjax", "bench", "--model", DEMO, "--batch", "1,2",
                        "--input-len", "8", "--output-len", "4", "--repeats", "1", "--json",
                        str(out), *extra], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout, json.loads(out.read_text())


def test_bench_int8_weights_and_cache_report_every_field(tmp_path):
    stdout, res = _bench(tmp_path, "--quant", "int8", "--kv-cache-dtype", "int8")
    meta = res["meta"]
    assert meta["quant"] == "int8" and meta["kv_cache_dtype"] == "int8"
    assert meta["cpu"] == cpu_description() and "cores" in meta["cpu"]
    assert meta["bandwidth_gbs"] > 0 and meta["jax"] and isinstance(meta["ftjax_env"], dict)
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert set(r) == ROW_FIELDS
        # (no ordering between latency and first token: single timed runs on a shared
        # machine can invert them)
        assert r["latency_ms"] > 0 and r["first_token_ms"] > 0
        assert 0 < r["roofline_pct"] and r["peak_rss_mib"] > 0
    assert "quant int8, kv_cache_dtype int8" in stdout and meta["cpu"] in stdout
    assert not meta["torch_imported"]


@pytest.mark.torch
def test_bench_compare_hf_times_hf_in_another_process(tmp_path):
    stdout, res = _bench(tmp_path, "--compare", "hf")
    meta = res["meta"]
    # HF ran in a child process; torch was never imported where XLA runs
    assert meta["hf_pid"] != meta["pid"] and not meta["torch_imported"]
    for r in res["rows"]:
        assert set(r) == ROW_FIELDS | HF_FIELDS
        assert r["hf_latency_ms"] > 0 and r["hf_first_token_ms"] > 0
        assert r["speedup"] == pytest.approx(r["tok_s"] / r["hf_tok_s"])
    assert "x HF" in stdout and "separate process" in stdout


@pytest.mark.torch
def test_bench_hf_worker_reports_its_failure(tmp_path):
    # a job the worker cannot run fails with its reason, not a hang or an empty result
    from ftjax.bench import time_hf

    class Args:
        model, preset, dtype, output_len, repeats = str(tmp_path), None, "float32", 2, 1

    with pytest.raises(RuntimeError, match="HF process failed"):
        time_hf(Args, {1: [[1, 2, 3]]})


def _table_script():
    spec = importlib.util.spec_from_file_location(
        "bench_cpu_table", ROOT / "examples" / "bench_cpu_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(batch, tok_s, hf=True, **kw):
    r = {"batch": batch, "input_len": 128, "output_len": 32, "tok_s": tok_s,
         "decode_tok_s": tok_s * 1.1, "decode_step_ms": 1e3 * batch / (tok_s * 1.1),
         "roofline_pct": 80.0, "first_token_ms": 100.0 * batch, "peak_rss_mib": 900.0}
    if hf:
        r.update(hf_tok_s=tok_s / 2, hf_first_token_ms=150.0 * batch, speedup=2.0)
    r.update(kw)
    return r


def test_cpu_table_renders_every_cell():
    mod = _table_script()
    meta = {"cpu": "AMD EPYC, 2 cores, AVX2", "date": "2026-12-02 10:10 UTC", "jax": "0.10.2",
            "python": "3.11.9", "bandwidth_gbs": 30.0, "xla_flags": ""}
    floats = {c: {"meta": meta, "rows": [_row(1, 60.0), _row(8, 280.0)]}
              for c in mod.FLOAT_CELLS + [mod.BF16_774M]}
    floats[("gpt2-774m", "float32")]["rows"] = [_row(1, 10.0), _row(8, 50.0)]
    int8 = {"meta": meta, "rows": [_row(1, 20.0, hf=False), _row(8, 55.0, hf=False)]}
    longc = [{"meta": meta, "rows": [_row(1, 50.0, input_len=n, output_len=128)]}
             for n in (128, 896)]
    md = mod.render({"float": floats, "int8": int8, "long": longc,
                     "capacity": {256: 16.0, 1024: 20.0}})
    assert md.startswith("### CPU decode: AMD EPYC, 2 cores, AVX2")
    assert "jax 0.10.2, Python 3.11.9" in md
    table = [line for line in md.splitlines() if line.startswith("| gpt2")]
    assert len(table) == 4 * 2 + 2  # 4 float configs x 2 batches + 2 int8 rows
    # int8 decode against fp32 decode of the same model and batch: 22.0 / 11.0
    assert "| gpt2-774m | 1 | 22.0 | 11.0 | 2.00x |" in md
    assert "HF 1200 ms" in md and "ratio 1.25" in md and "| 896 / 128 | 1024 |" in md


def test_cpu_table_without_hf_omits_its_columns():
    mod = _table_script()
    meta = {"cpu": "x", "date": "d", "jax": "0.12.0", "python": "3.12.1", "bandwidth_gbs": 1.0,
            "xla_flags": "--xla_cpu_prefer_vector_width=256"}
    floats = {("gpt2-124m", "float32"): {"meta": meta, "rows": [_row(1, 60.0, hf=False)]}}
    md = mod.render({"float": floats})
    assert "HF not measured" in md and "HF tok/s" not in md and "Prefill" not in md
    assert "`--xla_cpu_prefer_vector_width=256`" in md


@pytest.mark.slow
def test_profile_engine_decode_runs_on_live_rows():
    """examples/profile_engine_decode.py (a developer tool, not timed here): on a toy model it
    captures a decode call with every row live and prints the step time and XLA's op table."""
    script = ROOT / "examples" / "profile_engine_decode.py"
    r = subprocess.run([sys.executable, str(script), "--tiny", "--lens", "30,100", "--rows", "2",
                        "--repeats", "2", "--profile", "--top", "3"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prompt lengths [30, 100], chunk 8: wall median" in r.stdout
    assert "by kind:" in r.stdout and "heaviest ops:" in r.stdout
