"""`any4 lm-eval` (a model through lm-evaluation-harness) and `any4 lm-eval-tasks` (the
offline tasks from a novel)."""

from __future__ import annotations

import os
import sys
import time

import jax

from any4_jax import outputs
from any4_jax.cli import args as cli_args

INSTALL = "pip install 'any4-jax[lm-eval]' (or pip install lm_eval)"


def _harness():
    """Our lm-eval module (it registers "any4"), or a clear error naming the install."""
    try:
        from any4_jax.eval import lm_eval_model
    except ImportError as e:
        raise ImportError(f"any4 lm-eval needs lm-evaluation-harness: {INSTALL} ({e})") from None
    return lm_eval_model


def _run_lm_eval(args) -> int:
    le = _harness()
    if args.json_path:
        outputs.check_file_output(args.json_path, what="--json")
    include = args.include_path
    if include is None:
        from any4_jax.eval.lm_eval_tasks import ensure_default_tasks

        include = str(ensure_default_tasks(log=lambda m: print(m, file=sys.stderr)))
    elif not os.path.isdir(include):
        raise NotADirectoryError(f"--include-path {include}: not a directory (build the "
                                 "offline tasks with `any4 lm-eval-tasks --out DIR`)")
    tm = le.task_manager(include)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    le.check_tasks(tm, names)  # before the model loads
    t0 = time.perf_counter()
    model = le.Any4LM(args.model, kernel=args.kernel, dtype=args.dtype,
                      batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    load_s = time.perf_counter() - t0
    print(f"model: {model.source}, loaded in {load_s:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    out = le.evaluate(model, names, tm=tm, limit=args.limit, num_fewshot=args.num_fewshot,
                      seed=args.seed, log_samples=args.log_samples)
    eval_s = time.perf_counter() - t0
    print(le.results_table(out))
    print(f"{sum(s['requests'] for s in model.stats.values())} requests in {eval_s:.1f} s",
          file=sys.stderr)
    if args.json_path:
        record = {
            "model": model.source, "kernel": args.kernel, "dtype": str(model.model.dtype),
            "tasks": names, "limit": args.limit, "num_fewshot": args.num_fewshot,
            "batch_size": args.batch_size, "seed": args.seed,
            "device": str(jax.devices()[0]), "load_seconds": load_s, "eval_seconds": eval_s,
            "requests": model.stats, "results": out["results"], "n-shot": out.get("n-shot"),
            "n-samples": out.get("n-samples"), "versions": out.get("versions"),
            "lm_eval_version": le.lm_eval_version(),
        }
        if args.log_samples:
            record["samples"] = out.get("samples")
        outputs.write_json(args.json_path, record)
        print(f"wrote {args.json_path}", file=sys.stderr)
    return 0


def _run_tasks(args) -> int:
    from any4_jax.eval.data import load_text
    from any4_jax.eval.lm_eval_tasks import build_tasks, default_task_dir

    out = args.out or str(default_task_dir())
    text, desc = load_text(args.text)
    m = build_tasks(out, text=text, source=args.text, seed=args.seed,
                    n_questions=args.questions, doc_words=args.doc_words,
                    overwrite=args.overwrite)
    for name, t in m["tasks"].items():
        print(f"{name}: {t['docs']} documents ({t['kind']})")
    print(f"from {desc}; pass --include-path {os.path.abspath(out)} to lm-eval "
          "(`any4 lm-eval` uses it by default when it is the default directory)")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "lm-eval", help="evaluate a model with lm-evaluation-harness (offline tasks built in)",
        description="Runs lm-evaluation-harness with the model as lm-eval model 'any4' "
        "(dense or quantized, any kernel). Without --include-path the offline tasks "
        "austen_pp_next (multiple choice) and austen_pp_rolling (perplexity) are built from "
        "the fetched Pride and Prejudice; standard tasks (hellaswag, ...) load from the hub.")
    cli_args.add_model(p)
    p.add_argument("--tasks", default="austen",
                   help="comma-separated task, group or tag names (default: austen, both "
                        "offline tasks)")
    p.add_argument("--include-path", default=None,
                   help="a directory of task YAMLs (default: the offline tasks in the cache)")
    p.add_argument("--limit", type=cli_args.positive_int, default=None,
                   help="at most N documents per task")
    p.add_argument("--num-fewshot", type=cli_args.nonnegative_int, default=None)
    p.add_argument("--batch-size", type=cli_args.positive_int, default=8,
                   help="sequences per jitted step (the choices of one question share one)")
    p.add_argument("--max-length", type=cli_args.positive_int, default=None,
                   help="context length (default: the model's max_position_embeddings)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request's inputs and outputs in the --json file")
    p.add_argument("--json", dest="json_path", default=None,
                   help="write the results (and timings) as JSON here")
    p.set_defaults(func=_run_lm_eval)

    p = sub.add_parser("lm-eval-tasks", help="build the offline lm-eval tasks from a novel",
                       description="Writes austen_pp_next (multiple choice: which of four "
                       "paragraphs follows a passage) and austen_pp_rolling (rolling "
                       "log-likelihood) as JSONL + YAML, reproducibly from --seed.")
    p.add_argument("--out", default=None,
                   help="the task directory (default: lm_eval_tasks in the assets cache)")
    p.add_argument("--text", default="prideprejudice",
                   help="an Austen novel name (fetched) or a UTF-8 file in the same layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", type=cli_args.positive_int, default=500)
    p.add_argument("--doc-words", type=cli_args.positive_int, default=300,
                   help="about this many words per rolling document")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing task directory built by this command")
    p.set_defaults(func=_run_tasks)
