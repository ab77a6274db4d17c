"""Staged atomic directories: a checkpoint is built in a temp sibling and renamed into place.

A failure leaves nothing under the final name (and a replaced directory stays whole until the new
one is complete); a destination symlink is followed, and temp siblings left by a killed writer are
cleaned up by the next one. `overwrite` replaces only a directory that holds a checkpoint (or
nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
import secrets
import shutil
import socket

from loopcoder_jax.checkpoints import hf_io, params_io


def check_dst(path: str, overwrite: bool) -> None:
  path = os.path.realpath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"destination {path} exists and is not a directory")
    names = sorted(os.listdir(path))
    if names and not overwrite:
      raise ValueError(
          f"destination {path} is not empty; pass overwrite=True (--overwrite) to replace it"
      )
    if names and not (params_io.is_params_dir(path) or hf_io.is_hf_dir(path)):
      raise ValueError(
          f"destination {path} holds {', '.join(names[:3])}"
          f"{', ...' if len(names) > 3 else ''}, not a checkpoint; --overwrite "
          "replaces only a params or HF checkpoint directory (or an empty one)"
      )


def _tag() -> str:
  return f"{os.getpid()}@{socket.gethostname()}"


def _alive(tag: str) -> bool:
  """Whether the process named by a temp directory's tag may still run (other hosts: assume so)."""
  pid, _, host = tag.partition("@")
  if host != socket.gethostname() or not pid.isdigit():
    return True
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_stale(parent: str, base: str) -> None:
  """Removes temp siblings of `base` left by a conversion that was killed (kill -9, power loss).

  A killed replacement may have left the previous checkpoint only in its `.old-` sibling: that is
  moved back when `base` is missing.
  """
  for kind in ("tmp", "old"):
    prefix = f".{base}.{kind}-"
    for name in sorted(os.listdir(parent)):
      if not name.startswith(prefix):
        continue
      tag = name[len(prefix) :].rpartition("-")[0]
      stale = os.path.join(parent, name)
      if _alive(tag):
        continue
      kept = os.path.join(stale, base)
      path = os.path.join(parent, base)
      if kind == "old" and os.path.isdir(kept) and not os.path.exists(path):
        os.rename(kept, path)
      shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool) -> Iterator[str]:
  """Yield a temp sibling of `path`; on success it replaces `path`, on failure it is removed.

  A symlink `path` is followed (the output goes where it points).
  """
  path = os.path.realpath(os.fspath(path))
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(parent, base)
  check_dst(path, overwrite)
  tmp = os.path.join(parent, f".{base}.tmp-{_tag()}-{secrets.token_hex(4)}")
  os.mkdir(tmp)  # mode 0o777 less the umask, like any directory the user makes
  try:
    yield tmp
    if os.path.exists(path):
      old = os.path.join(parent, f".{base}.old-{_tag()}-{secrets.token_hex(4)}")
      os.mkdir(old)
      os.rename(path, os.path.join(old, base))
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
