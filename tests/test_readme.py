"""Every ```python block of README.md runs as written, so the README cannot rot.

Each block runs in a fresh interpreter (as a reader pasting it would), from the repo
root, with 8 virtual CPU devices (XLA_FLAGS, as a CPU-only reader would set per the
Scaling section), `path` bound to the bundled model (the README's placeholder for
"your checkpoint"), and a one-process FTJAX_* description so the multi-host block's
`ftjax.distributed.initialize()` has a coordinator to join. A block whose first line
is "# needs the network ..." is skipped (no network in tests), with that line as reason.
"""

import os
import re
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREAMBLE = "import ftjax\npath = ftjax.demo_model_path()\n"  # ftjax imports no jax here


def python_blocks(text: str):
    """[(heading above the block, code)] of every ```python fenced block."""
    blocks, heading = [], "top"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            blocks.append((heading, "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return blocks


with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    BLOCKS = python_blocks(_f.read())


def _block_id(index: int) -> str:
    heading, _ = BLOCKS[index]
    return f"{index}-" + re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_has_its_python_blocks():
    # The parser finds them all (a fence typo would silently drop a block from the test).
    fences = sum(1 for line in open(os.path.join(REPO, "README.md"), encoding="utf-8")
                 if line.strip() == "```python")
    assert len(BLOCKS) == fences >= 5


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=_block_id)
def test_readme_block_runs(index):
    _, code = BLOCKS[index]
    if code.startswith("# needs the network"):  # the README says so on the block's first line
        pytest.skip(code.splitlines()[0].lstrip("# "))
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = (flags + " --xla_force_host_platform_device_count=8").strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", FTJAX_NUM_PROCESSES="1",
               FTJAX_PROCESS_ID="0", FTJAX_COORDINATOR=f"127.0.0.1:{_free_port()}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", PREAMBLE + code], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"
