"""The text tower's attention and pooling: causal vs bidirectional, EOT position, padding in mean pooling.

Per-token outputs are read from the tower itself (the ``ln_final`` output that pooling reads, captured with
flax's ``capture_intermediates``), so these tests see exactly what the pooled embedding is made of.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clus_jax.models.text import TextTransformer

import tolerances  # registered by tests/conftest.py

VOCAB, LENGTH = 50, 8


def tower(causal=True, pooling="eot", pooled_last_block=True):
    return TextTransformer(vocab_size=VOCAB, context_length=LENGTH, width=32, depth=2, heads=4, mlp_dim=64,
                           causal=causal, pooling=pooling, pooled_last_block=pooled_last_block)


def init(model, seed=0):
    return model.init(jax.random.key(seed), jnp.ones((1, LENGTH), jnp.int32))["params"]


def token_outputs(model, params, tokens):
    """[B, T, width]: every token's final (layer-normed) output, the rows pooling chooses from."""
    full = model.clone(pooled_last_block=False)
    _, state = full.apply({"params": params}, jnp.asarray(tokens), capture_intermediates=True, mutable=["intermediates"])
    return np.asarray(state["intermediates"]["ln_final"]["__call__"][0])


def pooled(model, params, tokens):
    return np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))


def random_tokens(rng, b, t=LENGTH):
    return rng.integers(1, VOCAB, (b, t)).astype(np.int32)  # no padding


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def atol(want):
    """Two float32 evaluations of the tower's outputs whose sums are blocked differently (other padding or
    masked tokens, the last block on all tokens or on the pooled one): MLP 64 is the longest reduction, 2
    blocks + the embedding the depth (tolerances.network_atol); ~2e-5 of the outputs, which are O(1)."""
    return tolerances.network_atol(64, float(np.max(np.abs(want))), 3)


@pytest.mark.parametrize("causal", [True, False])
def test_later_tokens_reach_earlier_outputs_only_when_bidirectional(causal):
    rng = np.random.default_rng(0)
    model = tower(causal=causal)
    params = init(model)
    a = random_tokens(rng, 4)
    b = a.copy()
    b[:, 4:] = random_tokens(rng, 4, LENGTH - 4)  # same first four tokens, different later ones
    assert (a[:, 4:] != b[:, 4:]).any(axis=1).all()
    out_a, out_b = token_outputs(model, params, a), token_outputs(model, params, b)
    assert max_diff(out_a[:, 4:], out_b[:, 4:]) > 1e-2  # the changed tokens themselves always differ
    if causal:  # a later token leaking in moves the outputs by O(0.1) (the bidirectional branch: > 1e-3)
        np.testing.assert_allclose(out_a[:, :4], out_b[:, :4], rtol=0, atol=atol(out_b[:, :4]))
    else:
        for i in range(4):
            assert max_diff(out_a[i, :4], out_b[i, :4]) > 1e-3, i


@pytest.mark.parametrize("pooled_last_block", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_causal_eot_embedding_does_not_depend_on_later_tokens(causal, pooled_last_block):
    """A text ending at position 4 pools, under a causal mask, what position 4 of any longer text gives."""
    rng = np.random.default_rng(1)
    model = tower(causal=causal, pooled_last_block=pooled_last_block)
    params = init(model)
    longer = random_tokens(rng, 4)
    prefix = longer.copy()
    prefix[:, 5:] = 0  # the same text, ending (EOT) at position 4, then padding
    at_four = token_outputs(model, params, longer)[:, 4]
    got = pooled(model, params, prefix)
    if causal:
        np.testing.assert_allclose(got, at_four, rtol=0, atol=atol(at_four))
    else:
        for i in range(4):
            assert max_diff(got[i], at_four[i]) > 1e-3, i


@pytest.mark.parametrize("pooled_last_block", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_eot_pooling_reads_the_last_token_before_the_padding(causal, pooled_last_block):
    rng = np.random.default_rng(2)
    model = tower(causal=causal, pooled_last_block=pooled_last_block)
    params = init(model)
    tokens = random_tokens(rng, 5)
    lengths = np.array([1, 3, 5, LENGTH, 6])
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    tokens[4, 2] = 0  # id 0 inside a text (CLIP's BPE gives it to '!', e.g. in '!~') is a token, not padding
    outs = token_outputs(model, params, tokens)
    got = pooled(model, params, tokens)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(got[row], outs[row, n - 1], rtol=0, atol=atol(outs), err_msg=f"row {row}")
        for other in range(LENGTH):
            if other != n - 1:
                assert max_diff(got[row], outs[row, other]) > 1e-3, (row, other)


@pytest.mark.parametrize("causal", [True, False])
def test_mean_pooling_averages_the_text_and_ignores_the_padding(causal):
    rng = np.random.default_rng(3)
    model = tower(causal=causal, pooling="mean")
    params = init(model)
    tokens = random_tokens(rng, 4)
    lengths = np.array([2, 5, LENGTH, 6])
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    tokens[3, 1] = 0  # inside the text: counted
    outs = token_outputs(model, params, tokens)
    got = pooled(model, params, tokens)
    for row, n in enumerate(lengths):
        # The token outputs' own tolerance, plus the float32 mean of n <= 8 of them (gamma(8) of their size).
        tol = atol(outs) + tolerances.gamma(LENGTH) * float(np.max(np.abs(outs)))
        np.testing.assert_allclose(got[row], outs[row, :n].mean(axis=0), rtol=0, atol=tol, err_msg=f"row {row}")
    # Less padding (a shorter row) gives the same embedding: the padding is neither attended to nor averaged.
    np.testing.assert_allclose(pooled(model, params, tokens[:2, :5]), got[:2], rtol=0, atol=atol(got[:2]))
