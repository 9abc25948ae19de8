"""Speed of our jitted perplexity loop and decode vs transformers (torch) on SmolLM2.

    python scripts/bench_eval.py [--windows 4] [--seq-len 2048] [--decode-tokens 64]
                                 [--dtype float32] [--out benchmarks/results]

Same model file (the embedded SmolLM2 GGUF, dequantized by each side's loader), same dtype,
same CPU threads (torch.set_num_threads = the cores jax uses), same windows of Pride and
Prejudice. Perplexity: tokens/s over `--windows` windows after one warm-up window on each side
(ours: the jitted step compiled before timing). Decode: batch 1, greedy, `--decode-tokens` new
tokens after a short prompt, steady-state tokens/s (ours excludes the first, compiling decode
step; transformers' `generate` with its default dynamic KV cache, timed on a second call).
Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good"


def _ours(args, ids):
    from any4_jax.eval.perplexity import perplexity
    from any4_jax.loading import load_model
    from any4_jax.models.llama.generate import generate

    lm = load_model(param_dtype=args.dtype)
    r = perplexity(lm.model, ids, seq_len=args.seq_len, max_windows=args.windows,
                   batch_size=1, progress=False)
    generate(lm.model, lm.tokenizer, PROMPT, max_new_tokens=4)  # compile both shapes
    g = generate(lm.model, lm.tokenizer, PROMPT, max_new_tokens=args.decode_tokens,
                 eos_ids=())
    return {"ppl": r.ppl, "ppl_tokens_per_s": r.tokens_per_second,
            "decode_tokens_per_s": g.decode_tokens_per_second,
            "compile_s": r.compile_seconds}


def _torch(args, ids):
    import torch
    import transformers

    from any4_jax import assets

    torch.set_num_threads(args.threads)
    d, f = os.path.split(assets.model_path())
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dt).eval()
    win = np.asarray(ids[:args.seq_len * (args.windows + 1)]).reshape(-1, args.seq_len)
    nll = []
    with torch.no_grad():
        model(torch.as_tensor(win[:1]))  # warm-up
        t0 = time.perf_counter()
        for w in win[1:]:
            x = torch.as_tensor(w[None].astype(np.int64))
            logits = model(x).logits.float()
            nll.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])))
        ppl_s = time.perf_counter() - t0
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
        x = tok(PROMPT, return_tensors="pt").input_ids
        kw = dict(do_sample=False, min_new_tokens=args.decode_tokens,
                  max_new_tokens=args.decode_tokens, pad_token_id=tok.eos_token_id)
        model.generate(x, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(x, **kw)
        gen_s = time.perf_counter() - t0
    return {"ppl": float(np.exp(np.mean(nll))),
            "ppl_tokens_per_s": args.windows * args.seq_len / ppl_s,
            "decode_tokens_per_s": args.decode_tokens / gen_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from any4_jax.eval.data import load_text
    from any4_jax.loading import load_model

    text, _ = load_text("prideprejudice")
    ids = load_model().tokenizer.encode(text)
    # windows 1..n for both sides (torch uses window 0 as warm-up; ours compiles separately)
    ids_eval = ids[args.seq_len:]
    ours = _ours(args, ids_eval)
    ref = _torch(args, ids)
    dev = jax.devices()[0]
    rec = {"device": str(dev), "platform": dev.platform, "cpu": platform.processor(),
           "threads": args.threads, "dtype": args.dtype, "seq_len": args.seq_len,
           "windows": args.windows, "decode_tokens": args.decode_tokens,
           "jax": jax.__version__, "ours": ours, "transformers": ref,
           "command": "python scripts/bench_eval.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")}
    import torch
    import transformers
    rec["torch"], rec["transformers_version"] = torch.__version__, transformers.__version__
    name = "eval_" + ("cpu" if dev.platform == "cpu" else dev.device_kind.lower().replace(" ",
                                                                                          "_"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{name}_{args.dtype}.json"
    path.write_text(json.dumps(rec, indent=2))
    print(f"| SmolLM2-135M {args.dtype}, {dev.platform}, {args.threads} threads | ours | "
          "transformers | ratio |")
    print("|---|---|---|---|")
    for key, label in (("ppl_tokens_per_s", f"perplexity tokens/s (seq {args.seq_len})"),
                       ("decode_tokens_per_s", "decode tokens/s (batch 1, greedy)")):
        print(f"| {label} | {ours[key]:.0f} | {ref[key]:.0f} | {ours[key] / ref[key]:.2f}x |")
    print(f"| perplexity on the timed windows | {ours['ppl']:.4f} | {ref['ppl']:.4f} | |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
