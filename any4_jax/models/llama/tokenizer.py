"""Tokenizers behind one small interface: `encode(text) -> list[int]`, `decode(ids) -> str`.

Two sources: a Hugging Face directory (transformers' AutoTokenizer, offline) and the metadata
of a GGUF file (byte-level BPE rebuilt with the `tokenizers` package).
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTok

from any4_jax.models.llama.safetensors_io import CheckpointError


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` or a transformers tokenizer.

    `add_bos`: whether `encode` starts with BOS (what the checkpoint's own tokenizer does;
    the SmolLM2 GGUF adds none).
    """

    def __init__(self, backend, *, bos_id: int | None, eos_ids: tuple[int, ...],
                 add_bos: bool, source: str):
        self._tok = backend
        self.bos_id, self.eos_ids, self.add_bos, self.source = bos_id, eos_ids, add_bos, source

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens=False`: without the BOS (or other special
        tokens) the tokenizer would add (lm-eval's convention)."""
        if hasattr(self._tok, "encode_batch"):  # tokenizers.Tokenizer
            ids = self._tok.encode(text, add_special_tokens=False).ids
            bos = add_special_tokens and self.add_bos and self.bos_id is not None
            return ([self.bos_id] if bos else []) + ids
        return list(self._tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (Hugging Face tokenizers only), or None."""
        return getattr(self._tok, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """`messages` ([{"role", "content"}]) rendered as the checkpoint's template does."""
        if not self.chat_template:
            raise ValueError(f"{self.source}: the tokenizer has no chat template (a Hugging "
                             "Face tokenizer_config.json carries one; GGUF files are read "
                             "without it)")
        return self._tok.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def __len__(self) -> int:
        if hasattr(self._tok, "get_vocab_size"):
            return self._tok.get_vocab_size()
        return len(self._tok)


def hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face directory, without network access:
    transformers' AutoTokenizer, else a bare tokenizer.json through `tokenizers`."""
    path = os.fspath(path)
    error = None
    try:
        # transformers takes seconds to import: only for Hugging Face directories
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = tok.eos_token_id
        return Tokenizer(tok, bos_id=tok.bos_token_id, eos_ids=() if eos is None else (eos,),
                         add_bos=bool(tok("")["input_ids"]), source=path)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise bare Exception
        error = e
    f = os.path.join(path, "tokenizer.json")
    if os.path.isfile(f):
        try:
            backend = HFTok.from_file(f)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise CheckpointError(f"{f}: not a readable tokenizer ({e}); the file is truncated "
                                  "or corrupt (re-download it)") from None
        return Tokenizer(backend, bos_id=None, eos_ids=(), add_bos=False, source=path)
    raise FileNotFoundError(
        f"{path}: no usable tokenizer (tokenizer.json / tokenizer_config.json)"
        + (f": {error}" if error else ""))


# llama.cpp pre-tokenizer names -> `tokenizers` pre-tokenizer builders.
def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # individual digits, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    if pre in ("gpt2", "default", "gpt-2"):
        return byte_level
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(
        f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, llama-bpe); load the "
        "model from its Hugging Face directory instead, which carries tokenizer.json")


def gguf_tokenizer(fields: dict, *, source: str) -> Tokenizer:
    """Byte-level BPE from GGUF metadata (`tokenizer.ggml.*`), as llama.cpp builds it."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
            "'gpt2'); load the model from its Hugging Face directory instead")
    tokens, merges = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.merges")
    for key, value in (("tokens", tokens), ("merges", merges)):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)
                and (value or key == "merges")):
            raise CheckpointError(
                f"{source}: GGUF metadata lacks a valid tokenizer.ggml.{key} list; the file is "
                "damaged or not a complete llama.cpp conversion (re-download it)")
    if bad := [m for m in merges if " " not in m][:3]:
        raise CheckpointError(f"{source}: GGUF tokenizer merges {bad} are not 'left right' "
                              "pairs; the file is damaged (re-download it)")
    merges = [tuple(m.split(" ", 1)) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTok(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                           ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise CheckpointError(f"{source}: GGUF tokenizer.ggml.token_type does not match the "
                              f"{len(tokens)} tokens; the file is damaged (re-download it)")
    # CONTROL (3) and USER_DEFINED (4) tokens match as whole strings, never split by BPE
    special = [AddedToken(tokens[i], special=(t == 3), normalized=False)
               for i, t in enumerate(types) if t in (3, 4)]
    if special:
        tok.add_special_tokens([s for s in special if s.special])
        tok.add_tokens([s for s in special if not s.special])
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eot = fields.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(int(e) for e in dict.fromkeys(x for x in (eos, eot) if x is not None))
    return Tokenizer(tok, bos_id=None if bos is None else int(bos), eos_ids=eos_ids,
                     add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                     source=source)
