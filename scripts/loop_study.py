"""The loop studies: when does another loop pay? Two tasks.

    python scripts/loop_study.py --task=trace [--config=configs/trace_study.py[:PRESET]]
        [--config.<key>=<value>] [--study_dir=runs/trace_study] [--report=STUDY_DIR/loop_study.md]
        [--variants=R1,R2]

    python scripts/loop_study.py [--task=stdlib] [--config=configs/loop_study.py]
        [--config.<key>=<value>] [--study_dir=runs/loop_study] [--loops=1,2,3,4] [--seeds=0,1]
        [--control_matches=2] [--report=STUDY_DIR/loop_study.md] [--code_eval_problems=0]

trace (loopcoder_jax/eval/trace_study.py): the depth-bound code-tracing task; R = 1..4, the
unlooped L x R controls and serial looping without cross-loop parallelism, a learning-rate sweep
per variant and seeds at the best rate; accuracy per k. PRESET: cpu (default), quick, accel, test.
--variants runs only those variants and writes no report: invocations with disjoint lists share
STUDY_DIR at once (on 2 cores, two of them finish sooner than one), and the same command without
--variants then reads every run back and writes the report.
stdlib (loopcoder_jax/eval/loop_study.py): held-out bits per byte on the built-in corpus; one run
per (variant, seed) in STUDY_DIR/<variant>-s<seed> (a training workdir).
Each task writes its own section of REPORT (other sections are kept), plots beside it; the
committed report is `--report=docs/loop_study.md`. Rerunning the same command resumes: finished
runs are skipped, an interrupted one continues from its last saved state.
Exit codes: 0 done; 2 bad input (flags, config, report path: one `error:` line on stderr, before
any training); 1 a run diverged or was stopped by SIGTERM (rerun to resume), or the sandbox the
code evaluation needs cannot run on this machine (said before any training).
"""

import json
import os
import shlex
import sys

from absl import flags, logging

from loopcoder_jax import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cli.define_config_flag(os.path.join(_ROOT, "configs", "loop_study.py"))
_TASK = flags.DEFINE_enum(
    "task", "stdlib", ["stdlib", "trace"], "Which study: see the docstring."
)
_STUDY_DIR = flags.DEFINE_string(
    "study_dir",
    None,
    "Directory of the study's runs (default: runs/loop_study, runs/trace_study for trace).",
)
_STDLIB_ONLY = ("loops", "seeds", "control_matches", "code_eval_problems")
_LOOPS = cli.define_int_list("loops", [1, 2, 3, 4], "Loop counts to train.")
_SEEDS = cli.define_int_list(
    "seeds", [0, 1], "Seeds (init and data order).", lower_bound=0
)
_CONTROL = flags.DEFINE_integer(
    "control_matches",
    2,
    "Add an R = 1 control whose training FLOPs match this loop count's (0: none).",
    lower_bound=0,
)
_DIAG_TOKENS = flags.DEFINE_integer(
    "diag_tokens", 4096, "Held-out tokens for the diagnostics.", lower_bound=1
)
_DIAG_BATCH = flags.DEFINE_integer(
    "diag_batch", 8, "Rows per diagnostics batch.", lower_bound=1
)
_REPORT = flags.DEFINE_string(
    "report",
    None,
    "Report to write, plots beside it (default: STUDY_DIR/loop_study.md; empty: none).",
)
_VARIANTS = flags.DEFINE_list(
    "variants",
    [],
    "trace only: run just these variants (e.g. R2-serial,R1-L4) and write no report; "
    "invocations with disjoint lists can share --study_dir at once, and a last one without "
    "--variants writes the report from all of them.",
)
_CODE_EVAL = flags.DEFINE_integer(
    "code_eval_problems",
    0,
    "HumanEval problems for pass@1 per run (0: no code evaluation).",
    lower_bound=0,
)


def _code_eval(problems: int):
  """pass@1 on the first `problems` HumanEval problems, one greedy sample each of at most 256
  tokens (the study's models are small: longer completions only cost time), fewer where the
  longest prompt leaves less room in the model's positions."""
  from loopcoder_jax.eval import humaneval, sandbox
  from loopcoder_jax.inference import generation

  chosen = humaneval.load_problems(problems)
  try:
    sandbox.probe()  # before any training
  except sandbox.SandboxUnavailable as e:
    raise cli.Failure(f"--code_eval_problems={problems}: {e}") from None

  def run(cfg, params, tok):
    _, ids = generation.encode_prompts(tok, [p["prompt"] for p in chosen])
    budget = min(256, cfg.max_position_embeddings - max(map(len, ids)))
    if budget < 1:
      raise ValueError(
          f"the longest of the first {problems} HumanEval prompts "
          f"({max(map(len, ids))} tokens) leaves no room in the model's "
          f"max_position_embeddings={cfg.max_position_embeddings}"
      )
    samples, _ = humaneval.generate_samples(
        cfg, params, tok, chosen, n_samples=1, max_new_tokens=budget
    )
    records = humaneval.score_samples(
        chosen, samples, workers=os.cpu_count() or 1
    )
    errors = humaneval.sandbox_errors(records)
    if errors:  # pass@1 would count them as failed: rerun to score them
      raise sandbox.SandboxUnavailable(
          f"{errors} of {len(records)} samples have no verdict: their sandbox "
          "could not be built twice"
      )
    return humaneval.pass_at_k(records, ks=(1,))

  return run


