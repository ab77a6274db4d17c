"""Evaluating checkpoints: loop-count diagnostics, HumanEval pass@k in a sandbox, perplexity."""

from loopcoder_jax.eval.diagnostics import format_table, loop_diagnostics
from loopcoder_jax.eval.humaneval import (
    STOP_SEQUENCES,
    canonical_samples,
    estimate_pass_at_k,
    generate_samples,
    load_problems,
    pass_at_k,
    read_samples,
    score_samples,
)
from loopcoder_jax.eval.perplexity import held_out_perplexity
from loopcoder_jax.eval.sandbox import (
    Limits,
    SandboxUnavailable,
    check,
    check_all,
    probe,
)

__all__ = [
    "STOP_SEQUENCES",
    "Limits",
    "SandboxUnavailable",
    "canonical_samples",
    "check",
    "check_all",
    "estimate_pass_at_k",
    "format_table",
    "generate_samples",
    "held_out_perplexity",
    "load_problems",
    "loop_diagnostics",
    "pass_at_k",
    "probe",
    "read_samples",
    "score_samples",
]
