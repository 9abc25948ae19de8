"""LO-BCQ beside any4 and int4 on SmolLM2-135M: W4A16 and simulated W4A4 perplexity.

    python scripts/bcq_results.py [--windows 16] [--out benchmarks/results] [--fresh]

Protocol (docs/design.md s.4): Pride and Prejudice, first `--windows` windows of 2048 tokens,
float32. Weight formats calibrate on the built-in prompt (sequential, as `any4 quantize`
does by default); universal codebooks are learned once per Nc (`any4 bcq-calibrate
--activations`: weights unweighted on 2^17 blocks, activations from 16 x 512 tokens of Sense
and Sensibility). Each row records its `any4` command; results are cached in
`<out>/bcq_smollm2.json` (an interrupted run resumes), and the table goes to
`<out>/bcq_smollm2.md`.

Bits per weight are counted the same way for every row: 4-bit codes plus every stored scale,
zero and table at 16 bits (bf16) for any4/int4 (int4's grid needs no table), and LO-BCQ's
format bits (log2(Nc) per block of 8, an 8-bit scale per 64, the int6 codebooks, one float32
per tensor).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _bits(model) -> float:
    from any4_jax.nn import BCQDense, QuantDense, dense_layers

    total = bits = 0
    for _, layer in dense_layers(model):
        if not isinstance(layer, QuantDense):
            continue
        n, k = layer.meta.shape
        if isinstance(layer, BCQDense):
            b = layer.weight.bits_per_weight()
        else:
            g = layer.meta.group_size
            b = 4 + 32 / g + (0 if layer.format.startswith("int") else 16 * 16 / k)
        bits += b * n * k
        total += n * k
    return bits / total


ROWS = [
    # key, label, weights: (format, Nc, codebooks "universal"/"local"/None), activations
    ("dense", "W16A16 (dense float32)", None, None),
    ("int4_g64", "int4 g64", ("int4", None, None), None),
    ("any4_g64", "any4 g64", ("any4", None, None), None),
    ("bcq16_universal", "bcq Nc16, universal", ("bcq", 16, "universal"), None),
    ("bcq8_universal", "bcq Nc8, universal", ("bcq", 8, "universal"), None),
    ("bcq16_local", "bcq Nc16, local (per layer)", ("bcq", 16, "local"), None),
    ("bcq8_local", "bcq Nc8, local (per layer)", ("bcq", 8, "local"), None),
    ("w4a4_int4", "W4A4 int4 g64 / int4 g64 per token", ("int4", None, None), "int4"),
    ("w4a4_bcq16", "W4A4 bcq Nc16 / bcq Nc16", ("bcq", 16, "universal"), "bcq"),
    ("w4a4_bcq8", "W4A4 bcq Nc8 / bcq Nc8", ("bcq", 8, "universal"), "bcq"),
]


def _command(weights, act, windows: int) -> str:
    tail = f"--eval --max-windows {windows}"
    if weights is None:
        return f"any4 eval --max-windows {windows}"
    fmt, nc, cb = weights
    parts = ["any4 quantize", f"--format {fmt}"]
    if fmt != "bcq":
        parts.append("--group-size 64")
    else:
        parts.append(f"--n-codebooks {nc}")
        if cb == "universal":
            parts.append(f"--codebooks codebooks_nc{nc}.npz")
    if act == "int4":
        parts.append("--act-quant int4 --act-group-size 64")
    elif act == "bcq":
        parts.append("--act-quant bcq")
    return " ".join(parts + [tail])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()

    import jax
    import numpy as np

    from any4_jax.eval.data import load_text
    from any4_jax.eval.perplexity import perplexity
    from any4_jax.loading import load_model
    from any4_jax.ptq.bcq import learn_codebooks
    from any4_jax.ptq.calibrate import CalibrationConfig, calibration_tokens
    from any4_jax.ptq.quantize_model import quantize_model, select_layers
    from any4_jax.quant import ActQuantConfig, BCQCodebooks, BCQFitConfig, QuantConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "bcq_smollm2.json"
    cache = {} if args.fresh or not cache_path.exists() else json.loads(cache_path.read_text())
    cache.setdefault("rows", {})
    lm = load_model()
    ids = np.asarray(lm.tokenizer.encode(load_text("prideprejudice")[0]), np.int32)
    prompt = calibration_tokens(lm.tokenizer.encode, CalibrationConfig())
    ss = calibration_tokens(lm.tokenizer.encode,
                            CalibrationConfig(source="text", num_samples=16, seq_len=512),
                            load_text("sensesensibility")[0])
    paths = select_layers(lm.model)

    def save():
        cache["device"] = str(jax.devices()[0])
        cache_path.write_text(json.dumps(cache, indent=1))

    books = {}
    for nc in (16, 8):
        f = out / f"codebooks_nc{nc}.npz"
        key = f"codebooks_nc{nc}"
        if key in cache and f.exists():
            books[nc] = BCQCodebooks.load(f)
            continue
        cfg = QuantConfig(format="bcq", n_codebooks=nc, sample_weighting="none",
                          bcq_fit=BCQFitConfig(max_blocks=1 << 17))
        t0 = time.perf_counter()
        cb = learn_codebooks(lm.model, cfg, paths, tokens=ss, activations=True,
                             source=lm.source)
        sec = time.perf_counter() - t0
        cb.save(f)
        books[nc] = cb
        cache[key] = {"seconds": sec, "command": f"any4 bcq-calibrate --n-codebooks {nc} "
                      "--activations --calibration sensesensibility --num-samples 16 "
                      f"--out codebooks_nc{nc}.npz", "info": json.loads(json.dumps(
                          cb.info, default=float))}
        save()
        print(f"codebooks Nc={nc}: {sec:.1f} s", flush=True)

    for key, label, weights, act in ROWS:
        if key in cache["rows"]:
            continue
        t0 = time.perf_counter()
        model, rep, bits = lm.model, None, 16.0
        if weights is not None:
            fmt, nc, cbk = weights
            kw = {"group_size": 64} if fmt != "bcq" else {"n_codebooks": nc}
            cb = books.get(nc) if cbk == "universal" else None
            aq = None
            if act == "int4":
                aq = ActQuantConfig(kind="int4", group_size=64)
            elif act == "bcq":
                aq = ActQuantConfig(kind="bcq", codebooks=books[nc].activations)
            model, rep = quantize_model(lm.model, QuantConfig(format=fmt, **kw), tokens=prompt,
                                        codebooks=cb, act_quant=aq, progress=False)
            bits = _bits(model)
        qsec = time.perf_counter() - t0
        r = perplexity(model, ids, seq_len=2048, max_windows=args.windows, progress=False)
        cache["rows"][key] = {"label": label, "ppl": r.ppl, "bits_per_weight": bits,
                              "quantize_seconds": qsec if weights else 0.0,
                              "eval_seconds": time.perf_counter() - t0 - qsec,
                              "windows": r.windows,
                              "command": _command(weights, act, args.windows)}
        save()
        print(f"{label}: ppl {r.ppl:.4f}, {bits:.3f} bits, quantize {qsec:.1f} s", flush=True)

    lines = [f"SmolLM2-135M, Pride and Prejudice {args.windows} x 2048 tokens, float32, "
             f"{cache['device']} (`python scripts/bcq_results.py`).", "",
             "| weights / activations | bits/weight | ppl | quantize s | command |",
             "|---|---|---|---|---|"]
    for key, *_ in ROWS:
        r = cache["rows"][key]
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['ppl']:.4f} | "
                     f"{r['quantize_seconds']:.1f} | `{r['command']}` |")
    lines.append("")
    for nc in (16, 8):
        c = cache[f"codebooks_nc{nc}"]
        lines.append(f"Universal codebooks Nc={nc}: {c['seconds']:.1f} s to learn (weights and "
                     f"activations; `{c['command']}`).")
    (out / "bcq_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
