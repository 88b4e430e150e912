"""Progress bars (tqdm) on stderr for the command line's long steps.

Shown when stderr is a terminal; $FTJAX_PROGRESS=1 forces them on (e.g. in logs),
=0 off. They never touch stdout, so piped output stays clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional


def _disable() -> Optional[bool]:
    flag = os.environ.get("FTJAX_PROGRESS", "")
    if flag in ("0", "1"):
        return flag == "0"
    return None  # tqdm: off when stderr is not a terminal


def bar(total: Optional[int] = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr (call .update(n), close it or use it as a context manager)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=_disable(),
                dynamic_ncols=True, leave=False)


@contextlib.contextmanager
def stages(*names: str, desc: str = "") -> Iterator:
    """A bar over named stages: `with stages("read", "write") as step: ...; step(); ...`.

    Each call of `step()` completes the current stage and names the next one."""
    with bar(total=len(names), desc=desc, unit="step") as b:
        index = [0]
        b.set_postfix_str(names[0])

        def step():
            b.update(1)
            index[0] += 1
            if index[0] < len(names):
                b.set_postfix_str(names[index[0]])

        yield step
