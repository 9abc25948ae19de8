"""Our models as an lm-evaluation-harness model, `@register_model("any4")`, and the calls that
run lm-eval on it (`task_manager`, `check_tasks`, `evaluate`, `results_table`).

This is the one module of the package that imports lm-eval (`pip install
'any4-jax[lm-eval]'`); importing it registers "any4". Any model `load_model` reads (the
embedded SmolLM2, a GGUF file, a Hugging Face directory, an any4-jax checkpoint of any format)
or a model already in memory (`Any4LM(model=..., tokenizer=...)`) is scored with the request
semantics of lm-eval's own `hf` model (`TemplateLM`'s context/continuation split, left
truncation to `max_length`, rolling windows with the BOS/EOS prefix, stop sequences), so the
two agree to float tolerance on the same weights (tests/eval/test_lm_eval_parity.py).
Log-likelihoods go through `eval.scoring` (packed, bucketed, jitted); generation through
`generate_ids` (KV cache).

`lm_eval.models` is imported before "any4" is registered: lm-eval imports that module (its
own models) only while its registry is empty, so registering first would hide "hf".
"""

from __future__ import annotations

import logging
import os
import time

import lm_eval.models  # noqa: F401 - before registering "any4" (see the module docstring)
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from any4_jax.eval.scoring import score_requests
from any4_jax.kernels.api import KNOWN
from any4_jax.loading import load_model
from any4_jax.models.llama.generate import generate_ids
from any4_jax.nn.prepare import prepare_model

log = logging.getLogger(__name__)

KERNELS = ("auto", *KNOWN)


def _as_int(value, name: str, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"any4 lm-eval model: {name}={value!r} is not an integer") from None
    if v < 1:
        raise ValueError(f"any4 lm-eval model: {name}={v} must be at least 1")
    return v


