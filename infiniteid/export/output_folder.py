"""The export's output folder: checked, locked, staged and renamed into place. Torch-free.

The export command runs these before it imports PyTorch or loads any weights, so
a mistake costs nothing:

* :func:`check_output_folder`: an existing output is refused unless ``overwrite``
  (and then only a bundle or an empty folder is replaced); missing parent folders
  are fine (:func:`make_parents` creates them);
* :func:`output_lock`: one export per output folder at a time. A second export
  to the same ``--out`` is refused at once, not after all its work. The lock is
  ``.<name>.lock`` beside the output (``flock``, so a killed process releases
  it), removed when released; re-entrant within one process;
* :func:`remove_stale_staging` (run by :func:`output_lock` once it holds the
  lock): under the lock no other export of this output runs, so any
  ``.<name>.partial-*`` (or ``.replaced-*``) sibling was left by an export that
  was killed (``kill -9``, power loss) and is removed;
* :func:`staging`: the bundle is written into ``.<name>.partial-<random>`` and
  renamed to the output name only when complete;
* :func:`sigterm_as_interrupt`: SIGTERM during an export is handled like Ctrl-C
  (the staging folder is removed, the process exits with status 143).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Dict, Iterator

from ..bundle import MANIFEST, BundleError

try:  # POSIX; elsewhere exports are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_held: Dict[Path, int] = {}  # output folder -> nesting depth of output_lock in this process
_held_lock = threading.Lock()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so the same clean-up runs; exit status 143."""

    exit_status = 128 + signal.SIGTERM


def _is_replaceable(folder: Path) -> bool:
    return folder.is_dir() and (not any(folder.iterdir()) or (folder / MANIFEST).is_file())


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists (unless ``overwrite`` and it is a bundle or empty),
    or one whose nearest existing ancestor is not a folder."""
    if not out.exists():
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise BundleError(f"{parent}: is a file, so the output folder {out} cannot be created under it")
        return
    if not overwrite:
        raise BundleError(f"{out}: already exists; choose another output folder or pass --overwrite (overwrite=True)")
    if not _is_replaceable(out):
        raise BundleError(
            f"{out}: exists and is not a bundle (no {MANIFEST}); refusing to replace it even with --overwrite"
        )


def make_parents(out: Path) -> None:
    """Create ``out``'s parent folders (as ``mkdir -p``); a failure is a one-line :class:`BundleError`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"{out.parent}: cannot create the output's parent folder ({e.strerror or e})") from None


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the export lock of ``out`` (see the module docstring); :class:`BundleError` if another process holds it."""
    out = Path(out).expanduser().absolute()
    with _held_lock:
        if _held.get(out):
            _held[out] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[out] -= 1
        return
    make_parents(out)
    fd = _acquire(out) if fcntl is not None else None
    with _held_lock:
        _held[out] = 1
    try:
        remove_stale_staging(out)
        yield
    finally:
        with _held_lock:
            _held.pop(out, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path(out))
            os.close(fd)


def _acquire(out: Path) -> int:
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise BundleError(
                f"{out}: another export to this folder is running"
                + (f" (process {holder})" if holder else "")
                + "; wait for it to finish or choose another output folder"
            ) from None
        # The holder before us may have unlinked the file after we opened it: retry on the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def remove_stale_staging(out: Path) -> list:
    """Remove ``.<name>.partial-*`` / ``.<name>.replaced-*`` siblings of ``out``; call with the lock held.

    Returns the removed paths."""
    out = Path(out).expanduser().absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    for pattern in (f".{out.name}.partial-*", f".{out.name}.replaced-*"):
        for p in out.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out``; renamed to ``out`` when the block succeeds, removed if not."""
    tag = uuid.uuid4().hex[:8]
    tmp = out.with_name(f".{out.name}.partial-{tag}")
    tmp.mkdir()
    try:
        with _tempdir_inside(tmp / ".scratch"):
            yield tmp
        shutil.rmtree(tmp / ".scratch", ignore_errors=True)
        if out.exists():
            check_output_folder(out, overwrite)  # it may have appeared meanwhile
            old = out.with_name(f".{out.name}.replaced-{tag}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _tempdir_inside(folder: Path) -> Iterator[None]:
    """Point Python's temporary folder into ``folder`` while exporting.

    Libraries (onnxslim's shape inference of graphs past 2 GB, onnx) create
    temporary files; this keeps them inside the bundle's staging folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    saved = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)
