"""Storage failures: a full disk, a quota, a read-only file system, a directory we may not write.

Whatever layer they surface through (an OSError, Orbax's or TensorStore's RESOURCE_EXHAUSTED),
they end as one `StorageError` line naming what was being written and the last good copy, so that
a scheduler or a person knows what is kept and what to free.
"""

from __future__ import annotations

import errno
import os

_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# A write refused outright (not a cause deep inside a reader's error: that is bad input).
_REFUSED = {errno.EACCES, errno.EPERM}
# The OS's words for it, as TensorStore quotes them inside its RESOURCE_EXHAUSTED errors.
_PHRASES = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
)


class StorageError(RuntimeError):
  """Writing a checkpoint failed for want of storage (the message names the last good copy)."""


def storage_problem(e: BaseException | None) -> str | None:
  """What storage problem `e` (or an exception it came from) reports, or None for another error."""
  if isinstance(e, OSError) and e.errno in _REFUSED:
    return (
        f"{os.strerror(e.errno)}: {e.filename}"
        if e.filename
        else os.strerror(e.errno)
    )
  seen: set[int] = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _ERRNOS:
      return os.strerror(e.errno)
    text = str(e)
    for phrase in _PHRASES:
      if phrase in text:
        return phrase
    if "RESOURCE_EXHAUSTED" in text:
      return text.strip().splitlines()[0][:200]
    e = e.__cause__ or e.__context__
  return None
