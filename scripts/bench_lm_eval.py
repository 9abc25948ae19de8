"""Our lm-eval model ("any4") against lm-eval's own `hf` model on the same weights, one process.

    python scripts/bench_lm_eval.py [--limit 100] [--batch-size 8] [--tasks austen_pp_next]
                                    [--out benchmarks/results/lm_eval_cpu.json]

The embedded SmolLM2 (GGUF) is written as a Hugging Face directory by transformers' GGUF
reader (`eval.hf_reference`, cached under the assets cache); both models load that directory
(float32) and run `lm_eval.simple_evaluate` on the offline tasks (`any4 lm-eval-tasks`) with
`--limit` documents, each run twice (the first run of ours compiles; the second is the
steady state a long task sees). Reported per run: wall seconds of `simple_evaluate`
(tokenization and lm-eval's bookkeeping included), requests/s, the metrics, and the largest
per-request difference of the log-likelihoods between the two models. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def run(model, tasks, task_manager, limit, log_samples=True):
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=task_manager,
                                  log_samples=log_samples)
    seconds = time.perf_counter() - t0
    n = sum(len(s) * max(1, len(s[0]["resps"])) if s else 0
            for s in out["samples"].values())
    first = lambda r: float(r[0][0] if isinstance(r[0], (tuple, list)) else r[0])
    lls = {t: [[first(r) for r in s["resps"]] for s in out["samples"][t]]
           for t in out["samples"]}
    return {"seconds": seconds, "requests": n, "requests_per_second": n / seconds,
            "results": out["results"]}, lls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tasks", default="austen_pp_next")
    ap.add_argument("--out", default="benchmarks/results/lm_eval_cpu.json")
    args = ap.parse_args()

    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM

    from any4_jax import assets, outputs
    from any4_jax.eval.hf_reference import hf_directory_from_gguf
    from any4_jax.eval.lm_eval_model import Any4LM
    from any4_jax.eval.lm_eval_tasks import ensure_default_tasks

    outputs.check_file_output(args.out, what="--out")
    hf_dir = hf_directory_from_gguf(assets.model_path(),
                                    os.path.join(assets.cache_dir(), "hf", "smollm2-135m"))
    tm = lm_eval.tasks.TaskManager(include_path=str(ensure_default_tasks()))
    tasks = args.tasks.split(",")
    record = {"limit": args.limit, "batch_size": args.batch_size, "tasks": tasks,
              "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "runs": {}}
    samples = {}
    for name, make in (
            ("hf", lambda: HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32",
                                batch_size=args.batch_size)),
            ("any4", lambda: Any4LM(str(hf_dir), batch_size=args.batch_size, progress=False))):
        t0 = time.perf_counter()
        lm = make()
        load_s = time.perf_counter() - t0
        runs = []
        for _ in range(2):
            r, samples[name] = run(lm, tasks, tm, args.limit)
            runs.append(r)
            print(f"{name}: {r['requests']} requests in {r['seconds']:.1f} s "
                  f"({r['requests_per_second']:.1f}/s)", flush=True)
        record["runs"][name] = {"load_seconds": load_s, "runs": runs}
        del lm
    diffs = [abs(a - b) for t in samples["hf"]
             for da, db in zip(samples["hf"][t], samples["any4"][t], strict=True)
             for a, b in zip(da, db, strict=True)]
    record["max_abs_loglikelihood_difference"] = float(np.max(diffs))
    hf_s = record["runs"]["hf"]["runs"][1]["seconds"]
    ours = record["runs"]["any4"]["runs"]
    record["speedup_steady"] = hf_s / ours[1]["seconds"]
    record["speedup_first_run"] = record["runs"]["hf"]["runs"][0]["seconds"] / ours[0]["seconds"]
    outputs.write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("max_abs_loglikelihood_difference",
                                             "speedup_steady", "speedup_first_run")}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
