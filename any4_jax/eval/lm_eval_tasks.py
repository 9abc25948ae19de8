"""Offline lm-evaluation-harness tasks built from a novel (no dataset hub needed).

`build_tasks(out_dir)` writes, from the text `any4 fetch` brings (Pride and Prejudice by
default: the development and evaluation novel, docs/design.md section 4):

- `austen_pp_next` (multiple choice): a passage of 1-4 consecutive paragraphs of one chapter;
  which of four paragraphs follows it? The true next paragraph and three distractors drawn
  (seeded) from elsewhere in the book, of similar length (within +-35% of the words, so that
  `acc` is not won by the shortest choice), in random order. Metrics acc, acc_norm.
- `austen_pp_rolling` (loglikelihood_rolling): the book cut into documents of consecutive
  paragraphs (about `doc_words` words, never across a chapter), scored as lm-eval scores
  wikitext. Metrics word_perplexity, byte_perplexity, bits_per_byte.

Both carry the tag `austen`, so `--tasks austen` runs both. Another novel gives
`austen_NAME_next` / `austen_NAME_rolling` (`task_prefix`). The directory holds the JSONL
data, one YAML per task (`dataset_path: json` with absolute `data_files`) and
`any4_tasks.json` (seed, text sha256, counts): pass it to lm-eval as `--include-path`. The
same seed and text give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np

from any4_jax import assets, outputs

MANIFEST = "any4_tasks.json"
TASK_VERSION = 1
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)


def chapters(text: str) -> list[list[str]]:
    """The paragraphs of each chapter (front matter before the first chapter dropped); a
    paragraph's lines are joined by single spaces."""
    out: list[list[str]] = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = " ".join(line.strip() for line in block.strip().split("\n")).strip()
        if not para:
            continue
        if _CHAPTER.match(para):
            out.append([])
        elif out:
            out[-1].append(para)
    if not out:
        raise ValueError("no 'Chapter N' headings found; the text is not a novel in the "
                         "janeaustenr layout (pass one of the Austen novels)")
    return [c for c in out if c]


def _words(p: str) -> int:
    return len(p.split())


def next_paragraph_docs(chaps: list[list[str]], *, n: int, seed: int,
                        min_context_words: int = 60, max_context_paras: int = 4,
                        answer_words: tuple[int, int] = (8, 50)) -> list[dict]:
    """Up to `n` multiple-choice questions (book order), each {"passage", "choices",
    "label", "chapter", "paragraph"}."""
    rng = np.random.default_rng(seed)
    flat = [(ci, pi, p) for ci, c in enumerate(chaps) for pi, p in enumerate(c)]
    lengths = np.array([_words(p) for _, _, p in flat])
    lo, hi = answer_words
    cands = []
    for k, (ci, pi, _) in enumerate(flat):
        if pi == 0 or not lo <= lengths[k] <= hi:
            continue
        ctx: list[str] = []
        j, words = pi - 1, 0
        while j >= 0 and len(ctx) < max_context_paras:
            ctx.insert(0, chaps[ci][j])
            words += lengths[k - (pi - j)]  # paragraph j of this chapter, counted once above
            if words >= min_context_words:
                break
            j -= 1
        cands.append((k, ctx))
    if not cands:
        raise ValueError("the text has no paragraph that can be asked about")
    pick = np.sort(rng.choice(len(cands), size=min(n, len(cands)), replace=False))
    docs = []
    for i in pick:
        k, ctx = cands[i]
        ci, pi, answer = flat[k]
        near = np.flatnonzero((np.abs(lengths - lengths[k]) <= 0.35 * lengths[k])
                              & (np.abs(np.arange(len(flat)) - k) > 3))
        texts = {answer}
        distractors: list[str] = []
        for d in rng.permutation(near):
            if flat[d][2] not in texts:
                texts.add(flat[d][2])
                distractors.append(flat[d][2])
            if len(distractors) == 3:
                break
        if len(distractors) < 3:
            continue
        label = int(rng.integers(4))
        choices = distractors[:label] + [answer] + distractors[label:]
        docs.append({"passage": "\n\n".join(ctx), "choices": choices, "label": label,
                     "chapter": ci + 1, "paragraph": pi + 1})
    return docs


def rolling_docs(chaps: list[list[str]], *, doc_words: int) -> list[dict]:
    """Consecutive paragraphs of one chapter joined by blank lines, about `doc_words` words
    each (a document closes once it reaches that many): {"text", "chapter"}."""
    docs = []
    for ci, c in enumerate(chaps):
        cur: list[str] = []
        words = 0
        for p in c:
            cur.append(p)
            words += _words(p)
            if words >= doc_words:
                docs.append({"text": "\n\n".join(cur), "chapter": ci + 1})
                cur, words = [], 0
        if cur:
            docs.append({"text": "\n\n".join(cur), "chapter": ci + 1})
    return docs


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML flow scalar


