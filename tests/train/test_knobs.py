"""Every loss knob reaches the trainer: one real train step with a non-default value logs the loss (and the
gradient norm) that an independent computation with that value gives, and not the default's.

Knobs: objective weights, ``clip_reg.reg_weight``, ``swap.temperature`` / ``epsilon`` / ``sinkhorn_iters``
and ``clip.chunk_size``. The references are float64 NumPy (``open_clip_reference``, ``swav_reference``)
for the values and short ``jax.numpy`` transcriptions differentiated by ``jax.grad`` for the gradient
norm; none of them calls the objectives under test.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clus_jax.train.experiment import build
from clus_jax.objectives import prototypes

import open_clip_reference as oc  # registered by tests/conftest.py
import swav_reference as swav
import tolerances
import train_helpers as helpers
from train_helpers import recording  # noqa: F401 (a pytest fixture)

BATCH, DIM = 16, 32  # the tiny config's batch and embedding width

# Loss tolerances: the step's float32 loss against float64 from host_outputs' float32 embeddings. The helpers
# bound two float32 evaluations (tests/tolerances.py); one side is float64 here, and the other half covers the
# step's embeddings differing from host_outputs' (the same forward ops, compiled into another program) by up
# to DIM / 2 ulps each: s * 2 * 16 u in a logit, times the loss's total logit sensitivity (2 for CLIP, B for
# SigLIP), within the remaining half.


def clip_atol(loss, scale):
    return tolerances.logit_loss_atol(abs(loss), BATCH, DIM, float(scale))


def siglip_atol(loss, scale):
    return tolerances.logit_loss_atol(abs(loss), BATCH, DIM, float(scale), weight_sum=BATCH, n_terms=BATCH**2)


def pair_l2_atol(pair_l2):
    """mean over B rows of DIM-term sums of squared differences: gamma(DIM + B) and 3 roundings per term (the
    difference, the square, the division), twice (see above)."""
    return 2 * (tolerances.gamma(DIM + BATCH) + 3 * tolerances.U32) * abs(pair_l2)


def swap_bank_atol(img, txt, bank, loss, temperature, epsilon, sinkhorn_iters):
    """One bank's swapped-prediction loss: tests/tolerances.py swap_loss_bounds with the Sinkhorn codes' error
    (sinkhorn_codes_rtol) of the worse modality, twice (see above)."""
    scores = [img @ bank.T, txt @ bank.T]
    codes = max(tolerances.sinkhorn_codes_rtol(s, epsilon, sinkhorn_iters) for s in scores)
    max_score = max(float(np.abs(s).max()) for s in scores)
    return 2 * tolerances.swap_loss_bounds(BATCH, bank.shape[0], temperature, max_score, loss, codes)[0]


def knob_config(objective="clip", **overrides):
    """The tiny config on one device, with a small vocabulary (the batches are random token ids)."""
    return helpers.tiny_config(objective, **{"mesh.data": 1, "model.text.vocab_size": 64, **overrides})


class OneStep:
    """Builds ``config``, keeps a host copy of the initial state and runs one step on a fixed batch."""

    def __init__(self, config):
        self.config = config
        self.exp = build(config, jax.devices()[:1])
        state = self.exp.init_state()
        self.before = jax.device_get(state)
        self.batch = helpers.random_batches(config, 1, seed=3)[0]
        after, metrics = self.exp.step(state, self.exp.global_batch(self.batch))
        self.after = jax.device_get(after)
        self.metrics = {k: float(v) for k, v in metrics.items()}

    def prepared_params(self):
        """The parameters the step differentiates at: the initial ones after every ``prepare_params``."""
        params = self.before["params"]
        for obj, _ in self.exp.objectives.values():
            params = obj.prepare_params(params, self.config)
        return jax.device_get(params)

    def outputs(self, params):
        """The towers' outputs for the batch (traceable, so ``jax.grad`` can go through it)."""
        return self.exp.model.apply({"params": self.exp.model_params(params)},
                                    jnp.asarray(self.batch["image"]), jnp.asarray(self.batch["text"]))

    def host_outputs(self):
        out = jax.jit(self.outputs)(self.prepared_params())
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    def grad_norm(self, loss_of_params):
        """||d loss / d params|| at the prepared parameters, for an independent ``loss_of_params``."""
        return helpers.global_norm(self.grads(loss_of_params))

    def grads(self, loss_of_params):
        return jax.device_get(jax.jit(jax.grad(loss_of_params))(self.prepared_params()))

    def assert_grad_norm(self, loss_of_params, extra_rtol=0.0):
        """The logged gradient norm against an independent transcription's: two float32 evaluations of the
        whole network's gradient (train_helpers.grad_norm_atol: each entry within ~3e-4 of its leaf's largest),
        and ``extra_rtol`` for what the network estimate does not cover (Sinkhorn codes). Returns the
        transcription's norm and the tolerance."""
        grads = self.grads(loss_of_params)
        want = helpers.global_norm(grads)
        atol = helpers.grad_norm_atol(grads) + extra_rtol * want
        np.testing.assert_allclose(self.metrics["grad_norm"], want, rtol=0, atol=atol)
        return want, atol


