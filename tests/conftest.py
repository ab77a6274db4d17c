"""Test setup: 8 fake CPU devices (mesh tests), a persistent compile cache, and Ctrl-C delivered.

The first two must be set before JAX initialises its backends, hence at import time here.
"""

import os
import signal

# Started in the background by a shell without job control (`cmd &` in a script), the tests inherit
# SIGINT ignored, and an ignored signal stays ignored across exec: the Ctrl-C tests' scripts would
# never see theirs. Handled here, it is reset to the default at exec, as for a user at a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "LOOPCODER_TEST_CACHE", os.path.expanduser("~/.cache/loopcoder_jax/xla")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

try:  # property tests: keep them deterministic and bounded on 2 cores
  from hypothesis import HealthCheck, settings

  settings.register_profile(
      "ci",
      max_examples=12,
      deadline=None,
      derandomize=True,
      suppress_health_check=[HealthCheck.too_slow],
  )
  settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
  pass
