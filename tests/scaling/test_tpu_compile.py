"""Compile the Mosaic kernels for real TPU chips on this CPU host (libtpu compile-only devices).

`jax.experimental.topologies.get_topology_desc` gives TPU devices without TPU hardware; lowering
and compiling a jitted function placed on them runs the real Mosaic compiler, which rejects bad
block shapes, layouts and VMEM overflows (interpret mode checks none of that). Shapes are the
benchmark's: S = 32k, left = 64, H = 8, Hkv = 2, D = 128, bf16, with packed segment ids.

VMEM per kernel: the compiler's own figure for the kernel's scoped VMEM (scratch + Mosaic internal
scratch), read from the out-of-VMEM error raised when the limit is set to 1 byte, plus the
double-buffered input/output blocks computed from each pallas_call's block shapes (layout-padded to
the (8|16, 128) tiles). Run: `pytest -m tpu_compile tests/scaling/test_tpu_compile.py -s`.
"""

import importlib.util
import os
import re

import pytest

pytestmark = pytest.mark.tpu_compile
if importlib.util.find_spec("libtpu") is None:
  pytest.skip(
      "libtpu is not installed (pip install 'jax[tpu]==<jax version>', the [tpu] extra)",
      allow_module_level=True,
  )
# Other JAX processes on this host that do not set JAX_PLATFORMS hold libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import (  # noqa: E402
    _flash,
    _ops,
    gswa_attention,
    sliding_window_attention,
)

CHIPS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
B, S, H, HKV, D, LEFT = 1, 32768, 8, 2, 128, 64


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache():
  """Compile-only TPU executables cannot be read back from the persistent cache (warning per hit)."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", before)


@pytest.fixture(scope="module", params=sorted(CHIPS))
def device(request):
  return (
      request.param,
      topologies.get_topology_desc(CHIPS[request.param], "tpu").devices[0],
  )


def _shapes(dev):
  sharding = jax.sharding.SingleDeviceSharding(dev)

  def sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  return (
      sds,
      sds((B, S, H, D)),
      sds((B, S, HKV, D)),
      sds((B, S, H), jnp.float32),
      sds((B, S), jnp.int32),
  )


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _grad(fn, n):
  return jax.grad(
      lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=tuple(range(n))
  )


def test_compiles_fwd_and_bwd(device):
  _, dev = device
  _, q, kv, gate, seg = _shapes(dev)

  def swa(q, k, v, s):
    return sliding_window_attention(q, k, v, s, left=LEFT, backend="tpu")

  def gswa(q, k1, v1, k, v, g, s):
    return gswa_attention(q, k1, v1, k, v, g, s, left=LEFT, backend="tpu")

  for fn, args in [
      (swa, (q, kv, kv, seg)),
      (gswa, (q, kv, kv, kv, kv, gate, seg)),
  ]:
    hlo = _compile(fn, *args).as_text()
    # the Mosaic kernel, not an interpreted loop
    assert "tpu_custom_call" in hlo
    _compile(_grad(fn, len(args) - 1), *args)
  _compile(swa, q, kv, kv, None)  # the variant without segment ids


def _io_bytes(fn, *args):
  """Double-buffered block bytes of the first pallas_call in fn's jaxpr (tile-padded)."""
  eqn = next(
      e
      for e in jax.make_jaxpr(fn)(*args).eqns
      if e.primitive.name == "pallas_call"
  )
  total = 0
  for bm in eqn.params["grid_mapping"].block_mappings:
    aval = bm.block_aval
    shape = (1,) * max(0, 2 - len(aval.shape)) + tuple(aval.shape)
    sub = 8 * 4 // aval.dtype.itemsize
    rows = -(-shape[-2] // sub) * sub
    cols = -(-shape[-1] // 128) * 128
    lead = 1
    for x in shape[:-2]:
      lead *= x
    total += 2 * lead * rows * cols * aval.dtype.itemsize
  return total


def _scoped_vmem(fn, *args, monkeypatch):
  monkeypatch.setattr(_flash, "VMEM_LIMIT_BYTES", 1)
  try:
    _compile(fn, *args)
  except Exception as e:  # noqa: BLE001 - the compiler's OOM message carries the figure
    m = re.search(r"Scoped allocation with size ([\d.]+)([KMG]?)", str(e))
    assert m, f"no VMEM figure in the compiler error: {str(e)[:500]}"
    return (
        float(m.group(1))
        * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
    )
  finally:
    monkeypatch.setattr(_flash, "VMEM_LIMIT_BYTES", None)
  return 0.0


def test_vmem_per_kernel(device, monkeypatch):
  chip, dev = device
  sds, *_ = _shapes(dev)
  report = []
  for kind, lefts in [("sliding_window", (LEFT,)), ("gswa", (None, LEFT))]:
    plan, sp = _ops.make_plan(S, lefts, None, (None,) * len(lefts), False)
    q = sds((B, H, sp, D))
    ks = tuple(sds((B, HKV, sp, D)) for _ in lefts)
    seg = (
        sds((B, sp, _flash.LANES), jnp.int32),
        sds((B, _flash.SUBLANES, sp), jnp.int32),
    )
    gate = sds((B, H, 1, sp), jnp.float32) if plan.gated else None
    rows = tuple(sds((B, H, 1, sp), jnp.float32) for _ in lefts)
    kernels = {
        "fwd": (
            lambda q, ks, vs, seg, gate, plan=plan: _flash.forward(
                plan, q, ks, vs, seg, gate, residuals=True
            ),
            (q, ks, ks, seg, gate),
        ),
        "dq": (
            lambda q, ks, vs, seg, gate, lse, plan=plan: _flash.backward_dq(
                plan, q, q, ks, vs, seg, gate, lse, lse
            ),
            (q, ks, ks, seg, gate, rows),
        ),
    }
    for n, branch in enumerate(plan.branches):
      kernels[f"dkv[{n}]"] = (
          lambda q, k, seg, gate, lse, plan=plan, branch=branch, n=n: _flash.backward_dkv(
              plan,
              branch,
              q,
              q,
              k,
              k,
              seg,
              lse,
              lse,
              weight=gate,
              complement=n == 1,
          ),
          (q, ks[n], seg, gate, rows[n]),
      )
    for name, (fn, args) in kernels.items():
      scoped = _scoped_vmem(fn, *args, monkeypatch=monkeypatch)
      io = _io_bytes(fn, *args)
      report.append(
          f"{chip} {kind:14s} {name:7s} bq={plan.block_q} "
          f"bkv={[b.block_kv for b in plan.branches]} scoped={scoped / 2**10:.0f}KiB "
          f"io_blocks={io / 2**10:.0f}KiB total={(scoped + io) / 2**20:.2f}MiB"
      )
      # v5e's default scoped VMEM limit, the smallest of the three
      assert scoped + io < 16 * 2**20
  print("\n" + "\n".join(report))