# -- independent jax.numpy transcriptions of the losses (for the gradient norm only) ----------------------


def clip_jnp(img, txt, scale):
    logits = scale * img @ txt.T
    labels = jnp.arange(img.shape[0])
    i2t = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[labels, labels])
    t2i = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[labels, labels])
    return (i2t + t2i) / 2


def siglip_jnp(img, txt, scale, bias):
    z = scale * img @ txt.T + bias
    labels = 2 * jnp.eye(img.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * z)) / img.shape[0]


def sinkhorn_jnp(scores, epsilon, num_iters):
    q = jnp.exp(scores / epsilon).T
    k, b = q.shape
    q = q / jnp.sum(q)
    for _ in range(num_iters):
        q = q / jnp.sum(q, axis=1, keepdims=True) / k
        q = q / jnp.sum(q, axis=0, keepdims=True) / b
    return (q * b).T


def swap_jnp(img, txt, banks, temperature, epsilon, num_iters):
    losses = []
    for bank in banks:
        s_img, s_txt = img @ bank.T, txt @ bank.T
        q_img = jax.lax.stop_gradient(sinkhorn_jnp(s_img, epsilon, num_iters))
        q_txt = jax.lax.stop_gradient(sinkhorn_jnp(s_txt, epsilon, num_iters))
        ce = lambda q, s: -jnp.mean(jnp.sum(q * jax.nn.log_softmax(s / temperature, axis=1), axis=1))
        losses.append(0.5 * (ce(q_img, s_txt) + ce(q_txt, s_img)))
    return sum(losses) / len(losses)


def swap_numpy(img, txt, banks, temperature, epsilon, sinkhorn_iters):
    """Mean over banks of SwAV's two-view loss with image and text as the views (float64)."""
    values = [swav.swav_loss_numpy(img @ b.T, txt @ b.T, temperature, epsilon, sinkhorn_iters)[0] for b in banks]
    return float(np.mean(values))


def assert_differs(value, other, atol, what):
    """The default knob's reference is more than 2 atol from the knob's own (``value`` is within atol of that),
    so a step that used the default would fail the comparison."""
    assert abs(value - other) > 3 * atol, f"{what}: {value} is too close to {other} to tell them apart"


# -- objective weights ------------------------------------------------------------------------------------


