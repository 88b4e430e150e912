"""Writing a checkpoint directory all at once: nothing half-written, nothing stale.

`staged_dir(dst, force)` hands out a temporary sibling of `dst` to write into and,
when the block ends without an exception, puts it in `dst`'s place in one rename
(Linux `renameat2(RENAME_EXCHANGE)` swaps a replaced directory atomically; elsewhere
two renames). A writer killed mid-way (even by SIGKILL) leaves `dst` as it was; its
partial sibling, named with the writer's pid, is removed by the next `staged_dir`
next to it once that pid is gone. `--force` therefore replaces `dst` whole: no file of
the old checkpoint survives to be read with the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile

_PARTIAL = ".ftjax-partial-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_destination(src: str, dst: str, force: bool) -> None:
    """Refuses a destination that cannot be written whole (ValueError naming it)."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst:
        raise ValueError(f"DST {dst} is SRC itself; write the converted checkpoint elsewhere")
    if real_src.startswith(real_dst + os.sep):
        raise ValueError(f"DST {dst} contains SRC {src}; replacing it would delete the source")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise ValueError(f"DST {dst} exists and is not a directory")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise ValueError(f"DST {dst} exists and is not empty (use --force to replace it whole)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(dst: str) -> list:
    """Removes partial siblings of `dst` whose writer process is gone; returns them."""
    parent, name = os.path.split(os.path.abspath(dst))
    pattern = re.compile(re.escape(f".{name}{_PARTIAL}") + r"(\d+)-.*")
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        m = pattern.fullmatch(entry)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # e.g. a filesystem without RENAME_EXCHANGE: fall back


@contextlib.contextmanager
def staged_dir(dst: str, force: bool = False):
    """Yields a new empty directory beside `dst`; on success it becomes `dst`.

    Args:
      dst: the directory to (re)place.
      force: replace a non-empty `dst` whole (else it must be absent or empty).
    """
    dst = os.path.abspath(dst)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale(dst)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}{os.getpid()}-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> what mkdir would give
        if os.path.isdir(dst) and (force or not os.listdir(dst)):
            if _exchange(tmp, dst):
                shutil.rmtree(tmp)  # now the old checkpoint
                return
            old = tempfile.mkdtemp(prefix=f".{name}{_PARTIAL}{os.getpid()}-old-", dir=parent)
            os.rmdir(old)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
            return
        os.rename(tmp, dst)  # fails (OSError) if something appeared at dst meanwhile
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
