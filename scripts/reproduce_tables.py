"""The paper's ablation tables on SmolLM2-135M: perplexity on Pride and Prejudice.

    python scripts/reproduce_tables.py [--tables main,groups,calibration,weighting,init,bits,
                                                 kmeans,methods,seeds]
                                       [--windows 16] [--out benchmarks/results]

Protocol (docs/design.md s.4): first `--windows` windows of 2048 tokens, no BOS, float32. Each
row is one `quantize_model` run on the dense model loaded once; results are cached in
`<out>/tables_smollm2.json` (delete it, or pass --fresh, to recompute) so an interrupted run
resumes. Each row also records the equivalent `any4 quantize ... --eval` command. Writes the
markdown tables to `<out>/tables_smollm2.md`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# (key, label, quantize kwargs); kwargs: format, group, calib ("prompt"|"none"|
# "sensesensibility"), mode, stat, weighting, init
# kmeans: "lloyd" (the paper's ablations; the default of the first runs) or "optimal"
# method: "rtn" (round to nearest, the first runs) or "gptq"
BASE = dict(format="any4", group=64, calib="prompt", mode="sequential", stat="abs_of_mean",
            weighting="activations_x_scales", init="kmeans++", seed=0, kmeans="lloyd",
            method="rtn", samples=128)


def row(**kw):
    return {**BASE, **kw}


TABLES = {
    "main": ("Main table: perplexity by format and group size",
             ["method", "g64", "g192"],
             [(label, {f"g{g}": row(group=g, **kw) for g in (64, 192)}) for label, kw in [
                 ("int4", dict(format="int4")),
                 ("nf4", dict(format="nf4")),
                 ("fp4", dict(format="fp4")),
                 ("any4, no calibration", dict(calib="none", weighting="none")),
                 ("any4, offline, abs_of_mean", dict(mode="offline")),
                 ("any4, offline, mean_of_abs", dict(mode="offline", stat="mean_of_abs")),
                 ("any4, sequential, abs_of_mean (default)", dict()),
             ]]),
    "groups": ("Group size sweep (row: one group per row; K = 576, or 1536 for down_proj)",
               ["format", "g64", "g192", "row"],
               [(f, {("row" if g == "row" else f"g{g}"): row(format=f, group=g)
                     for g in (64, 192, "row")})
                for f in ("fp4", "nf4", "any4")]),
    "calibration": ("Calibration data, statistic and mode (any4, g64)",
                    ["calibration", "ppl"],
                    [(label, {"ppl": row(**kw)}) for label, kw in [
                        ("prompt, sequential, abs_of_mean (default)", dict()),
                        ("Sense and Sensibility 128 x 512, sequential",
                         dict(calib="sensesensibility")),
                        ("prompt, sequential, mean_of_abs", dict(stat="mean_of_abs")),
                        ("prompt, offline, abs_of_mean", dict(mode="offline")),
                    ]]),
    "weighting": ("Term to minimise in k-means (any4, g64, prompt, sequential)",
                  ["sample weights", "ppl"],
                  [(label, {"ppl": row(**kw)}) for label, kw in [
                      ("none", dict(calib="none", weighting="none")),
                      ("activations", dict(weighting="activations")),
                      ("activations x group scales (default)", dict()),
                  ]]),
    "init": ("k-means initialisation (any4, g64, calibrated)",
             ["init", "ppl"],
             [(i, {"ppl": row(init=i)}) for i in ("kmeans++", "random", "int", "nf4")]),
    "bits": ("Fewer bits (g64; any-n calibrated)",
             ["bits", "int", "any"],
             [(str(b), {"int": row(format=f"int{b}"), "any": row(format=f"any{b}")})
              for b in (4, 3, 2)]),
    "kmeans": ("Exact k-means (`--kmeans-method optimal`, the default) against Lloyd",
               ["setting", "Lloyd", "optimal"],
               [(label, {m: row(kmeans=k, **kw) for m, k in (("Lloyd", "lloyd"),
                                                             ("optimal", "optimal"))})
                for label, kw in [
                    ("any4 g64, calibrated", dict()),
                    ("any4 g192, calibrated", dict(group=192)),
                    ("any4 g64, no calibration", dict(calib="none", weighting="none")),
                    ("any4 g192, no calibration", dict(group=192, calib="none",
                                                       weighting="none")),
                    ("any3 g64, calibrated", dict(format="any3")),
                ]]),
    "methods": ("Post-training methods (g64, calibrated on Sense and Sensibility 16 x 512, "
                "sequential; any4 with exact k-means; perplexity, then quantization seconds)",
                ["format", "rtn", "gptq", "awq"],
                [(f, {m: row(format=f, kmeans="optimal", method=m, calib="sensesensibility",
                             samples=16)
                      for m in ("rtn", "gptq", "awq")})
                 for f in ("int4", "nf4", "any4")]),
    "seeds": ("Spread over k-means seeds (any4)",
              ["setting", "seed 0", "seed 1", "seed 2"],
              [(label, {f"seed {s}": row(seed=s, **kw) for s in (0, 1, 2)}) for label, kw in [
                  ("g64, calibrated (default)", dict()),
                  ("g192, no calibration", dict(group=192, calib="none", weighting="none")),
              ]]),
}


def key_of(r: dict) -> str:
    fmt = r["format"]
    if not fmt.startswith("any"):  # calibration and k-means settings do not apply to RTN
        if r["method"] == "rtn":
            return f"{fmt}|g{r['group']}"
        return (f"{fmt}|g{r['group']}|method={r['method']}|calib={r['calib']}"
                + (f"|samples={r['samples']}" if r["samples"] != 128 else ""))
    # the keys of the first runs (seed 0, Lloyd, RTN) stay as they were
    return "|".join(f"{k}={r[k]}" for k in sorted(r)
                    if not ((k == "seed" and r[k] == 0) or (k == "kmeans" and r[k] == "lloyd")
                            or (k == "method" and r[k] == "rtn")
                            or (k == "samples" and r[k] == 128)))


def command_of(r: dict, windows: int) -> str:
    parts = ["any4 quantize", f"--format {r['format']}", f"--group-size {r['group']}"]
    if r["method"] != "rtn":
        parts.append(f"--method {r['method']}")
    if r["format"].startswith("any") or r["method"] != "rtn":
        parts.append(f"--calibration {r['calib']}")
        if r["calib"] not in ("prompt", "none") and r["samples"] != 128:
            parts.append(f"--num-samples {r['samples']}")
        if r["calib"] != "none":
            if r["mode"] != "sequential":
                parts.append(f"--calib-mode {r['mode']}")
            if r["stat"] != "abs_of_mean":
                parts.append(f"--statistic {r['stat']}")
            if r["weighting"] != "activations_x_scales" and r["format"].startswith("any"):
                parts.append(f"--sample-weighting {r['weighting']}")
    if r["format"].startswith("any"):  # the k-means settings
        if r["kmeans"] == "lloyd" and r["init"] == "kmeans++" and not r["seed"]:
            parts.append("--kmeans-method lloyd")
        if r["init"] != "kmeans++":
            parts.append(f"--init {r['init']}")
        if r["seed"]:
            parts.append(f"--seed {r['seed']}")
    parts.append(f"--eval --max-windows {windows}")
    return " ".join(parts)


def run_row(lm, ids, r: dict, windows: int) -> dict:
    from any4_jax.eval.data import load_text
    from any4_jax.eval.perplexity import perplexity
    from any4_jax.ptq import CalibrationConfig, calibration_tokens, quantize_model
    from any4_jax.quant import KMeansConfig, QuantConfig

    qcfg = QuantConfig(format=r["format"], group_size=None if r["group"] == "row" else r["group"],
                       sample_weighting=r["weighting"],
                       kmeans=KMeansConfig(method=r["kmeans"], init=r["init"],
                                           seed=r["seed"]))
    calib = CalibrationConfig(source="prompt" if r["calib"] in ("prompt", "none") else "text",
                              statistic=r["stat"], mode=r["mode"], num_samples=r["samples"])
    tokens = None
    if (r["format"].startswith("any") or r["method"] != "rtn") and r["calib"] != "none":
        text = None if r["calib"] == "prompt" else load_text(r["calib"])[0]
        tokens = calibration_tokens(lm.tokenizer.encode, calib, text)
    t0 = time.perf_counter()
    qm, rep = quantize_model(lm.model, qcfg, calibration=calib, tokens=tokens,
                             method=r["method"], progress=False)
    q_s = time.perf_counter() - t0
    res = perplexity(qm, ids, seq_len=2048, max_windows=windows, batch_size=2, progress=False)
    return {"ppl": res.ppl, "windows": res.windows, "quantize_seconds": q_s,
            "calibration_seconds": rep.calibration_seconds, "mode": rep.mode,
            "command": command_of(r, windows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables", default=",".join(TABLES))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()

    from any4_jax.eval.data import load_text
    from any4_jax.eval.perplexity import perplexity
    from any4_jax.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "tables_smollm2.json"
    cache = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    lm = load_model()
    ids = lm.tokenizer.encode(load_text("prideprejudice")[0])
    if "dense" not in cache:
        r = perplexity(lm.model, ids, seq_len=2048, max_windows=args.windows, batch_size=2,
                       progress=False)
        cache["dense"] = {"ppl": r.ppl, "windows": r.windows,
                          "command": f"any4 eval --max-windows {args.windows}"}
        cache_path.write_text(json.dumps(cache, indent=2))
    md = [f"Dense float32: **{cache['dense']['ppl']:.4f}** (`{cache['dense']['command']}`)\n",
          "Every table but the k-means one runs Lloyd k-means (`--kmeans-method lloyd`), as "
          "the paper's ablations do; \"(default)\" there marks the defaults of the other "
          "settings. The library's default k-means is the exact one (the k-means table).\n"]
    for name in args.tables.split(","):
        title, cols, rows = TABLES[name]
        md += [f"**{title}**\n", "| " + " | ".join(cols) + " |",
               "|" + "---|" * len(cols)]
        for label, cells in rows:
            vals = []
            for col in cols[1:]:
                r = cells[col]
                k = key_of(r)
                if k not in cache:
                    t0 = time.perf_counter()
                    cache[k] = run_row(lm, ids, r, args.windows)
                    print(f"{label} [{col}]: {cache[k]['ppl']:.4f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                # the command as today's CLI spells it (its defaults have changed since some
                # rows were computed)
                cache[k]["command"] = command_of(r, args.windows)
                cache_path.write_text(json.dumps(cache, indent=2))
                vals.append(f"{cache[k]['ppl']:.4f}" + (
                    f" ({cache[k]['quantize_seconds']:.1f} s)" if name == "methods" else ""))
            md.append(f"| {label} | " + " | ".join(vals) + " |")
        md.append("")
    (out / "tables_smollm2.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