def task_prefix(source: str) -> tuple[str, str]:
    """(task name prefix, tag) for a text source: austen_pp for Pride and Prejudice,
    austen_NAME for the other novels, text_STEM for a file."""
    if source == "prideprejudice":
        return "austen_pp", "austen"
    if source in assets.NOVELS:
        return f"austen_{source}", "austen"
    stem = re.sub(r"[^a-z0-9]+", "_", Path(source).stem.lower()).strip("_") or "file"
    return f"text_{stem}", "local_text"


def _task_yaml(name: str, tag: str, data: Path, lines: list[str]) -> str:
    return "\n".join([
        f"task: {name}",
        "tag:",
        f"  - {tag}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_str(str(data))}",
        "test_split: test",
        *lines,
        "metadata:",
        f"  version: {TASK_VERSION}.0",
        "",
    ])


def _jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()


def _is_ours(p: Path) -> bool:
    return (p / MANIFEST).is_file()


def build_tasks(out_dir, *, text: str, source: str, seed: int = 0, n_questions: int = 500,
                doc_words: int = 300, overwrite: bool = False) -> dict:
    """Writes the task directory `out_dir` atomically (a complete directory or none; an
    existing one is replaced only if it is a task directory of ours and `overwrite`).
    Returns the manifest."""
    if n_questions < 1 or doc_words < 1:
        raise ValueError(f"{n_questions=} and {doc_words=} must be positive")
    final = outputs.check_dir_output(out_dir, overwrite=overwrite, is_ours=_is_ours,
                                     kind="an any4 lm-eval task directory", what="--out")
    chaps = chapters(text)
    mc = next_paragraph_docs(chaps, n=n_questions, seed=seed)
    roll = rolling_docs(chaps, doc_words=doc_words)
    pre, tag = task_prefix(source)
    manifest = {
        "version": TASK_VERSION, "source": source, "seed": seed, "tag": tag,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "chapters": len(chaps), "paragraphs": sum(map(len, chaps)),
        "tasks": {f"{pre}_next": {"docs": len(mc), "kind": "multiple_choice"},
                  f"{pre}_rolling": {"docs": len(roll), "doc_words": doc_words,
                                     "kind": "loglikelihood_rolling"}},
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    outputs.remove_debris(final, is_ours=_is_ours)
    tmp = outputs.sibling(final, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {
            f"{pre}_next.jsonl": _jsonl(mc),
            f"{pre}_rolling.jsonl": _jsonl(roll),
            f"{pre}_next.yaml": _task_yaml(f"{pre}_next", tag, final / f"{pre}_next.jsonl", [
                "output_type: multiple_choice",
                "doc_to_text: passage",
                "doc_to_choice: choices",
                "doc_to_target: label",
                'target_delimiter: "\\n\\n"',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "  - metric: acc_norm",
                "    aggregation: mean",
                "    higher_is_better: true",
            ]).encode(),
            f"{pre}_rolling.yaml": _task_yaml(
                f"{pre}_rolling", tag, final / f"{pre}_rolling.jsonl", [
                    "output_type: loglikelihood_rolling",
                    'doc_to_text: ""',
                    "doc_to_target: text",
                    "metric_list:",
                    "  - metric: word_perplexity",
                    "    aggregation: weighted_perplexity",
                    "    higher_is_better: false",
                    "  - metric: byte_perplexity",
                    "    aggregation: weighted_perplexity",
                    "    higher_is_better: false",
                    "  - metric: bits_per_byte",
                    "    aggregation: bits_per_byte",
                    "    higher_is_better: false",
                ]).encode(),
            MANIFEST: json.dumps(manifest, indent=2).encode(),
        }
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        outputs.install_dir(tmp, final, overwrite=overwrite, is_ours=_is_ours,
                            kind="an any4 lm-eval task directory")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def default_task_dir() -> Path:
    """Where `any4 lm-eval` keeps the tasks it builds: $ANY4_JAX_CACHE/lm_eval_tasks."""
    return Path(assets.cache_dir()) / "lm_eval_tasks"


def ensure_default_tasks(log=print) -> Path:
    """The default task directory, built from the fetched Pride and Prejudice (seed 0) when
    missing or built by an older version of this module."""
    from any4_jax.eval.data import load_text

    d = default_task_dir()
    try:
        current = json.loads((d / MANIFEST).read_text())["version"] == TASK_VERSION
    except (OSError, ValueError, KeyError):
        current = False
    if not current:
        text, desc = load_text("prideprejudice", flag="the default tasks' text")
        log(f"building the offline lm-eval tasks from {desc} into {d}")
        build_tasks(d, text=text, source="prideprejudice", overwrite=True)
    return d
