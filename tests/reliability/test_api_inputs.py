"""Bad inputs to the Python API: configs, `quantize_model`, `quantize_params`, `save_quantized`,
`load_quantized`. Each case asserts the exception type, a phrase of its message, and that no
file was written, changed or deleted (tests/reliability/tree.py); the save cases also that an
existing output, or a directory that appears meanwhile, is never replaced unless it is an any4
checkpoint and overwrite was asked for.
"""

import json
import os
import shutil

import numpy as np
import pytest
from flax.core import FrozenDict

from any4_jax import checkpoint as ck
from any4_jax import outputs
from any4_jax.ptq.calibrate import CalibrationConfig
from any4_jax.ptq.functional import quantize_params
from any4_jax.ptq.quantize_model import quantize_model
from any4_jax.quant.config import KMeansConfig, QuantConfig
from any4_jax.quant.qweight import QuantizedWeight
from tests.reliability.tree import assert_same, dead_pid, debris, snapshot, unchanged
from tests.tiny_lm import tiny_model


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every case runs in its own directory, so a stray relative write would show."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def dense():
    return tiny_model()


# ---------------------------------------------------------------- storage dtypes and config types


@pytest.mark.parametrize("dtype", ["int8", "int32", "bool", "uint8"])
def test_integer_storage_dtype_is_refused(dtype, tmp_path):
    with unchanged(tmp_path), pytest.raises(ValueError, match="is not a floating dtype"):
        QuantConfig(dtype=dtype)


def test_storage_dtype_that_is_not_a_dtype(tmp_path):
    with unchanged(tmp_path), pytest.raises(ValueError, match="is not a dtype name"):
        QuantConfig(dtype="float99")


CONFIG_CASES = [
    ({"group_size": True}, ValueError, "group_size=True must be a positive integer"),
    ({"group_size": 0}, ValueError, "group_size=0 must be a positive integer"),
    ({"group_size": 32.0}, ValueError, "must be a positive integer"),
    ({"symmetric": "yes"}, ValueError, "symmetric='yes' must be True or False"),
    ({"sample_weighting": "bogus"}, ValueError, "unknown sample_weighting='bogus'"),
    ({"format": "int9"}, ValueError, "n_bit=9 is out of range"),
    ({"format": "bogus4"}, ValueError, "bogus4"),
    ({"kmeans": {"max_iter": 10}}, TypeError, "kmeans must be a KMeansConfig"),
]


def _fields_id(cases) -> list[str]:
    return [",".join(f"{k}={v!r}" for k, v in c[0].items()) for c in cases]


@pytest.mark.parametrize(("fields", "exc", "phrase"), CONFIG_CASES, ids=_fields_id(CONFIG_CASES))
def test_quant_config_field_types(fields, exc, phrase, tmp_path):
    with unchanged(tmp_path), pytest.raises(exc, match=phrase.replace("(", r"\(")):
        QuantConfig(**fields)


KMEANS_CASES = [
    ({"max_iter": True}, "max_iter=True must be an integer >= 0"),
    ({"max_iter": -1}, "max_iter=-1 must be an integer >= 0"),
    ({"tol": "abc"}, "tol='abc' must be a number >= 0"),
    ({"tol": float("nan")}, "must be a number >= 0"),
    ({"seed": "abc"}, "seed='abc' must be an integer"),
    ({"init": "kmeans--"}, "unknown init='kmeans--'"),
]


@pytest.mark.parametrize(("fields", "phrase"), KMEANS_CASES, ids=_fields_id(KMEANS_CASES))
def test_kmeans_config_field_types(fields, phrase, tmp_path):
    with unchanged(tmp_path), pytest.raises(ValueError, match=phrase):
        KMeansConfig(**fields)


# ---------------------------------------------------------------- quantize_model


