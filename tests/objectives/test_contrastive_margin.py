"""CLIP+Reg's margin (Chen et al. 2024): per pair, the positive score minus the largest negative of the global
batch, image->text and text->image, against an independent float64 NumPy computation; the same on a sharded
and a chunked batch; and the train step's loss, gradient and parameters bit for bit what they are without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py
import train_helpers as helpers
from jax.sharding import Mesh, PartitionSpec as P

from clus_jax.objectives import contrastive
from clus_jax.objectives.contrastive import MARGIN_QUANTILES, margin_metrics, pair_margins
from clus_jax.train.experiment import build

U = tolerances.U32
NAMES = ["min", *(f"p{q}" for q in range(10, 100, 10)), "max"]  # the logged quantiles: min, deciles, max
FRACTIONS = np.linspace(0.0, 1.0, 11)


def normalised(rng, b, d):
    x = rng.normal(size=(b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def margins_numpy(img, txt):
    """float64: scores S = img @ txt^T; i2t row i: S_ii - max_{j != i} S_ij; t2i column i: S_ii - max_{j != i} S_ji."""
    s = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    negatives = np.where(np.eye(len(s), dtype=bool), -np.inf, s)
    return {"i2t": np.diag(s) - negatives.max(axis=1), "t2i": np.diag(s) - negatives.max(axis=0)}


def margin_atol(d):
    """One float32 margin of unit rows against the exact one: two dot products of d terms, each within gamma(d)
    (|<x, y>| <= 1), and the difference's rounding (|margin| <= 2)."""
    return 2 * tolerances.gamma(d) + 2 * U


def test_margins_match_numpy():
    rng = np.random.default_rng(0)
    img, txt = normalised(rng, 16, 8), normalised(rng, 16, 8)
    got, want = pair_margins(jnp.float32(img), jnp.float32(txt)), margins_numpy(np.float32(img), np.float32(txt))
    for direction in ("i2t", "t2i"):
        np.testing.assert_allclose(got[direction], want[direction], rtol=0, atol=margin_atol(8), err_msg=direction)
    # The two directions differ (S is not symmetric), and some pairs are violated at random init.
    assert np.abs(want["i2t"] - want["t2i"]).max() > 0.1 and (want["i2t"] < 0).any()


def test_margins_hand_computed():
    """S = img @ txt^T = [[1, 0.8], [0, 0.6]]: i2t rows [1 - 0.8, 0.6 - 0], t2i columns [1 - 0, 0.6 - 0.8]
    (pair 1 is violated from the text side: image 0 scores higher with text 1 than image 1 does)."""
    img = jnp.float32([[1.0, 0.0], [0.0, 1.0]])
    txt = jnp.float32([[1.0, 0.0], [0.8, 0.6]])
    got = pair_margins(img, txt)
    np.testing.assert_allclose(got["i2t"], [1.0 - 0.8, 0.6 - 0.0], rtol=0, atol=4 * U)
    np.testing.assert_allclose(got["t2i"], [1.0 - 0.0, 0.6 - 0.8], rtol=0, atol=4 * U)


def test_margin_metrics_are_the_numpy_quantiles_and_mean():
    rng = np.random.default_rng(1)
    m = {"i2t": rng.normal(size=37).astype(np.float32), "t2i": rng.normal(size=37).astype(np.float32)}
    got = {k: float(v) for k, v in margin_metrics({k: jnp.asarray(v) for k, v in m.items()}).items()}
    assert set(got) == {f"margin/{d}/{q}" for d in m for q in (*NAMES, "mean")}
    assert list(MARGIN_QUANTILES) == NAMES
    for d, values in m.items():
        want = np.quantile(values.astype(np.float64), FRACTIONS)
        # Linear interpolation between two float32 neighbours (|v| < 4): a few roundings of their size.
        np.testing.assert_allclose([got[f"margin/{d}/{q}"] for q in NAMES], want, rtol=0, atol=16 * U)
        assert got[f"margin/{d}/min"] == values.min() and got[f"margin/{d}/max"] == values.max()
        np.testing.assert_allclose(got[f"margin/{d}/mean"], values.astype(np.float64).mean(), rtol=0,
                                   atol=tolerances.gamma(37) * np.abs(values).max() + 2 * U)


