"""Text sources for perplexity and calibration.

Names: the six Austen novels fetched by `any4 fetch` (`prideprejudice` for evaluation and
development, `sensesensibility` for calibration; the other four are held out), the GPTQ
datasets `wikitext2`, `c4`, `ptb` when the `datasets` package and a hub are reachable, or a
path to any UTF-8 text file.
"""

from __future__ import annotations

import os

from any4_jax import assets

HUB_DATASETS = ("wikitext2", "c4", "ptb")


class TextSourceError(ValueError):
    """A text source is unknown or unavailable; the message says how to get it."""


def _hub_text(name: str, flag: str) -> str:
    try:  # an optional dependency, for the hub's datasets only
        import datasets
    except ImportError:
        raise TextSourceError(
            f"{flag} {name} needs the `datasets` package (pip install datasets) and hub "
            f"access; use {flag} prideprejudice or a file path instead") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split="test")
            return " ".join(ds["sentence"])
        # GPTQ's C4 validation protocol: the first shard of the English validation split.
        ds = datasets.load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation")
        return " ".join(ds[:1100]["text"])
    except Exception as e:  # noqa: BLE001 - offline errors come in many types
        raise TextSourceError(
            f"{flag} {name}: could not load from the hub ({type(e).__name__}: {e}); offline, "
            f"use {flag} prideprejudice or a file path") from None


def load_text(source: str, *, flag: str = "--text") -> tuple[str, str]:
    """(text, description) for a source name or file path; errors name `flag`, the option
    the user gave it with."""
    if source in assets.NOVELS:
        p = assets.text_path(source)
        if not os.path.isfile(p):
            raise TextSourceError(
                f"{flag} {source}: {p} is missing; run `any4 fetch` (or point {flag} at any "
                "UTF-8 text file)")
        with open(p, encoding="utf-8") as fh:
            return fh.read(), f"{source} (janeaustenr)"
    if source in HUB_DATASETS:
        return _hub_text(source, flag), source
    if os.path.isfile(source):
        try:
            with open(source, encoding="utf-8") as fh:
                return fh.read(), source
        except UnicodeDecodeError as e:
            raise TextSourceError(f"{flag} {source}: not UTF-8 text ({e})") from None
    raise TextSourceError(
        f"{flag} {source!r}: not a file and not a known source "
        f"({', '.join(assets.NOVELS + HUB_DATASETS)})")
