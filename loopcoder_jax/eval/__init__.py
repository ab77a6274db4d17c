"""Evaluating checkpoints: loop-count diagnostics."""

from loopcoder_jax.eval.diagnostics import format_table, loop_diagnostics

__all__ = ["format_table", "loop_diagnostics"]
