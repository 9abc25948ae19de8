"""A Hugging Face directory of a GGUF model, written with transformers' own GGUF reader: the
same weights for lm-eval's `hf` model (torch) and ours, so the two can be compared.

transformers de-quantizes the GGUF (our embedded SmolLM2 is Q4_1) to float32 and refuses to
`save_pretrained` a model it read from GGUF; the weights are moved into a plain
`LlamaForCausalLM` of the same config, which it saves (config.json, model.safetensors,
generation_config.json) beside the tokenizer it rebuilt from the GGUF metadata.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from any4_jax import outputs

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_hf_reference(path) -> bool:
    return all((Path(path) / f).is_file() for f in HF_FILES)


def hf_directory_from_gguf(gguf_path, out_dir, *, overwrite: bool = False) -> Path:
    """Writes `out_dir` (atomically: complete or absent) and returns it; an existing complete
    directory is kept as it is unless `overwrite`."""
    final = Path(out_dir).absolute()
    if is_hf_reference(final) and not overwrite:
        return final
    outputs.check_dir_output(final, overwrite=True, is_ours=is_hf_reference,
                             kind="a Hugging Face model directory", what="out_dir")
    import transformers  # seconds to import: only here

    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    read = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32")
    config = read.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(read.state_dict(), strict=True)
    model.generation_config = read.generation_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.sibling(final, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        outputs.install_dir(tmp, final, overwrite=True, is_ours=is_hf_reference,
                            kind="a Hugging Face model directory")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
