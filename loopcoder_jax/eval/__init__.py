"""Evaluating checkpoints: loop-count diagnostics (plots in `eval.plots`) and the loop study."""

from loopcoder_jax.eval.diagnostics import (
    MapsKV,
    format_table,
    loop_diagnostics,
)

__all__ = ["MapsKV", "format_table", "loop_diagnostics"]