def _study_dir() -> str:
  if _STUDY_DIR.value is not None:
    return _STUDY_DIR.value
  name = "trace_study" if _TASK.value == "trace" else "loop_study"
  return os.path.join(_ROOT, "runs", name)


def _report_path() -> str:
  """--report, checked before any training: a file in an existing directory (or the study's)."""
  if _REPORT.value is None:
    return os.path.join(_study_dir(), "loop_study.md")
  path = _REPORT.value
  if path and os.path.isdir(path):
    raise ValueError(f"--report={path} is a directory; name the report's file")
  parent = os.path.dirname(os.path.abspath(path))
  if path and not os.path.isdir(parent):
    raise ValueError(f"--report={path}: directory {parent} does not exist")
  return path


def _trace_config():
  """--config when given (it must be a trace study config), else configs/trace_study.py."""
  from loopcoder_jax.train.config import load_config

  given = [f"--{n}" for n in _STDLIB_ONLY if flags.FLAGS[n].present]
  if given:
    raise ValueError(
        f"{', '.join(given)} belong to --task=stdlib; the trace study reads "
        "--config.study.* (configs/trace_study.py)"
    )
  if not flags.FLAGS["config"].present:
    return load_config(os.path.join(_ROOT, "configs", "trace_study.py"))
  config = flags.FLAGS.config
  if config.get("task") != "trace":
    raise ValueError(
        f"--config={flags.FLAGS['config'].config_filename} is not a trace study config "
        "(configs/trace_study.py[:PRESET])"
    )
  return config


def _run_trace(report: str) -> None:
  from loopcoder_jax.eval import trace_report, trace_study
  from loopcoder_jax.train.config import load_config

  config = _trace_config()
  study_dir = os.path.abspath(_study_dir())
  results = trace_study.run_study(config, study_dir, only=_VARIANTS.value)
  if _VARIANTS.value:
    print(
        f"ran {', '.join(_VARIANTS.value)}; rerun without --variants for the report"
    )
    return
  if report:
    presets = {
        p: load_config(os.path.join(_ROOT, "configs", f"trace_study.py:{p}"))
        for p in ("cpu", "quick", "accel")
    }
    paths = trace_report.write_report(
        study_dir, results, report, command=_command(), presets=presets
    )
    print("wrote " + ", ".join(paths))
  rows = trace_report.summarize(results)
  print(
      json.dumps(
          [
              {k: r[k] for k in ("name", "loops", "layers", "lr", "mean")}
              for r in rows
          ]
      )
  )


def _command() -> str:
  return " ".join(
      ["python scripts/loop_study.py", *map(shlex.quote, sys.argv[1:])]
  )


def main():
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _VARIANTS.value and _TASK.value != "trace":
    raise ValueError("--variants belongs to --task=trace")
  report = _report_path()
  if _TASK.value == "trace":
    _run_trace(report)
    return
  from loopcoder_jax.eval import loop_study, sandbox
  from loopcoder_jax.train import trainer

  config = flags.FLAGS.config
  code_eval = _code_eval(_CODE_EVAL.value) if _CODE_EVAL.value else None
  try:
    results = loop_study.run_study(
        config,
        _study_dir(),
        loops=_LOOPS.value,
        seeds=_SEEDS.value,
        control_matches=_CONTROL.value,
        diag_tokens=_DIAG_TOKENS.value,
        diag_batch=_DIAG_BATCH.value,
        code_eval=code_eval,
    )
  except (
      trainer.TrainingDiverged,
      loop_study.Interrupted,
      sandbox.SandboxUnavailable,
  ) as e:
    raise cli.Failure(str(e)) from e
  if report:
    paths = loop_study.write_report(
        os.path.abspath(_study_dir()),
        results,
        report,
        base=config,
        command=_command(),
    )
    print("wrote " + ", ".join(paths))
  rows = loop_study.summarize(results)
  print(
      json.dumps(
          [{k: r[k] for k in ("name", "loops", "layers", "bpb")} for r in rows]
      )
  )


if __name__ == "__main__":
  cli.run(main)