@pytest.mark.slow  # three objectives' steps compiled twice
def test_objective_weights():
    config = knob_config("siglip")
    config.objectives = {"clip": 1.5, "siglip": 0.3}
    run = OneStep(config)
    out = run.host_outputs()
    clip = oc.clip_loss_numpy(out["image_emb"], out["text_emb"], out["logit_scale"])
    siglip = oc.siglip_loss_numpy(out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"])
    clip_tol, siglip_tol = clip_atol(clip, out["logit_scale"]), siglip_atol(siglip, out["logit_scale"])
    np.testing.assert_allclose(run.metrics["clip/loss"], clip, rtol=0, atol=clip_tol)
    np.testing.assert_allclose(run.metrics["siglip/loss"], siglip, rtol=0, atol=siglip_tol)
    want = 1.5 * clip + 0.3 * siglip
    atol = 1.5 * clip_tol + 0.3 * siglip_tol + 4 * tolerances.U32 * abs(want)  # the weighted sum's roundings
    np.testing.assert_allclose(run.metrics["loss"], want, rtol=0, atol=atol)
    assert_differs(run.metrics["loss"], clip + siglip, atol, "weights 1, 1")
    assert_differs(run.metrics["loss"], clip + 0.3 * siglip, atol, "clip weight 1")
    assert_differs(run.metrics["loss"], 1.5 * clip + siglip, atol, "siglip weight 1")

    # The weights reach the gradient too, not only the logged sum.
    def weighted(params, w_clip, w_siglip):
        o = run.outputs(params)
        return (w_clip * clip_jnp(o["image_emb"], o["text_emb"], o["logit_scale"])
                + w_siglip * siglip_jnp(o["image_emb"], o["text_emb"], o["logit_scale"], o["logit_bias"]))

    _, atol = run.assert_grad_norm(lambda p: weighted(p, 1.5, 0.3))
    assert_differs(run.metrics["grad_norm"], run.grad_norm(lambda p: weighted(p, 1.0, 1.0)), atol,
                   "gradient of weights 1, 1")


# -- clip_reg.reg_weight ----------------------------------------------------------------------------------


def test_clip_reg_weight():
    weight = 0.7
    assert weight != helpers.tiny_config("clip_reg").clip_reg.reg_weight
    run = OneStep(knob_config("clip_reg", **{"clip_reg.reg_weight": weight}))
    out = run.host_outputs()
    clip = oc.clip_loss_numpy(out["image_emb"], out["text_emb"], out["logit_scale"])
    pair_l2 = np.mean(np.sum(np.square(out["image_emb"] - out["text_emb"]), axis=1))
    clip_tol, pair_tol = clip_atol(clip, out["logit_scale"]), pair_l2_atol(pair_l2)
    np.testing.assert_allclose(run.metrics["clip_reg/clip"], clip, rtol=0, atol=clip_tol)
    np.testing.assert_allclose(run.metrics["clip_reg/pair_l2"], pair_l2, rtol=0, atol=pair_tol)
    want = clip + weight * pair_l2
    atol = clip_tol + weight * pair_tol + 4 * tolerances.U32 * abs(want)
    np.testing.assert_allclose(run.metrics["loss"], want, rtol=0, atol=atol)
    assert_differs(run.metrics["loss"], clip + 0.1 * pair_l2, atol, "the default reg_weight 0.1")

    def loss(params, w):
        o = run.outputs(params)
        img, txt = o["image_emb"], o["text_emb"]
        return clip_jnp(img, txt, o["logit_scale"]) + w * jnp.mean(jnp.sum(jnp.square(img - txt), axis=1))

    _, atol = run.assert_grad_norm(lambda p: loss(p, weight))
    assert_differs(run.metrics["grad_norm"], run.grad_norm(lambda p: loss(p, 0.1)), atol, "gradient of reg_weight 0.1")


# -- swap.temperature / epsilon / sinkhorn_iters ----------------------------------------------------------

SWAP_KNOBS = {"temperature": 0.25, "epsilon": 0.1, "sinkhorn_iters": 5}


def test_swap_temperature_epsilon_and_iterations():
    """All three at non-default values in one run; replacing any one by its default changes the reference."""
    defaults = helpers.tiny_config("clip").swap
    assert all(SWAP_KNOBS[k] != defaults[k] for k in SWAP_KNOBS)
    config = knob_config("clip", **{"swap.num_prototypes": (12, 6), **{f"swap.{k}": v for k, v in SWAP_KNOBS.items()}})
    config.objectives = {"swap": 1.0}
    run = OneStep(config)
    out = run.host_outputs()
    banks = [np.asarray(b, np.float64) for b in run.prepared_params()[prototypes.PARAMS_KEY].values()]
    # the step scores unit rows (float32 x / ||x||, tests/tolerances.py)
    np.testing.assert_allclose(np.linalg.norm(banks[0], axis=1), 1.0, rtol=tolerances.unit_rows_relative_error(DIM))
    img, txt = out["image_emb"], out["text_emb"]

    def reference(**knobs):
        return swap_numpy(img, txt, banks, **{**SWAP_KNOBS, **knobs})

    want = reference()
    bank_atols = []
    for i, bank in enumerate(banks):
        one = swav.swav_loss_numpy(img @ bank.T, txt @ bank.T, SWAP_KNOBS["temperature"], SWAP_KNOBS["epsilon"],
                                   SWAP_KNOBS["sinkhorn_iters"])[0]
        bank_atols.append(swap_bank_atol(img, txt, bank, one, **SWAP_KNOBS))
        np.testing.assert_allclose(run.metrics[f"swap/bank_{i}/loss"], one, rtol=0, atol=bank_atols[-1])
    atol = float(np.mean(bank_atols)) + 2 * tolerances.U32 * abs(want)  # the mean over banks
    np.testing.assert_allclose(run.metrics["swap/loss"], want, rtol=0, atol=atol)
    np.testing.assert_allclose(run.metrics["loss"], want, rtol=0, atol=atol)
    for knob in SWAP_KNOBS:
        assert_differs(run.metrics["swap/loss"], reference(**{knob: defaults[knob]}), atol, f"the default {knob}")

    jnp_banks = lambda p: [p[prototypes.PARAMS_KEY][name] for name in prototypes.bank_names(len(banks))]
    # Beyond the network estimate: each evaluation's Sinkhorn codes (the targets) are off by codes_rtol, which
    # the gradient (p - q) / T carries at most in proportion (an estimate).
    codes_rtol = max(tolerances.sinkhorn_codes_rtol(e @ b.T, SWAP_KNOBS["epsilon"], SWAP_KNOBS["sinkhorn_iters"])
                     for e in (img, txt) for b in banks)
    knob_values = (SWAP_KNOBS["temperature"], SWAP_KNOBS["epsilon"], SWAP_KNOBS["sinkhorn_iters"])
    run.assert_grad_norm(lambda p: swap_jnp(run.outputs(p)["image_emb"], run.outputs(p)["text_emb"], jnp_banks(p),
                                            *knob_values), extra_rtol=2 * codes_rtol)


# -- clip.chunk_size --------------------------------------------------------------------------------------


def lowered_text(exp):
    return exp.step.jitted.lower(exp.abstract_state, exp.abstract_batch()).as_text()


def test_clip_chunk_size(recording):
    """A chunked step equals the unchunked one, and its program holds [B, chunk] logits, never [B, B]."""
    b, chunk = 16, 4
    # Adam's eps bounds how far it moves gradients' last bits (train_helpers.ADAM_EPS).
    plain = OneStep(knob_config("clip", **{"optim.eps": helpers.ADAM_EPS}))
    chunked = OneStep(knob_config("clip", **{"clip.chunk_size": chunk, "optim.eps": helpers.ADAM_EPS}))
    out = plain.host_outputs()
    want = oc.clip_loss_numpy(out["image_emb"], out["text_emb"], out["logit_scale"])
    np.testing.assert_allclose(chunked.metrics["loss"], want, rtol=0, atol=clip_atol(want, out["logit_scale"]))
    # Two float32 steps whose loss sums in another order (and whose programs differ): the loss within twice
    # logit_loss_atol (two orders, and the embeddings' last bits as above), the gradients, their norm and one
    # Adam step within the network estimates of train_helpers.
    for key in ("loss", "clip/loss"):
        atol = 2 * clip_atol(plain.metrics[key], out["logit_scale"])
        np.testing.assert_allclose(chunked.metrics[key], plain.metrics[key], rtol=0, atol=atol, err_msg=key)
    grads = plain.after["opt_state"][0].grads
    np.testing.assert_allclose(chunked.metrics["grad_norm"], plain.metrics["grad_norm"], rtol=0,
                               atol=helpers.grad_norm_atol(grads))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(chunked.after["opt_state"][0].grads),
                            jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=helpers.grad_atol(w), err_msg=f"grad{jax.tree_util.keystr(path)}")
    params_atol = helpers.updated_params_atol(grads, plain.after["params"], plain.config.optim)
    for (path, a), c, atol in zip(jax.tree_util.tree_leaves_with_path(chunked.after["params"]),
                                  jax.tree.leaves(plain.after["params"]), params_atol):
        helpers.assert_within(a, c, atol, err_msg=jax.tree_util.keystr(path))

    def has(text, rows, cols):
        return re.search(rf"tensor<{rows}x{cols}xf32>", text) is not None

    plain_text, chunked_text = lowered_text(plain.exp), lowered_text(chunked.exp)
    assert has(plain_text, b, b) and not has(plain_text, b, chunk)
    assert has(chunked_text, b, chunk), "no [B, chunk] logits: the chunked path did not run"
    assert not has(chunked_text, b, b), "a [B, B] logit matrix is still built"
    assert "stablehlo.while" in chunked_text  # the scan over key chunks
