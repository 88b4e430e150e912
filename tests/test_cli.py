"""Every CLI command, run as a subprocess on the bundled demo model (no torch)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import ftjax
from ftjax.generation_config import decoding_defaults

pytestmark = pytest.mark.slow
DEMO = ftjax.demo_model_path()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's subprocesses (as a user's
    ~/.cache/ftjax/jax), so each CLI run after the first reuses the compiled steps."""
    os.environ["FTJAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    del os.environ["FTJAX_CACHE_DIR"]


def ftjax_cli(*args, stdin=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "ftjax", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300)


def test_generate_streams_a_continuation_of_the_prompt():
    r = ftjax_cli("generate", "def fibonacci(n):", "--max-new-tokens", "24", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def fibonacci(n):")
    assert len(r.stdout.strip()) > len("def fibonacci(n):")
    # The default decoding is the model's generation_config.json: the streamed text is
    # the Python API's sample with those options and the same seed.
    options, source = decoding_defaults(DEMO)
    assert source.endswith("generation_config.json") and options["temperature"] > 0
    model = ftjax.load(DEMO)
    out = model.generate(["def fibonacci(n):"], max_new_tokens=24,
                         sampling=ftjax.SamplingParams(**options, seed=3))
    assert r.stdout == "def fibonacci(n):" + out.texts[0] + "\n"


def test_generate_from_stdin_and_seeded_sampling():
    args = ("generate", "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9",
            "--seed", "5")
    a = ftjax_cli(*args, stdin="import os\n")
    assert a.returncode == 0, a.stderr
    # The flags override their fields of the model's defaults; the same seed gives the
    # Python API's sample.
    options, _ = decoding_defaults(DEMO)
    sp = ftjax.SamplingParams(**dict(options, temperature=0.8, top_p=0.9), seed=5)
    out = ftjax.load(DEMO).generate(["import os\n"], max_new_tokens=12, sampling=sp)
    assert a.stdout == "import os\n" + out.texts[0] + "\n"


def test_generate_several_prompts():
    r = ftjax_cli("generate", "class A:", "import sys", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "=== [0]" in r.stdout and "=== [1]" in r.stdout


def test_generate_bad_arguments_fail_clearly(tmp_path):
    r = ftjax_cli("generate", "x", "--top-p", "2")
    assert r.returncode == 1 and "top_p must be in (0, 1]" in r.stderr
    r = ftjax_cli("generate", "x", "--model", str(tmp_path / "missing"))
    assert r.returncode == 1 and "missing: not a directory" in r.stderr


def test_convert_then_load_is_identical(tmp_path):
    dst = tmp_path / "orbax"
    r = ftjax_cli("convert", DEMO, str(dst))
    assert r.returncode == 0, r.stderr
    assert (dst / "ftjax_config.json").exists() and (dst / "tokenizer.json").exists()
    assert (dst / "params").is_dir()  # the default target is orbax
    ids = [[1, 2, 3, 4, 5, 6]]
    a, b = ftjax.load(DEMO), ftjax.load(str(dst))
    assert np.array_equal(np.asarray(a.forward(ids)), np.asarray(b.forward(ids)))
    assert b.tokenizer is not None
    r2 = ftjax_cli("convert", DEMO, str(dst))
    assert r2.returncode == 2 and "not empty" in r2.stderr
    r3 = ftjax_cli("convert", DEMO, str(tmp_path / "bf16"), "--dtype", "bfloat16", "--to",
                   "native")
    assert r3.returncode == 0, r3.stderr
    assert ftjax.load(str(tmp_path / "bf16"), dtype="bfloat16").generate(
        ["def f():"], max_new_tokens=4).tokens


def test_bench_prints_a_row_per_batch():
    r = ftjax_cli("bench", "--model", DEMO, "--batch", "1,2", "--input-len", "16",
                  "--output-len", "8", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [row[:3] for row in rows] == [["1", "16", "8"], ["2", "16", "8"]]
    assert "memory read bandwidth" in r.stdout and "roofline" in r.stdout