@pytest.mark.parametrize(("kwargs", "exc", "phrase"), [
    ({"config": {"format": "int4"}}, TypeError, r"config must be a QuantConfig, got dict"),
    ({"calibration": {"mode": "offline"}}, TypeError,
     "calibration must be a CalibrationConfig, got dict"),
    ({"include": "layers.0.*"}, TypeError, r"include must be a list of patterns"),
    ({"exclude": "lm_head"}, TypeError, r"exclude must be a list of patterns"),
    ({"include": ["no_such_proj"]}, ValueError, "no Dense layer matches"),
    ({"overrides": {"down_proj": {"dtype": "int8"}}}, ValueError, "is not a floating dtype"),
    ({"overrides": {"down_proj": {"bits": 3}}}, ValueError, "QuantConfig's fields are"),
    ({"overrides": {"down_proj": 3}}, TypeError, "expected a dict of QuantConfig fields"),
    ({"overrides": {"dwn_proj": {"group_size": 32}}}, ValueError,
     r"override pattern\(s\) \['dwn_proj'\] match none of the 14 layers"),
    ({"config": QuantConfig(format="int4", group_size=48)}, ValueError,
     "does not divide in_features"),
], ids=["config-dict", "calibration-dict", "include-str", "exclude-str", "include-nothing",
        "override-int8", "override-unknown-field", "override-not-a-dict", "override-typo",
        "group-size-48"])
def test_quantize_model_bad_arguments(dense, kwargs, exc, phrase, tmp_path):
    kwargs = {"config": QuantConfig(format="int4", group_size=32), **kwargs}
    with unchanged(tmp_path), pytest.raises(exc, match=phrase):
        quantize_model(dense, progress=False, **kwargs)


def test_quantize_model_any4_without_calibration(dense, tmp_path):
    with unchanged(tmp_path), pytest.raises(ValueError, match="needs calibration: pass tokens="):
        quantize_model(dense, QuantConfig(format="any4", group_size=32),
                       calibration=CalibrationConfig(), progress=False)


# ---------------------------------------------------------------- quantize_params


