"""What this machine made: a local secret that tags records written by an export or a build here.

A bundle is often built by someone else. Two things in it are more than data:
TensorRT plans that carry host code (version-compatible plans, serialised plugin
libraries) and the manifest's reference to a face-model folder outside the
bundle. The runtime uses them without asking only when they were written on
this machine; anything else needs the user's explicit trust (see the README's
"Security" section).

"Written on this machine" cannot be read from a sidecar or manifest alone (anyone
can write any field), so the export and the build add a tag: an HMAC-SHA256 of
the record (a plan's sha256, a face folder's path and hashes) under a random key
kept outside every bundle, in ``$INFINITEID_MACHINE_KEY`` or
``~/.config/infiniteid/machine.key`` (``$XDG_CONFIG_HOME`` respected), created
with mode 0600 on first use. A bundle from elsewhere has no valid tag; a copied
sidecar's tag does not verify for another file. Deleting the key only means the
runtime asks again. Stdlib only.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Optional

KEY_ENV = "INFINITEID_MACHINE_KEY"
KEY_BYTES = 32


def key_path() -> Path:
    """Where this machine's key lives (it is never inside a bundle)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "infiniteid" / "machine.key"


def _read_key(path: Path) -> Optional[bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if len(data) == KEY_BYTES else None


def machine_key(create: bool = False) -> Optional[bytes]:
    """The key; with ``create``, made (atomically, mode 0600) when there is none yet. None if absent."""
    path = key_path()
    key = _read_key(path)
    if key is not None or not create:
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(KEY_BYTES))
    try:
        os.link(tmp, path)  # first writer wins when two processes race
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    key = _read_key(path)
    if key is None:
        raise OSError(f"{path}: not a valid machine key ({KEY_BYTES} bytes expected); delete it to make a new one")
    return key


def tag(kind: str, record: str) -> str:
    """The tag an export or build on this machine attaches to ``record`` (creates the key if needed)."""
    key = machine_key(create=True)
    assert key is not None
    return hmac.new(key, f"{kind}\n{record}".encode(), hashlib.sha256).hexdigest()


def made_here(kind: str, record: str, claimed: Optional[str]) -> bool:
    """Was ``record`` tagged by this machine's key? False when the key or the tag is missing."""
    if not claimed or not isinstance(claimed, str):
        return False
    key = machine_key(create=False)
    if key is None:
        return False
    want = hmac.new(key, f"{kind}\n{record}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, claimed)
