"""Atomic file and folder writes.

Files: a temporary file beside the target, then ``os.replace``. Folders (:func:`publish_folder`):
a short-named temporary folder beside the target, then a create-if-absent rename (or a recoverable
swap when replacing). A leaf module (standard library and :mod:`adamergex_peft.errors` only) so that
every other module can write atomically without import cycles.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from adamergex_peft.errors import AdaMergeXError

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` (``os.replace``).

    On any exception the temporary file is removed and ``path`` is left as it was. The file gets
    the usual permissions (``0o666 & ~umask``), not ``mkstemp``'s private ``0o600``. ``kwargs``
    go to :func:`os.fdopen` (``encoding``, ``newline``, ...).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


# ------------------------------------------------------------------------------------------ folders
#: Our temporary folders: ``.amx-<tag>-<pid>-<4 hex>.tmp`` (being written) and ``.old`` (an output
#: swapped out by ``overwrite``); ``<tag>`` is 8 hex digits of the sha256 of the output's name, so a
#: run recognises the folders of its own output; at most 30 characters, whatever the output's name.
_TEMP_RE = re.compile(r"\.amx-([0-9a-f]{8})-([0-9]+)-[0-9a-f]{4}\.(tmp|old)")
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _tag(name: str) -> str:
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:8]


def _temp_name(tag: str, kind: str) -> str:
    return f".amx-{tag}-{os.getpid()}-{secrets.token_hex(2)}.{kind}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) may still be running; unknown counts as alive."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` only if nothing exists at ``dst``; :class:`FileExistsError` otherwise.

    On Linux this is ``renameat2(RENAME_NOREPLACE)``: atomic, nothing at ``dst`` is ever replaced.
    Elsewhere (or on a file system without it) ``dst`` is first claimed with ``os.mkdir`` (atomic,
    fails if anything exists) and ``src`` is renamed onto that empty folder (POSIX ``rename`` replaces
    an empty folder): a folder that existed before is never replaced; the only gap is another process
    removing our just-made empty folder and making its own empty one within that instant. On Windows
    ``os.rename`` never replaces. (Plain ``os.rename`` on POSIX silently replaces an empty folder.)
    """
    if os.name == "nt":
        os.rename(src, dst)
        return
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # only if still empty: never removes anything another process put there
        raise


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_folder(target: str | os.PathLike) -> None:
    """Repair what an interrupted :func:`publish_folder` of ``target`` left, then clean up.

    Only entries of ``target``'s own naming pattern whose process is gone (same machine) are
    touched: an ``overwrite`` swap interrupted between its two renames is rolled back (the previous
    output is put back) or finished (if the new output is in place, the old one is removed), and
    ``.tmp`` folders of dead runs are removed. A previous output whose fate is unclear is kept and
    its location logged, never deleted.
    """
    target = Path(os.path.abspath(target))
    parent, tag = target.parent, _tag(target.name)
    marker = parent / f".amx-{tag}.swap"
    if marker.exists():
        _recover_swap(target, marker)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_RE.fullmatch(entry.name)
        if not match or match.group(1) != tag or _pid_alive(int(match.group(2))):
            continue
        if match.group(3) == "tmp":
            _remove(parent / entry.name)
            logger.info("removed %s, left by an interrupted run writing %s", parent / entry.name, target)
        else:
            logger.warning(
                "%s holds a previous %s kept by an interrupted overwrite; remove it if it is not needed.",
                parent / entry.name,
                target.name,
            )


def _recover_swap(target: Path, marker: Path) -> None:
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        pid, old, new = int(info["pid"]), target.parent / info["old"], target.parent / info["new"]
        if info["output"] != target.name:
            return  # another output's marker (tag collision)
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("cannot read %s; left as it is", marker)
        return
    if _pid_alive(pid):
        return
    if not os.path.lexists(target) and os.path.lexists(old):
        rename_noreplace(old, target)
        logger.warning("restored %s from %s after an interrupted overwrite", target, old)
    elif os.path.lexists(old):
        st = os.lstat(target)
        if (st.st_ino, st.st_dev) == (info.get("new_ino"), info.get("new_dev")):
            _remove(old)
            logger.info("finished an interrupted overwrite of %s (removed %s)", target, old)
        else:
            logger.warning("kept %s, the previous %s from an interrupted overwrite", old, target.name)
    if os.path.lexists(new) and new != target:
        _remove(new)
    marker.unlink(missing_ok=True)


def publish_folder(target: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Create folder ``target`` atomically with the content ``write(folder)`` puts into a temporary folder.

    The temporary folder (``.amx-<8 hex>-<pid>-<4 hex>.tmp``, beside ``target``) is removed on any
    exception, ``KeyboardInterrupt`` and ``SystemExit`` included. Without ``overwrite`` the final
    step is a create-if-absent rename (:func:`rename_noreplace`): whatever appeared at ``target`` in
    the meantime is left as it is and :class:`AdaMergeXError` is raised. With ``overwrite`` an
    existing ``target`` is swapped out and removed; the swap is recorded first in
    ``.amx-<8 hex>.swap`` so that a crash between its two renames is repaired by the next run
    (:func:`recover_folder`, called first), which also removes ``.tmp`` folders of dead runs.
    SIGKILL leaves the temporary folder until that next run.

    Returns:
        ``target`` as an absolute :class:`~pathlib.Path` (its last component not resolved).
    """
    target = Path(os.path.abspath(target))
    parent, tag = target.parent, _tag(target.name)
    parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    tmp = parent / _temp_name(tag, "tmp")
    os.mkdir(tmp)  # 0o777 & ~umask, like any folder the user creates
    try:
        write(tmp)
        if overwrite and os.path.lexists(target):
            _swap(tmp, target, tag)
        else:
            try:
                rename_noreplace(tmp, target)
            except FileExistsError:
                raise AdaMergeXError(
                    f"output folder {str(target)!r} appeared while this run was writing (another run?); it was "
                    "left as it is and nothing was written."
                ) from None
    except BaseException:
        _remove(tmp)
        raise
    return target


def _swap(tmp: Path, target: Path, tag: str) -> None:
    """Replace ``target`` by ``tmp``, recording the intent so that a crash in between can be repaired."""
    marker = target.parent / f".amx-{tag}.swap"
    old = target.parent / _temp_name(tag, "old")
    st = os.stat(tmp)
    record = {"output": target.name, "old": old.name, "new": tmp.name, "pid": os.getpid()}
    record.update(new_ino=st.st_ino, new_dev=st.st_dev)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise AdaMergeXError(
            f"output folder {str(target)!r} is being replaced by another run ({marker.name} exists beside it); "
            "retry when it is done."
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(target, old)
        try:
            rename_noreplace(tmp, target)
        except BaseException:
            try:
                rename_noreplace(old, target)
            except OSError:
                logger.error("the previous %s is kept at %s", target, old)
            raise
        _remove(old)
    except BaseException:
        marker.unlink(missing_ok=True)
        raise
    marker.unlink(missing_ok=True)