def _linen(key=str):
    """A Linen-layout tree of one decoder layer (q, k, v, o), lm_head and the embedding; the
    layer key made by `key` (str as in HF checkpoints, or int)."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)
    attn = {n: {"kernel": w(64, 64)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return {"model": {"embed_tokens": {"embedding": w(256, 64)},
                      "layers": {key(0): {"self_attn": attn}}},
            "lm_head": {"kernel": w(64, 256)}}


INT4 = QuantConfig(format="int4", group_size=32)


@pytest.mark.parametrize(("params", "kwargs", "exc", "phrase"), [
    ([1, 2, 3], {}, TypeError, "params must be a mapping .* got list"),
    ("model", {}, TypeError, "params must be a mapping .* got str"),
    ({"model": {"embed_tokens": {"embedding": np.zeros((4, 4))}}}, {}, ValueError,
     "the filter selects no kernel"),
    (None, {"config": {"format": "int4"}}, TypeError, "config must be a QuantConfig, got dict"),
    (None, {"calibration": [1.0, 2.0]}, TypeError,
     "calibration must be a Calibration or a mapping of statistics, got list"),
    (None, {"config": QuantConfig(format="any4", group_size=32)}, ValueError,
     "needs an activation statistic"),
], ids=["list", "str", "no-kernel", "config-dict", "calibration-list", "any4-no-stats"])
def test_quantize_params_bad_arguments(params, kwargs, exc, phrase, tmp_path):
    params = _linen() if params is None else params
    kwargs = {"config": INT4, **kwargs}
    with unchanged(tmp_path), pytest.raises(exc, match=phrase):
        quantize_params(params, **kwargs)


def test_quantize_params_keeps_a_frozendict(tmp_path):
    params = FrozenDict(_linen())
    with unchanged(tmp_path):
        q = quantize_params(params, INT4)
    assert isinstance(q, FrozenDict)
    assert list(q) == list(params) and list(q["model"]["layers"]) == ["0"]
    assert isinstance(q["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"],
                      QuantizedWeight)
    assert isinstance(q["lm_head"]["kernel"], np.ndarray)  # not a decoder kernel


def test_quantize_params_keeps_int_layer_keys(tmp_path):
    params = _linen(key=int)
    with unchanged(tmp_path):
        q = quantize_params(params, INT4)
    assert list(q["model"]["layers"]) == [0] and isinstance(next(iter(q["model"]["layers"])), int)
    assert isinstance(q["model"]["layers"][0]["self_attn"]["o_proj"]["kernel"], QuantizedWeight)
    assert q["model"]["embed_tokens"]["embedding"] is params["model"]["embed_tokens"]["embedding"]


# ---------------------------------------------------------------- save_quantized: arguments


@pytest.mark.parametrize(("kwargs", "phrase"), [
    ({"tokenizer": None}, "tokenizer must be the model's Tokenizer .* got NoneType"),
    ({"tokenizer": "bytes"}, "tokenizer must be the model's Tokenizer .* got str"),
    ({"metadata": None}, "metadata must be a dict, got NoneType"),
    ({"metadata": [("a", 1)]}, "metadata must be a dict, got list"),
], ids=["tokenizer-None", "tokenizer-str", "metadata-None", "metadata-list"])
def test_save_quantized_bad_arguments(tiny_nf4, kwargs, phrase, tmp_path):
    qm, tok = tiny_nf4
    kwargs = {"tokenizer": tok, "metadata": {}, **kwargs}
    with unchanged(tmp_path), pytest.raises(TypeError, match=phrase):
        ck.save_quantized(tmp_path / "out", qm, **kwargs)


# ---------------------------------------------------------------- save_quantized: what is there


@pytest.mark.parametrize("copied_meta", [False, True], ids=["own-files", "a-copied-any4.json"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_save_over_a_user_directory_is_refused(tiny_nf4, tiny_ck_master, user_project,
                                               overwrite, copied_meta, tmp_path):
    """The data-loss bug: overwrite=True renamed any directory away and removed it; a copy of
    a checkpoint's any4.json among the user's files does not make it a checkpoint."""
    qm, tok = tiny_nf4
    if copied_meta:
        shutil.copy(tiny_ck_master / "any4.json", user_project)
    with unchanged(tmp_path), pytest.raises(FileExistsError,
                                            match="is not an any4 checkpoint; it is left as it"):
        ck.save_quantized(user_project, qm, tokenizer=tok, metadata={}, overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_over_a_regular_file_is_refused(tiny_nf4, overwrite, tmp_path):
    qm, tok = tiny_nf4
    (tmp_path / "model.bin").write_bytes(os.urandom(1000))
    with unchanged(tmp_path), pytest.raises(FileExistsError,
                                            match="exists and is not a directory"):
        ck.save_quantized(tmp_path / "model.bin", qm, tokenizer=tok, metadata={},
                          overwrite=overwrite)
    assert debris(tmp_path, "model.bin") == []


def test_save_under_a_file_is_refused(tiny_nf4, tmp_path):
    qm, tok = tiny_nf4
    (tmp_path / "notes.txt").write_text("mine\n")
    with unchanged(tmp_path), pytest.raises(outputs.OutputError,
                                            match="notes.txt is a file, not a directory"):
        ck.save_quantized(tmp_path / "notes.txt" / "ck", qm, tokenizer=tok, metadata={})


def test_save_into_a_read_only_directory_is_refused(tiny_nf4, tmp_path, monkeypatch):
    """As a user without write permission sees it (os.access answers no; root ignores chmod,
    so the answer is simulated here: the check is what is tested)."""
    qm, tok = tiny_nf4
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(outputs.os, "access",
                        lambda p, mode: False if os.fspath(p) == str(ro) else real(p, mode))
    with unchanged(tmp_path), pytest.raises(outputs.OutputError,
                                            match="no permission to write in"):
        ck.save_quantized(ro / "ck", qm, tokenizer=tok, metadata={})


def test_save_over_a_checkpoint_needs_overwrite(tiny_nf4, tiny_ck, tmp_path):
    qm, tok = tiny_nf4
    with unchanged(tmp_path), pytest.raises(FileExistsError, match="pass --overwrite"):
        ck.save_quantized(tiny_ck, qm, tokenizer=tok, metadata={"note": "second"})


def test_overwrite_replaces_a_checkpoint_and_leaves_no_debris(tiny_nf4, tiny_ck, tmp_path):
    qm, tok = tiny_nf4
    (tmp_path / "keep.txt").write_text("a neighbour\n")
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("ck")}
    ck.save_quantized(tiny_ck, qm, tokenizer=tok, metadata={"note": "second"}, overwrite=True)
    assert ck.read_metadata(tiny_ck)["run"] == {"note": "second"}  # the first one's is gone
    assert debris(tmp_path, "ck") == []
    assert_same(before, {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("ck")})


def _user_dir(path, *, empty=False):
    os.mkdir(path)
    if not empty:
        with open(os.path.join(path, "mine.txt"), "w") as fh:
            fh.write("a user's file\n")


@pytest.mark.parametrize("empty", [False, True], ids=["with-a-file", "empty"])
def test_a_directory_that_appears_at_the_rename_is_kept(tiny_nf4, empty, tmp_path,
                                                        monkeypatch):
    """overwrite=False holds at the moment of the rename (RENAME_NOREPLACE), not only at the
    start: the directory appears after the last check, just before the rename (rename(2)
    alone would replace an empty one silently)."""
    qm, tok = tiny_nf4
    real = outputs.rename_noreplace
    seen = {}

    def racing(src, dst):
        _user_dir(dst, empty=empty)
        seen["tree"] = snapshot(dst)
        real(src, dst)

    monkeypatch.setattr(outputs, "rename_noreplace", racing)
    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={})
    assert_same(seen["tree"], snapshot(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no .partial left


def test_a_directory_that_appears_during_the_save_is_kept(tiny_nf4, tmp_path, monkeypatch):
    qm, tok = tiny_nf4
    real = outputs.file_digests
    seen = {}

    def digests_then_race(root, **kw):
        out = real(root, **kw)
        _user_dir(tmp_path / "ck")
        seen["tree"] = snapshot(tmp_path / "ck")
        return out

    monkeypatch.setattr(outputs, "file_digests", digests_then_race)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={})
    assert_same(seen["tree"], snapshot(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_checkpoint_swapped_for_a_user_directory_is_kept(tiny_nf4, tiny_ck, tmp_path,
                                                           monkeypatch):
    """overwrite=True: the checkpoint checked at the start is replaced by a user's directory
    before the install; the install checks again and leaves it."""
    qm, tok = tiny_nf4
    real = outputs.file_digests
    seen = {}

    def digests_then_swap(root, **kw):
        out = real(root, **kw)
        shutil.rmtree(tiny_ck)
        _user_dir(tiny_ck)
        seen["tree"] = snapshot(tiny_ck)
        return out

    monkeypatch.setattr(outputs, "file_digests", digests_then_swap)
    with pytest.raises(FileExistsError, match="is no longer an any4 checkpoint"):
        ck.save_quantized(tiny_ck, qm, tokenizer=tok, metadata={}, overwrite=True)
    assert_same(seen["tree"], snapshot(tiny_ck))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# ---------------------------------------------------------------- debris of killed processes


def test_debris_of_a_dead_process_is_removed_by_the_next_save(tiny_nf4, tiny_ck, tmp_path):
    qm, tok = tiny_nf4
    pid = dead_pid()
    partial = tmp_path / f".ck.partial-{pid}"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half").write_bytes(os.urandom(2048))
    shutil.copytree(tiny_ck, tmp_path / f".ck.old-{pid}")  # the target exists: stale
    (tmp_path / f".other.partial-{pid}").mkdir()  # another target's: not ours to touch
    ck.save_quantized(tiny_ck, qm, tokenizer=tok, metadata={"note": "new"}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [f".other.partial-{pid}", "ck"]
    assert ck.read_metadata(tiny_ck)["run"] == {"note": "new"}


def test_debris_of_a_live_process_is_left(tiny_nf4, tmp_path):
    qm, tok = tiny_nf4
    live = tmp_path / f".ck.partial-{os.getppid()}"  # another process, still running
    live.mkdir()
    (live / "x").write_text("being written\n")
    before = snapshot(live)
    ck.save_quantized(tmp_path / "ck", qm, tokenizer=tok, metadata={})
    assert_same(before, snapshot(live))
    assert sorted(os.listdir(tmp_path)) == [live.name, "ck"]


def test_an_old_checkpoint_whose_target_is_missing_is_restored(tiny_nf4, tiny_ck, tmp_path):
    """A process killed between moving the checkpoint aside and installing the new one left
    only `.ck.old-PID`: that is the previous checkpoint, and the next save puts it back (and,
    without overwrite, does not replace it)."""
    qm, tok = tiny_nf4
    old = tmp_path / f".ck.old-{dead_pid()}"
    os.rename(tiny_ck, old)
    before = snapshot(old)
    with pytest.raises(FileExistsError, match="overwrite"):
        ck.save_quantized(tiny_ck, qm, tokenizer=tok, metadata={"note": "new"})
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert_same(before, snapshot(tiny_ck))
    assert ck.read_metadata(tiny_ck)["run"] == {"note": "the first checkpoint"}


# ---------------------------------------------------------------- load_quantized


@pytest.mark.parametrize("path", [None, 3, ["ck"]], ids=["None", "int", "list"])
def test_load_quantized_needs_a_path(path, tmp_path):
    with unchanged(tmp_path), pytest.raises(TypeError, match="path must be a checkpoint "
                                            "directory .* got"):
        ck.load_quantized(path)


def test_load_quantized_of_a_directory_that_is_not_one(user_project, tmp_path):
    with unchanged(tmp_path), pytest.raises(ck.CheckpointFormatError,
                                            match="no any4.json; not an any4-jax checkpoint"):
        ck.load_quantized(user_project)


def test_load_quantized_of_a_hand_edited_metadata_file(tiny_ck, tmp_path):
    f = tiny_ck / "any4.json"
    meta = json.loads(f.read_text())
    meta["quantized_layers"]["layers.0.mlp.up_proj"]["group_size"] = 64
    f.write_text(json.dumps(meta, indent=2))
    with unchanged(tmp_path), pytest.raises(ck.CheckpointFormatError,
                                            match="any4.json was edited or damaged"):
        ck.load_quantized(tiny_ck)


def _state_file(path) -> str:
    meta = ck.read_metadata(path)
    return max((f for f in meta["files"] if f.startswith("state/")),
               key=lambda f: os.path.getsize(path / f))  # the largest: an array file


def test_load_quantized_names_a_damaged_array_file(tiny_ck, tmp_path):
    victim = _state_file(tiny_ck)
    with open(tiny_ck / victim, "r+b") as fh:
        fh.seek(os.path.getsize(tiny_ck / victim) // 2)
        fh.write(b"\xff\x00\xff\x00")
    with unchanged(tmp_path), pytest.raises(ck.CheckpointFormatError,
                                            match=f"{victim} is damaged"):
        ck.load_quantized(tiny_ck)


def test_load_quantized_names_a_missing_array_file(tiny_ck, tmp_path):
    victim = _state_file(tiny_ck)
    os.remove(tiny_ck / victim)
    with unchanged(tmp_path), pytest.raises(ck.CheckpointFormatError,
                                            match=f"{victim} is missing"):
        ck.load_quantized(tiny_ck)
