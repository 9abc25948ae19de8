"""Fixtures of the bad-input suite: a tiny partly quantized model and its saved checkpoint.

The model is tests/tiny_lm.py's (2 layers, d=64, float32) with only `layers.0.*` quantized
(nf4, groups of 32: no calibration, so it is made in about a second); `layers.1.*` and
`lm_head` stay dense, so the CLI can quantize the checkpoint further.
"""

import os
import shutil

import pytest

from tests.tiny_lm import byte_tokenizer, tiny_model

TINY_QUANTIZED = ["layers.0.*"]  # what the tiny checkpoint has quantized already


@pytest.fixture(scope="session")
def tiny_nf4():
    """(a tiny Llama with layers.0.* quantized to nf4 g32, the byte tokenizer)."""
    from any4_jax.ptq.quantize_model import quantize_model
    from any4_jax.quant.config import QuantConfig

    qm, _ = quantize_model(tiny_model(), QuantConfig(format="nf4", group_size=32),
                           include=TINY_QUANTIZED, progress=False)
    return qm, byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_ck_master(tiny_nf4, tmp_path_factory):
    """A saved checkpoint of `tiny_nf4`, shared: tests that may change it use `tiny_ck`."""
    from any4_jax.checkpoint import save_quantized

    qm, tok = tiny_nf4
    path = tmp_path_factory.mktemp("master") / "tiny-ck"
    save_quantized(path, qm, tokenizer=tok, metadata={"note": "the first checkpoint"})
    return path


@pytest.fixture
def tiny_ck(tiny_ck_master, tmp_path):
    """A fresh copy of the tiny checkpoint at tmp_path/ck."""
    dst = tmp_path / "ck"
    shutil.copytree(tiny_ck_master, dst)
    return dst


@pytest.fixture
def user_project(tmp_path):
    """A directory of a user's own files (what --overwrite once deleted)."""
    d = tmp_path / "project"
    (d / "src").mkdir(parents=True)
    (d / "README.md").write_text("my project\n")
    (d / "src" / "main.py").write_text("print('hello')\n")
    (d / "data.bin").write_bytes(os.urandom(4096))
    return d
