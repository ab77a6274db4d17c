"""Counting JAX compilations (jax.monitoring events; the names hold from jax 0.4 to 0.12)."""

import jax

_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/backend_compile_duration",
)
_seen: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **kw: _seen.append(name)
)


def compiles(fn):
  """fn() and how many programs JAX traced or compiled while it ran."""
  start = len(_seen)
  out = fn()
  return out, sum(e in _EVENTS for e in _seen[start:])
