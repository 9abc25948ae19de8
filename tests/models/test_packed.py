"""Packed sequences: `Llama.hidden(segments=, positions=)` scores several continuations of one
prefix in one row exactly as each alone after the prefix."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_lm import tiny_model


@pytest.mark.parametrize("window", [None, 6])
def test_packed_rows_equal_separate_sequences(window):
    model = tiny_model(seed=1, sliding_window=window)
    rng = np.random.default_rng(0)
    prefix, a, b = (rng.integers(0, 256, n).tolist() for n in (9, 4, 6))
    tokens = jnp.asarray([prefix + a + b + [0, 0]])  # two padding tokens at the end
    seg = jnp.asarray([[0] * 9 + [1] * 4 + [2] * 6 + [3, 3]])
    pos = jnp.asarray([list(range(9)) + list(range(9, 13)) + list(range(9, 15)) + [0, 0]])
    h, _ = model.hidden(tokens, segments=seg, positions=pos)
    ha, _ = model.hidden(jnp.asarray([prefix + a]))
    hb, _ = model.hidden(jnp.asarray([prefix + b]))
    np.testing.assert_allclose(h[0, :13], ha[0], atol=2e-5)
    np.testing.assert_allclose(h[0, 13:19], hb[0, 9:], atol=2e-5)


def test_segments_need_positions_and_no_cache():
    model = tiny_model()
    t = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="positions"):
        model.hidden(t, segments=t)
