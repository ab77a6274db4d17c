"""Evaluating checkpoints: loop-count diagnostics (plots in `eval.plots`, the R = 1..4 studies in
`eval.loop_study` on held-out text and `eval.trace_study` / `eval.trace_report` on code tracing,
imported on use), HumanEval pass@k in a sandbox, held-out perplexity."""

from loopcoder_jax.eval.diagnostics import (
    MapsKV,
    for_json,
    format_table,
    loop_diagnostics,
)
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
    "MapsKV",
    "SandboxUnavailable",
    "canonical_samples",
    "check",
    "check_all",
    "estimate_pass_at_k",
    "for_json",
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
