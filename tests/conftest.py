"""Test set-up: 8 CPU devices for the sharding tests, and `gpu` tests skipped without a GPU."""

import os

# Must happen before jax initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to jax)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def smollm2_path():
    """The embedded SmolLM2 GGUF; tests that need it skip until `any4 fetch` has run."""
    from any4_jax import assets

    p = assets.model_path()
    if not os.path.isfile(p):
        pytest.skip(f"{p} missing: run `any4 fetch` (CI does)")
    return p


@pytest.fixture(scope="session")
def pride_text():
    from any4_jax import assets

    p = assets.text_path("prideprejudice")
    if not os.path.isfile(p):
        pytest.skip(f"{p} missing: run `any4 fetch` (CI does)")
    with open(p, encoding="utf-8") as fh:
        return fh.read()


@pytest.fixture(scope="session")
def transformers_smollm2(smollm2_path):
    """transformers' own GGUF loading of the embedded model (torch, float32): the oracle."""
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    d, f = os.path.split(smollm2_path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32")
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from any4_jax.loading import load_model

    return load_model(smollm2_path)
