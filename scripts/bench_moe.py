"""A small random Mixtral on this machine: the expert-grouped forward against every expert on
every token, and batch-1 decode of the float model against any4 through the CPU kernel.

    python scripts/bench_moe.py [--hidden 1024] [--ffn 3584] [--layers 4] [--experts 8]
                                [--seq-len 512] [--tokens 32] [--out benchmarks/results]

Eval: tokens/s of one jitted forward over [1, seq-len] random token ids (median of --runs
after a compiling call), with `SparseMoE.strategy` "grouped" (each expert on its routed
tokens, `models/llama/moe.py`) and "all" (every expert on every token, combined with zero
weights for the unrouted ones); both give the same logits (checked here). Decode: tokens/s of
`generate_ids` (greedy, batch 1) with the float32 model, then with every decoder Dense and
every expert stack quantized to any4 (random weights, sample weights uniform) and prepared
for the CPU kernel. Writes moe_<device>.json and prints two markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def forward_speed(model, ids, runs: int) -> tuple[float, jax.Array]:
    from flax import nnx

    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    logits = f(state, ids).block_until_ready()  # compiles
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f(state, ids).block_until_ready()
        times.append(time.perf_counter() - t0)
    return ids.size / statistics.median(times), logits


def main():
    from any4_jax.models.llama.config import TINY
    from any4_jax.models.llama.generate import decode_speed
    from any4_jax.models.llama.params import random_model
    from any4_jax.nn import prepare_model
    from any4_jax.ptq import quantize_model
    from any4_jax.quant import QuantConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cfg = TINY.replace(name="mixtral-small-random", vocab_size=args.vocab,
                       hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_layers=args.layers, num_heads=8, num_kv_heads=4,
                       num_experts=args.experts, experts_per_token=args.top_k,
                       max_position_embeddings=max(4096, args.seq_len + 64))
    model = random_model(cfg, param_dtype=jnp.float32)
    dev = jax.devices()[0]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.seq_len)))
    rec = {"config": cfg.to_dict(), "device": dev.device_kind, "platform": dev.platform,
           "jax": jax.__version__, "seq_len": args.seq_len, "eval": {}, "decode": {},
           "command": "python scripts/bench_moe.py " + " ".join(sys.argv[1:])}
    logits = {}
    for strategy in ("grouped", "all"):
        for blk in model.layers:
            blk.block_sparse_moe.strategy = strategy
        rec["eval"][strategy], logits[strategy] = forward_speed(model, ids, args.runs)
        print(f"eval {strategy}: {rec['eval'][strategy]:.0f} tokens/s", file=sys.stderr)
    diff = float(jnp.abs(logits["grouped"] - logits["all"]).max())
    rec["eval"]["max_abs_logit_difference"] = diff
    for blk in model.layers:
        blk.block_sparse_moe.strategy = "grouped"
    prompt = [int(t) for t in np.asarray(ids[0, :16])]
    rec["decode"]["float32"] = decode_speed(model, prompt, args.tokens, args.runs)
    qm, _ = quantize_model(model, QuantConfig(format="any4", group_size=args.group_size,
                                              sample_weighting="none"), progress=False)
    prepare_model(qm, "cpu" if dev.platform == "cpu" else None)
    rec["decode"][f"any4 g{args.group_size}"] = decode_speed(qm, prompt, args.tokens,
                                                            args.runs)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "cpu" if dev.platform == "cpu" else dev.device_kind.lower().replace(" ", "_")
    path = Path(args.out) / f"moe_{name}.json"
    path.write_text(json.dumps(rec, indent=2))
    e = rec["eval"]
    print(f"| forward over {args.seq_len} tokens | tokens/s |\n|---|---|")
    print(f"| grouped by expert | {e['grouped']:.0f} |\n| every expert on every token | "
          f"{e['all']:.0f} |\n| grouped / all | {e['grouped'] / e['all']:.2f}x |")
    print("\n| decode, batch 1 | tokens/s |\n|---|---|")
    for k, v in rec["decode"].items():
        print(f"| {k} | {v:.1f} |")
    print(f"wrote {path} (max |logit difference| grouped vs all: {diff:.2e})", file=sys.stderr)


if __name__ == "__main__":
    main()
