"""Fixtures of the post-training quantization tests: the tiny model's calibration tokens."""

import pytest

from any4_jax.ptq.calibrate import CalibrationConfig, calibration_tokens
from tests.tiny_lm import byte_tokenizer


@pytest.fixture(scope="module")
def tokens():
    """[1, t] int32: the built-in calibration prompt, byte-tokenized."""
    return calibration_tokens(byte_tokenizer().encode, CalibrationConfig())