MESHES = [((8, 1, 1), ("data",)), ((4, 2, 1), ("data", "fsdp")), ((2, 2, 2), ("data", "fsdp"))]


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("shape,axes", MESHES)
def test_sharded_and_chunked_margins_equal_one_device(shape, axes, chunk):
    """Each device's rows against the gathered other side, in chunks of 3 keys or all at once: the margins of
    the global batch, in batch order, as on one device and as in NumPy."""
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(3)
    img, txt = jnp.float32(normalised(rng, 32, 16)), jnp.float32(normalised(rng, 32, 16))
    fn = jax.jit(jax.shard_map(lambda a, b: pair_margins(a, b, axis_name=axes, chunk_size=chunk), mesh=mesh,
                               in_specs=(P(axes), P(axes)), out_specs=P(axes)))
    sharded, single, want = fn(img, txt), pair_margins(img, txt), margins_numpy(img, txt)
    for d in ("i2t", "t2i"):
        # Two float32 evaluations, each within margin_atol of the exact value.
        np.testing.assert_allclose(sharded[d], single[d], rtol=0, atol=2 * margin_atol(16), err_msg=d)
        np.testing.assert_allclose(sharded[d], want[d], rtol=0, atol=margin_atol(16), err_msg=d)


def _one_step(config, monkeypatch, with_margins: bool):
    if not with_margins:
        monkeypatch.setattr(contrastive, "margin_metrics", lambda margins: {})
    exp = build(config, jax.devices()[:config.mesh.data * config.mesh.fsdp])
    batch = helpers.random_batches(config, 1, seed=3)[0]
    state = exp.init_state()
    params = jax.device_get(state["params"])
    after, metrics = exp.step(state, exp.global_batch(batch))
    monkeypatch.undo()
    return exp, batch, params, jax.device_get(after), {k: np.asarray(v) for k, v in metrics.items()}


# One device in the fast tier; the batch split over 4 x 2 devices (two more compilations) in the slow one.
@pytest.mark.parametrize("data,fsdp", [(1, 1), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_margin_logging_leaves_the_train_step_bit_for_bit(data, fsdp, monkeypatch):
    """One step of the tiny CLIP+Reg config with and without the margin metrics: the loss, every other metric
    and the updated parameters are identical to the bit. The logged quantiles are those of the step's own
    embeddings."""
    config = helpers.tiny_config("clip_reg", **{"mesh.data": data, "mesh.fsdp": fsdp, "model.text.vocab_size": 64})
    exp, batch, params, after, metrics = _one_step(config, monkeypatch, with_margins=True)
    _, _, _, after_without, metrics_without = _one_step(config, monkeypatch, with_margins=False)
    assert {k for k in metrics if "margin" in k} == {f"clip_reg/margin/{d}/{q}" for d in ("i2t", "t2i")
                                                     for q in (*NAMES, "mean")}
    assert not any("margin" in k for k in metrics_without)
    for k, v in metrics_without.items():
        assert v.tobytes() == metrics[k].tobytes(), k
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(after_without)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)

    # The step's embeddings, recomputed outside it: the same ops compiled into another program, within DIM / 2
    # ulps per coordinate (tests/train/test_knobs.py), so within 2 * 16 u of each unit-row score.
    out = jax.jit(lambda p: exp.model.apply({"params": exp.model_params(p)}, jnp.asarray(batch["image"]),
                                            jnp.asarray(batch["text"])))(params)
    want = margins_numpy(out["image_emb"], out["text_emb"])
    atol = margin_atol(32) + 4 * 16 * U
    for d in ("i2t", "t2i"):
        quantiles = np.quantile(want[d], FRACTIONS)
        got = [float(metrics[f"clip_reg/margin/{d}/{q}"]) for q in NAMES]
        np.testing.assert_allclose(got, quantiles, rtol=0, atol=atol, err_msg=d)
        np.testing.assert_allclose(metrics[f"clip_reg/margin/{d}/mean"], want[d].mean(), rtol=0, atol=atol)
