"""A new user's first hour: fast `--help`, the default decoding, errors that say the fix."""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import ftjax
from ftjax.errors import CheckpointError
from ftjax.generation_config import FALLBACK, decoding_defaults

DEMO = ftjax.demo_model_path()
PROMPT = "def fibonacci(n):"


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


def test_help_and_argument_errors_do_not_import_jax():
    # `ftjax --help`, a subcommand's --help and an argument error exit from argparse
    # before anything heavy is imported (that is what makes them instant).
    code = """
import sys
from ftjax.cli import main
for argv in (["--help"], ["generate", "--help"], ["eval", "--help"],
             ["generate", "x", "--dtype", "float8"], ["bench", "--batch", "1,x"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, 2), (argv, e.code)
heavy = sorted(m for m in ("jax", "transformers", "torch", "flax") if m in sys.modules)
print("HEAVY", heavy)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    assert "invalid choice: 'float8'" in r.stderr  # --dtype lists its choices
    assert "expected comma-separated ints" in r.stderr


def test_generate_help_says_the_default_decoding():
    from ftjax.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    text = " ".join(text.split())
    assert "generation_config.json" in text
    assert "the bundled model's is: temperature 0.7, top-k 50, top-p 0.95, " \
           "repetition penalty 1.2" in text
    for flag in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--dtype", "--seed"):
        assert flag in text


def test_decoding_defaults_read_generation_config_as_hf_does(tmp_path):
    assert decoding_defaults(str(tmp_path)) == (FALLBACK, "ftjax default")
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"do_sample": True, "temperature": 0.5, "max_new_tokens": 20}))
    values, source = decoding_defaults(str(tmp_path))
    # HF's defaults fill the fields the file leaves out (top_k 50, top_p 1.0, ...).
    assert values == {"temperature": 0.5, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                      "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                      "max_new_tokens": 20}
    assert source == str(path)
    path.write_text(json.dumps({"temperature": 0.5, "repetition_penalty": 1.3}))
    values, _ = decoding_defaults(str(tmp_path))  # do_sample absent: greedy, as in HF
    assert values["temperature"] == 0.0 and values["repetition_penalty"] == 1.3
    path.write_text(json.dumps({"do_sample": True, "top_k": "fifty"}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: top_k must be a number"):
        decoding_defaults(str(tmp_path))
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"generation_config.json: not readable JSON"):
        decoding_defaults(str(tmp_path))


def _reads_as_python(text: str) -> bool:
    lines = text.splitlines()
    indented = [line for line in lines[1:] if re.match(r"^( {4})+\S", line)]
    return len(indented) >= 1


def _longest_run(tokens) -> int:
    best = run = 1
    for a, b in zip(tokens, tokens[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def test_default_decoding_of_the_bundled_model_reads_as_python():
    # The README's first command: `ftjax generate "def fibonacci(n):"` with the CLI's
    # default decoding (the bundled generation_config.json). Over 8 seeds, every
    # continuation has an indented body and no token repeated 4 times in a row, and
    # most define or call something. Greedy decoding is shown to loop for contrast.
    options, source = decoding_defaults(DEMO)
    assert source.endswith("generation_config.json")
    model = ftjax.load(DEMO)
    sps = [ftjax.SamplingParams(**options, seed=s) for s in range(8)]
    out = model.generate([PROMPT] * 8, max_new_tokens=48, sampling=sps)
    for text, tokens in zip(out.texts, out.tokens):
        assert _reads_as_python(PROMPT + text), text
        assert _longest_run(tokens) < 4, text
    code_like = sum(bool(re.search(r"\b(def|return|if|for|self|import)\b|\w\(", t))
                    for t in out.texts)
    assert code_like >= 6, out.texts


def test_make_mesh_error_says_how_to_get_virtual_devices():
    with pytest.raises(ValueError, match=r"jax_num_cpu_devices', 64\)"):
        ftjax.make_mesh(tensor=64)


def test_session_max_len_error_names_the_models_limit():
    from tiny import tiny_model

    model = tiny_model()  # 64 positions
    with pytest.raises(ValueError, match=r"this model has 64 positions, so use "
                                         r"model.session\(max_len=64\) or less"):
        model.session(max_len=1024)


def test_the_bundled_tokenizer_loads_without_torch():
    # The bundled (and `ftjax convert`ed) tokenizer is a generic fast tokenizer: loading
    # it must not import torch (seconds of start-up) whether or not torch is installed.
    code = f"""
import sys
from ftjax.hf_compat import load_tokenizer
tok = load_tokenizer({DEMO!r})
print("TORCH", "torch" in sys.modules, type(tok).__name__, tok.encode("def f(x):"))
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "TORCH False" in r.stdout
    import transformers

    auto = transformers.AutoTokenizer.from_pretrained(DEMO)  # what it replaces
    assert f"{auto.encode('def f(x):')}" in r.stdout


def test_no_torch_warning_is_dropped_and_only_it():
    from ftjax.hf_compat import _DropNoTorchWarning, import_transformers

    import_transformers()
    logger = logging.getLogger("transformers")
    (flt,) = [f for f in logger.filters if isinstance(f, _DropNoTorchWarning)]

    def record(msg):
        return logging.LogRecord("transformers", logging.WARNING, __file__, 1, msg, None, None)

    assert not flt.filter(record("PyTorch was not found. Models won't be available and only "
                                 "tokenizers, configuration and file/data utilities can be used."))
    assert flt.filter(record("Some other warning"))


@pytest.mark.torch
def test_hf_reference_of_a_converted_checkpoint_is_the_same_model(tmp_path):
    # `bench --compare hf` and `eval --compare hf` build their reference with
    # hf_causal_lm: an `ftjax convert` output (no HF config.json) is exported from the
    # loaded params, and its logits equal HF's on the original HF directory.
    import torch
    import transformers

    from converters import load_checkpoint, save_native
    from ftjax.hf_reference import hf_causal_lm

    cfg, params = load_checkpoint(DEMO)
    save_native(str(tmp_path), cfg, params, "float32", source=DEMO)
    converted = ftjax.load(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
        want = ref(ids).logits.numpy()
        got = hf_causal_lm(converted)(ids).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)  # same float32 weights, same HF code
    quantized = ftjax.load(str(tmp_path), quant="int8")
    with pytest.raises(ValueError, match="needs float weights"):
        hf_causal_lm(quantized)