@register_model("any4")
class Any4LM(TemplateLM):
    """lm-eval model arguments (`--model_args k=v,...` or keywords):

    pretrained: a model path (GGUF, Hugging Face directory, any4-jax checkpoint); None: the
        embedded SmolLM2. Or `model=` and `tokenizer=` (a loaded Llama and our Tokenizer).
    kernel: auto | xla | cpu | pallas | cuda, for quantized layers. dtype: auto | float32 |
        bfloat16 | float16 (what `load_model` accepts; not for quantized checkpoints).
    batch_size: rows per jitted step ("auto" means the default, 8); max_batch_tokens: rows
        are cut so that rows x padded length stays under it (long rolling windows).
    max_length: the context length (default: the config's max_position_embeddings, as `hf`).
    max_gen_toks (256), add_bos_token, prefix_token_id: as `hf`. seed: sampling seed.
    """

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None,
                 kernel: str = "auto", dtype: str = "auto", batch_size=8,
                 max_batch_tokens=16384, max_length=None, max_gen_toks=256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 seed: int = 1234, progress: bool = True, device=None, max_batch_size=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"any4 lm-eval model: unknown argument(s) {sorted(unknown)}; "
                             "accepted: pretrained, kernel, dtype, batch_size, "
                             "max_batch_tokens, max_length, max_gen_toks, add_bos_token, "
                             "prefix_token_id, seed")
        if kernel not in KERNELS:
            raise ValueError(f"any4 lm-eval model: kernel={kernel!r}; one of {KERNELS}")
        if device not in (None, "cpu", "cuda", "gpu") and not str(device).startswith("cuda"):
            raise ValueError(f"any4 lm-eval model: device={device!r}; JAX places the model "
                             "on its default device (JAX_PLATFORMS=cpu forces the CPU)")
        self.batch_size = 8 if str(batch_size).startswith("auto") else _as_int(
            batch_size, "batch_size")
        self.max_batch_tokens = _as_int(max_batch_tokens, "max_batch_tokens")
        if model is None:
            lm = load_model(pretrained, param_dtype=None if dtype == "auto" else dtype)
            model, tokenizer, self.source = lm.model, lm.tokenizer, lm.source
        else:
            if tokenizer is None:
                raise ValueError("any4 lm-eval model: model= needs tokenizer= as well")
            self.source = getattr(tokenizer, "source", "in-memory model")
        if kernel != "auto":
            prepare_model(model, kernel)
        self.model, self.tokenizer = model, tokenizer
        self._graphdef, self._state = nnx.split(model)
        limit = model.config.max_position_embeddings
        self._max_length = _as_int(max_length, "max_length", allow_none=True) or limit
        if self._max_length > limit:
            raise ValueError(f"any4 lm-eval model: max_length={self._max_length} exceeds the "
                             f"model's max_position_embeddings={limit}")
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.add_bos_token = add_bos_token
        self._prefix = prefix_token_id
        self.seed = int(seed)
        self.progress = progress
        if not tokenizer.eos_ids:
            raise ValueError(f"{self.source}: the tokenizer names no EOS token; lm-eval needs "
                             "one (end-of-text for generation, prefix for loglikelihood)")
        self.stats: dict[str, dict[str, float]] = {}

    # -- lm-eval's interface ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_ids[0])

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return int(self._prefix)
        bos = self.tokenizer.bos_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.source).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        special = add_special_tokens
        if special is None:
            special = True if self.add_bos_token is None else self.add_bos_token
            # a string that already starts with the BOS text gets no second BOS (as `hf`)
            if string.startswith(self.tokenizer.decode([self.prefix_token_id])):
                special = False
        ids = self.tokenizer.encode(string, add_special_tokens=special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history,
                                                  add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        t0 = time.perf_counter()
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._count("loglikelihood", len(requests), t0)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [((context, continuation) | None, context ids, continuation ids)] ->
        [(log-probability of the continuation, whether greedy decoding produces it)]."""
        L = self.max_length
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("a loglikelihood request with an empty context or "
                                 "continuation after tokenization")
            if len(cont) > L:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than "
                                 f"max_length={L}")

        def done(j, result):
            if requests[j][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[j][0], result)

        return score_requests(self._graphdef, self._state, [(c, k) for _, c, k in requests],
                              max_length=L, batch_size=self.batch_size,
                              max_batch_tokens=self.max_batch_tokens,
                              progress=self.progress and not disable_tqdm, on_result=done)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text of each request, in windows of max_length (lm-eval's rolling
        windows: every token predicted once, the first from the BOS/EOS prefix)."""
        t0 = time.perf_counter()
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                ctx, cont = lm_utils.make_disjoint_window(w)
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores, strict=True):
            totals[k] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        self._count("loglikelihood_rolling", len(requests), t0)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batch-1 KV-cache generation per request (jitted prefill and decode step), longest
        first; stops at EOS, at a stop string or after max_gen_toks tokens."""
        t0 = time.perf_counter()
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        encoded = [self.tok_encode(req.args[0]) for req in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until (any4)", leave=False,
                   disable=disable_tqdm or not self.progress)
        for i in order:
            context, gen_kwargs = requests[i].args
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_gen = int(kw.pop("max_gen_toks"))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", None) or 0.0) if do_sample else 0.0
            top_p = float(kw.pop("top_p", None) or 1.0)
            kw.pop("temperature", None)
            if do_sample and temperature == 0.0:
                temperature = 1.0  # transformers' default when sampling
            kw.pop("max_length", None)
            if kw:
                log.warning("any4 lm-eval model: generation arguments %s are not supported "
                            "and were ignored", sorted(kw))
            room = self.max_length - max_gen
            if room < 1:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in "
                                 f"max_length={self.max_length}")
            ids = encoded[i][-room:]
            stops = [s for s in until if s]

            def stop(new, stops=stops):
                text = self.tokenizer.decode(new)
                return any(s in text for s in stops)

            new, *_ = generate_ids(self.model, ids, max_new_tokens=max_gen,
                                   temperature=temperature, top_p=top_p, seed=self.seed + i,
                                   eos_ids=self.tokenizer.eos_ids, stop=stop)
            text = postprocess_generated_text(self.tok_decode(new), until, None)
            out[i] = text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(1)
        bar.close()
        self._count("generate_until", len(requests), t0)
        return out

    def _count(self, kind: str, n: int, t0: float) -> None:
        s = self.stats.setdefault(kind, {"requests": 0, "seconds": 0.0})
        s["requests"] += n
        s["seconds"] += time.perf_counter() - t0


def task_manager(include_path: str | None):
    """lm-eval's TaskManager with `include_path` (a directory of task YAMLs) added."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tm, names: list[str]) -> None:
    """A ValueError naming unknown task names and the local ones, before any model loads."""
    if not names:
        raise ValueError("--tasks: give at least one task name")
    known = set(tm.all_tasks) | set(tm.all_groups) | set(tm.all_tags)
    unknown = [n for n in names if n not in known and not os.path.isfile(n)]
    if unknown:
        local = sorted(n for n in tm.all_tasks if n.startswith(("austen", "text_")))
        raise ValueError(f"--tasks: unknown task(s) {unknown}; offline tasks here: "
                         f"{', '.join(local) or 'none'} (tag: austen). Hub tasks (hellaswag, "
                         "mmlu, ...) need network access the first time")


def evaluate(model: Any4LM, names: list[str], *, tm, limit=None, num_fewshot=None,
             seed: int = 1234, log_samples: bool = False) -> dict:
    """`lm_eval.simple_evaluate` on `model`, every seed set to `seed`."""
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=names, num_fewshot=num_fewshot,
                                   limit=limit, task_manager=tm, log_samples=log_samples,
                                   random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed)


def results_table(out: dict) -> str:
    """lm-eval's markdown table of `evaluate`'s result."""
    from lm_eval.utils import make_table

    return make_table(out)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
