"""The 'swap' objective (Clus): its own prototype banks, loss against float64 NumPy, prototype rewrite and
freeze, queue, teachers, sharded training equal to one device, and checkpoints."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clus_jax.config import base as config_base
from clus_jax.config import check as config_check
from clus_jax.train.experiment import build
from clus_jax.objectives import prototypes, registry, teachers
from clus_jax.objectives.registry import ConfigError, LossContext
from clus_jax.parallel import mesh as mesh_lib
from clus_jax.parallel import partitioning
from clus_jax.train.checkpoint import Checkpointer
from clus_jax.train.step import make_apply_model

import tolerances  # registered by tests/conftest.py
import train_helpers as helpers  # registered by tests/conftest.py
from swav_reference import log_softmax_numpy as log_softmax_np
from swav_reference import swav_sinkhorn_numpy as swav_sinkhorn_np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------------------
# Float64 NumPy reference: SwAV's distributed_sinkhorn (world size 1) and the cross-modal swapped loss.
# ----------------------------------------------------------------------------------------------------


def ce_np(codes, scores, temperature):
    return -np.mean(np.sum(codes * log_softmax_np(scores / temperature), axis=1))


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def swap_loss_np(image, text, banks, *, temperature=0.1, epsilon=0.05, num_iters=3, within=0.0,
                 code_rows=None, code_banks=None, queues=None):
    """Mean over banks of 1/2 [CE(q_text, s_image) + CE(q_image, s_text)] + within * 1/2 [CE(q_i, s_i) + CE(q_t, s_t)].

    Codes: Sinkhorn of the code rows (student embeddings, or a teacher's) scored on the code banks
    (the student's, or a teacher's), with queue rows prepended and only the current batch kept.
    """
    student = {"image": np.asarray(image, np.float64), "text": np.asarray(text, np.float64)}
    code_rows = student if code_rows is None else {m: np.asarray(v, np.float64) for m, v in code_rows.items()}
    total, per_bank = 0.0, []
    for i, bank in enumerate(banks):
        bank = unit(bank)
        code_bank = bank if code_banks is None else unit(code_banks[i])
        scores = {m: student[m] @ bank.T for m in student}
        codes = {}
        for m in student:
            rows = code_rows[m] if queues is None else np.concatenate([queues[m], code_rows[m]])
            codes[m] = swav_sinkhorn_np(rows @ code_bank.T, epsilon, num_iters)[-len(student[m]):]
        cross = 0.5 * (ce_np(codes["text"], scores["image"], temperature) + ce_np(codes["image"], scores["text"], temperature))
        inner = 0.5 * (ce_np(codes["image"], scores["image"], temperature) + ce_np(codes["text"], scores["text"], temperature))
        loss = cross + within * inner
        entropy = np.mean([-np.mean(np.sum(q * np.log(q), axis=1)) for q in codes.values()])
        used = {m: len(np.unique(np.argmax(q, axis=1))) for m, q in codes.items()}
        per_bank.append(dict(loss=loss, cross=cross, within=inner, entropy=entropy, used=used, codes=codes))
        total += loss
    return total / len(banks), per_bank


U, DIM = tolerances.U32, 32
# Scores of float32 unit rows (norms within u of 1) against prototypes normalised in float32: gamma(D), the
# prototypes' unit_rows_relative_error(D) and the rows' u; |s| <= 1 + u.
SCORE_ATOL = tolerances.gamma(DIM) + tolerances.unit_rows_relative_error(DIM) + 2 * U


def pair_atol(value, batch, protos, code_rows=None, temperature=0.1, epsilon=0.05, num_iters=3):
    """One float32 evaluation of a half-sum of two CEs (the cross-modal or the within-modality term) against
    its float64 value: tolerances.swap_loss_bounds, with codes of ``code_rows`` rows (the batch, or with the
    queue's) off by sinkhorn_log_atol."""
    log_atol = tolerances.sinkhorn_log_atol(code_rows or batch, protos, num_iters, epsilon, 1 + U, SCORE_ATOL)
    codes = float(np.expm1(log_atol))
    return tolerances.swap_loss_bounds(batch, protos, temperature, 1 + U, value, codes, SCORE_ATOL)[0], codes


def bank_atols(ref, batch, within=0.0, code_rows=None):
    """Per bank of swap_loss_np: 'cross', 'within' (pair_atol), 'loss' (cross + within x within-modality, and
    two roundings), 'entropy' (the codes' relative error weights |log q| + 1, summing to H + 1 per row; the
    sums add gamma of H)."""
    protos = ref["codes"]["image"].shape[1]
    cross, codes = pair_atol(ref["cross"], batch, protos, code_rows)
    inner, _ = pair_atol(ref["within"], batch, protos, code_rows)
    h = ref["entropy"]
    entropy = codes * (h + 1) + (tolerances.gamma(protos) + tolerances.gamma(batch) + 4 * U) * h
    return dict(cross=cross, within=inner, loss=cross + within * inner + 2 * U * ref["loss"], entropy=entropy)


def loss_atol(per_bank, batch, within=0.0, code_rows=None):
    """The objective's value, the mean of the banks' losses: their bounds' mean, and the mean's rounding."""
    banks = [bank_atols(ref, batch, within, code_rows) for ref in per_bank]
    return float(np.mean([b["loss"] for b in banks])) + 2 * U * max(ref["loss"] for ref in per_bank)


# ----------------------------------------------------------------------------------------------------
# The objective on given embeddings (no towers): a LossContext built by hand, run under jit on a mesh.
# ----------------------------------------------------------------------------------------------------

SWAP = registry.get("swap")


def swap_config(**overrides):
    c = helpers.tiny_config("clip", **{"swap.num_prototypes": (12, 6), **overrides})
    c.objectives = {"clip": 1.0, "swap": 0.5}
    return c


def run_objective(config, mesh_shape, outputs, params, state, *, step=0, apply_model=None):
    devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    mesh = mesh_lib.create_mesh(mesh_shape, devices)
    rules = [tuple(r) for r in config.logical_axis_rules]
    batch_axes = partitioning.batch_axes(mesh, rules)

    def fn(outputs, params, state):
        params = SWAP.prepare_params(params, config)
        ctx = LossContext(outputs=outputs, params=params, state=state, step=jnp.int32(step), rng=jax.random.key(0),
                          batch={}, apply_model=apply_model, mesh=mesh, batch_axes=batch_axes, config=config)
        return SWAP.loss(ctx)

    with jax.set_mesh(mesh):
        loss, metrics, new_state = jax.jit(fn)(outputs, params, state)
    return float(loss), {k: float(v) for k, v in metrics.items()}, jax.device_get(new_state)


def sphere(rng, *shape):
    return unit(rng.normal(size=shape)).astype(np.float32)


def paired_embeddings(rng, batch, dim=32, noise=0.6):
    base = rng.normal(size=(batch, dim))
    return (unit(base + noise * rng.normal(size=base.shape)).astype(np.float32),
            unit(base + noise * rng.normal(size=base.shape)).astype(np.float32))


def scaled_banks(rng, sizes, dim=32):
    """Prototype banks whose rows are NOT unit length: the objective must re-normalise them."""
    return {f"bank_{i}": (sphere(rng, k, dim) * rng.uniform(0.5, 2.0, (k, 1))).astype(np.float32) for i, k in enumerate(sizes)}


MESHES_1 = [dict(data=1, fsdp=1, tensor=1), dict(data=2, fsdp=1, tensor=4), dict(data=4, fsdp=2, tensor=1)]


@pytest.mark.parametrize("mesh_shape", MESHES_1, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_loss_and_metrics_match_numpy(mesh_shape):
    rng = np.random.default_rng(0)
    config = swap_config(**{"swap.within_modality_weight": 0.3})
    image, text = paired_embeddings(rng, 16)
    banks = scaled_banks(rng, (12, 6))  # 12 splits over tensor=4, 6 does not (stays replicated)
    loss, metrics, new_state = run_objective(config, mesh_shape, {"image_emb": image, "text_emb": text},
                                             {prototypes.PARAMS_KEY: banks}, {})
    want, per_bank = swap_loss_np(image, text, list(banks.values()), within=0.3)
    np.testing.assert_allclose(loss, want, rtol=0, atol=loss_atol(per_bank, 16, 0.3))
    for i, ref in enumerate(per_bank):
        atol = bank_atols(ref, 16, 0.3)
        assert atol["loss"] < 0.01 * ref["loss"]  # a term dropped, or the codes of the wrong modality, move it by more
        np.testing.assert_allclose(metrics[f"bank_{i}/loss"], ref["loss"], rtol=0, atol=atol["loss"])
        np.testing.assert_allclose(metrics[f"bank_{i}/cross_modal"], ref["cross"], rtol=0, atol=atol["cross"])
        np.testing.assert_allclose(metrics[f"bank_{i}/within_modality"], ref["within"], rtol=0, atol=atol["within"])
        np.testing.assert_allclose(metrics[f"bank_{i}/code_entropy"], ref["entropy"], rtol=0, atol=atol["entropy"])
        assert metrics[f"bank_{i}/used_clusters_image"] == ref["used"]["image"]
        assert metrics[f"bank_{i}/used_clusters_text"] == ref["used"]["text"]
    assert new_state == {}


def test_cross_modal_direction_and_within_knob():
    """Text codes supervise image predictions (not image codes): swapping the pairing changes the value."""
    rng = np.random.default_rng(1)
    image, text = paired_embeddings(rng, 16, noise=1.0)
    banks = scaled_banks(rng, (12,))
    loss, _, _ = run_objective(swap_config(), MESHES_1[0], {"image_emb": image, "text_emb": text}, {prototypes.PARAMS_KEY: banks}, {})
    bank = unit(banks["bank_0"])
    q = {m: swav_sinkhorn_np(x @ bank.T, 0.05, 3) for m, x in (("image", image), ("text", text))}
    swapped = 0.5 * (ce_np(q["text"], image @ bank.T, 0.1) + ce_np(q["image"], text @ bank.T, 0.1))
    unswapped = 0.5 * (ce_np(q["image"], image @ bank.T, 0.1) + ce_np(q["text"], text @ bank.T, 0.1))
    swapped_atol, unswapped_atol = pair_atol(swapped, 16, 12)[0], pair_atol(unswapped, 16, 12)[0]
    np.testing.assert_allclose(loss, swapped, rtol=0, atol=swapped_atol)
    assert abs(swapped - unswapped) > max(1e-3, 2 * (swapped_atol + unswapped_atol))
    with_within, _, _ = run_objective(swap_config(**{"swap.within_modality_weight": 1.0}), MESHES_1[0],
                                      {"image_emb": image, "text_emb": text}, {prototypes.PARAMS_KEY: banks}, {})
    np.testing.assert_allclose(with_within, swapped + unswapped, rtol=0,
                               atol=swapped_atol + unswapped_atol + 2 * U * (swapped + unswapped))


def fake_apply(params, batch):
    """A 'model' whose outputs are its parameters: lets a test choose the teacher's embeddings."""
    del batch
    return {"image_emb": params["image_emb"], "text_emb": params["text_emb"]}


@pytest.mark.parametrize("teacher_prototypes", ["teacher", "student"])
def test_teacher_codes_are_the_targets(teacher_prototypes):
    """Teacher image codes supervise student text predictions and back; queue rows are scored like the teacher's."""
    rng = np.random.default_rng(2)
    config = swap_config(**{"swap.teacher": "ema", "swap.teacher_prototypes": teacher_prototypes, "swap.queue_length": 32})
    image, text = paired_embeddings(rng, 16)
    t_image, t_text = paired_embeddings(rng, 16)
    banks = scaled_banks(rng, (12, 6))
    teacher = {"towers": {"image_emb": t_image, "text_emb": t_text}}
    if teacher_prototypes == "teacher":
        teacher["banks"] = scaled_banks(rng, (12, 6))
    queue = {m: sphere(rng, 2, 16, 32) for m in ("image", "text")}
    outputs, params = {"image_emb": image, "text_emb": text}, {prototypes.PARAMS_KEY: banks}
    state = {"teacher": teacher, "queue": {**queue, "filled": np.int32(2)}}
    code_banks = list(teacher["banks"].values()) if teacher_prototypes == "teacher" else None
    want, per_bank = swap_loss_np(image, text, list(banks.values()), code_rows={"image": t_image, "text": t_text},
                                  code_banks=code_banks, queues={m: q.reshape(-1, 32) for m, q in queue.items()})
    atol = loss_atol(per_bank, 16, code_rows=16 + 32)  # the codes come from the queue's 32 rows and the batch
    for mesh_shape in MESHES_1[:2]:
        loss, _, new = run_objective(config, mesh_shape, outputs, params, state, apply_model=fake_apply)
        np.testing.assert_allclose(loss, want, rtol=0, atol=atol, err_msg=str(mesh_shape))
        # The queue keeps the rows the codes came from: the teacher's.
        np.testing.assert_array_equal(new["queue"]["image"][0], t_image)
        np.testing.assert_array_equal(new["queue"]["text"][1], queue["text"][0])
        assert new["teacher"].keys() == teacher.keys()
    # The student's own codes are not used ...
    own, _ = swap_loss_np(image, text, list(banks.values()), queues={m: q.reshape(-1, 32) for m, q in queue.items()})
    assert abs(own - want) > 1e-3
    # ... and a different teacher gives a different loss for the same student.
    other = {**state, "teacher": {**teacher, "towers": {**teacher["towers"], "image_emb": sphere(rng, 16, 32)}}}
    changed, _, _ = run_objective(config, MESHES_1[0], outputs, params, other, apply_model=fake_apply)
    assert abs(changed - loss) > 1e-3


def test_teacher_equal_to_student_gives_the_swav_loss():
    """With the teacher's towers and banks equal to the student's, EMA-teacher codes equal SwAV's own codes."""
    rng = np.random.default_rng(3)
    image, text = paired_embeddings(rng, 16)
    banks = scaled_banks(rng, (12, 6))
    outputs, params = {"image_emb": image, "text_emb": text}, {prototypes.PARAMS_KEY: banks}
    plain, _, _ = run_objective(swap_config(), MESHES_1[0], outputs, params, {})
    teacher = {"towers": {"image_emb": image, "text_emb": text}, "banks": banks}
    taught, _, _ = run_objective(swap_config(**{"swap.teacher": "ema"}), MESHES_1[0], outputs, params,
                                 {"teacher": teacher}, apply_model=fake_apply)
    # Two programs (the codes' scores from the teacher's inputs): two float32 evaluations, each within the bound.
    _, per_bank = swap_loss_np(image, text, list(banks.values()))
    np.testing.assert_allclose(taught, plain, rtol=0, atol=2 * loss_atol(per_bank, 16))


@pytest.mark.parametrize("mesh_shape", MESHES_1[:2], ids=["one_device", "data2_tensor4"])
def test_queue_rows_enter_the_codes_once_full(mesh_shape):
    rng = np.random.default_rng(4)
    batch, slots = 16, 3
    config = swap_config(**{"swap.queue_length": batch * slots, "swap.queue_start_step": 5})
    image, text = paired_embeddings(rng, batch)
    queue_rows = {m: sphere(rng, slots, batch, 32) for m in ("image", "text")}
    banks = scaled_banks(rng, (12, 6))
    outputs, params = {"image_emb": image, "text_emb": text}, {prototypes.PARAMS_KEY: banks}

    def state(filled):
        return {"queue": {**queue_rows, "filled": np.int32(filled)}}

    flat = {m: q.reshape(-1, 32) for m, q in queue_rows.items()}
    with_queue, _ = swap_loss_np(image, text, list(banks.values()), queues=flat)
    without, _ = swap_loss_np(image, text, list(banks.values()))
    assert abs(with_queue - without) > 1e-3

    loss, metrics, new = run_objective(config, mesh_shape, outputs, params, state(slots), step=7)
    _, per_bank = swap_loss_np(image, text, list(banks.values()), queues=flat)
    np.testing.assert_allclose(loss, with_queue, rtol=0, atol=loss_atol(per_bank, batch, code_rows=batch * (slots + 1)))
    assert metrics["queue_in_use"] == 1.0
    # FIFO: the batch goes in front, the oldest slot drops out.
    np.testing.assert_array_equal(new["queue"]["image"][0], image)
    np.testing.assert_array_equal(new["queue"]["text"][1:], queue_rows["text"][:-1])
    assert int(new["queue"]["filled"]) == slots

    loss, metrics, new = run_objective(config, mesh_shape, outputs, params, state(slots - 1), step=7)
    _, per_bank = swap_loss_np(image, text, list(banks.values()))
    np.testing.assert_allclose(loss, without, rtol=0, atol=loss_atol(per_bank, batch))
    assert metrics["queue_in_use"] == 0.0
    assert int(new["queue"]["filled"]) == slots

    # Before queue_start_step nothing is written.
    _, _, new = run_objective(config, mesh_shape, outputs, params, state(0), step=4)
    np.testing.assert_array_equal(new["queue"]["image"], queue_rows["image"])
    assert int(new["queue"]["filled"]) == 0


def test_config_errors_name_the_key():
    config = swap_config(**{"swap.queue_length": 24})  # batch 16
    with pytest.raises(ConfigError, match=r"config\.swap\.queue_length=24 must be a multiple of the global batch"):
        config_check.validate(config, 1)
    config = swap_config()
    config.swap.num_prototypes = None
    with pytest.raises(ConfigError, match=r"config\.swap\.num_prototypes"):
        config_check.validate(config, 1)
    for key, value in (("teacher", "momentum"), ("temperature", 0.0), ("teacher_momentum", 1.5)):
        with pytest.raises(ConfigError, match=rf"config\.swap\.{key}"):
            config_check.validate(swap_config(**{f"swap.{key}": value}), 1)
    with pytest.raises(ConfigError, match=r"config\.swap\.teacher_checkpoint"):
        config_check.validate(swap_config(**{"swap.teacher": "checkpoint"}), 1)
    config_check.validate(swap_config(**{"swap.queue_length": 32}), 1)


def test_momentum_schedule_is_cosine_from_base_to_final():
    base, final, total = 0.9, 0.99, 10
    # The float32 schedule rounds a few times, each by at most u m (cos's argument error is damped by
    # (final - base) / 2): within 5u of m, under 1e-6 = 16.8u.
    got = [float(teachers.momentum(jnp.int32(t), base, final, total)) for t in (0, 5, 10, 20)]
    np.testing.assert_allclose(got, [base, (base + final) / 2, final, final], rtol=1e-6)
    t = 3
    want = final - (final - base) * (math.cos(math.pi * t / total) + 1) / 2
    np.testing.assert_allclose(float(teachers.momentum(jnp.int32(t), base, final, total)), want, rtol=1e-6)


def test_prototype_mesh_axis_follows_the_logical_rule():
    config = swap_config()
    mesh = mesh_lib.create_mesh(dict(data=2, fsdp=1, tensor=4))
    batch = ("data", "fsdp")
    assert prototypes.mesh_axis(16, config, mesh, batch) == "tensor"
    assert prototypes.mesh_axis(1_000_000, config, mesh, batch) == "tensor"
    assert prototypes.mesh_axis(6, config, mesh, batch) is None  # 4 does not divide 6
    assert prototypes.mesh_axis(16, config, mesh_lib.create_mesh(dict(data=8, fsdp=1, tensor=1)), batch) is None
    config.logical_axis_rules = [list(r) if r[0] != "prototypes" else ["prototypes", "data"] for r in config.logical_axis_rules]
    assert prototypes.mesh_axis(16, config, mesh, batch) is None  # 'data' already splits the batch


def test_init_banks_unit_rows_and_logical_axes():
    banks = prototypes.init_banks(jax.random.key(0), (7, 9), 32)
    assert sorted(banks) == ["bank_0", "bank_1"]
    for name, k in (("bank_0", 7), ("bank_1", 9)):
        box = banks[name]
        assert isinstance(box, nn.LogicallyPartitioned) and tuple(box.names) == ("prototypes", "proj")
        assert box.value.shape == (k, 32) and box.value.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(box.value, axis=-1), 1.0, rtol=0, atol=tolerances.unit_norm_atol(32))
        assert np.linalg.matrix_rank(np.asarray(box.value)) == k  # random directions, not one repeated row
    assert not np.allclose(banks["bank_0"].value[:7], banks["bank_1"].value[:7])  # one key per bank: O(1) apart
    assert prototypes.bank_sizes(ml_collections.ConfigDict({"num_prototypes": 5})) == (5,)
    assert prototypes.bank_sizes(swap_config().swap) == (12, 6)


def test_swap_objective_owns_its_banks():
    """The banks live at params['swap'], sized by config.swap.num_prototypes and placed by their logical axes."""
    config = swap_config(**{"swap.num_prototypes": (16, 6)})
    own = SWAP.init_params(jax.random.key(0), config)
    assert {k: v.value.shape for k, v in own.items()} == {"bank_0": (16, 32), "bank_1": (6, 32)}
    config.mesh.update(dict(data=2, fsdp=1, tensor=4))
    exp = build(config)
    params = exp.abstract_state["params"]
    assert {k: v.shape for k, v in params[prototypes.PARAMS_KEY].items()} == {"bank_0": (16, 32), "bank_1": (6, 32)}
    assert prototypes.PARAMS_KEY not in exp.model_params(params) and "image" in exp.model_params(params)
    assert exp.shardings["params"][prototypes.PARAMS_KEY]["bank_0"].spec == P("tensor")
    assert exp.shardings["params"][prototypes.PARAMS_KEY]["bank_1"].spec == P()  # 4 does not divide 6
    banks = jax.device_get(exp.init_state()["params"][prototypes.PARAMS_KEY])
    for bank in banks.values():
        np.testing.assert_allclose(np.linalg.norm(bank, axis=-1), 1.0, rtol=0, atol=tolerances.unit_norm_atol(32))
    # A run without the swap objective has no banks at all.
    assert prototypes.PARAMS_KEY not in build(helpers.tiny_config("clip")).abstract_state["params"]


# ----------------------------------------------------------------------------------------------------
# Training: clip + swap with two banks, a queue, an EMA teacher and a prototype freeze.
# ----------------------------------------------------------------------------------------------------

STEPS, FREEZE, QUEUE_START = 4, 2, 1


def train_config(**overrides):
    settings = {"swap.num_prototypes": (16, 24), "swap.queue_length": 32, "swap.queue_start_step": QUEUE_START,
                "swap.freeze_prototypes_steps": FREEZE, "swap.teacher": "ema", "swap.teacher_momentum": 0.9,
                "swap.teacher_momentum_final": 0.99}
    return swap_config(**{**settings, **overrides})


def scale_prototype_rows(state, shardings):
    """Stored banks with rows of length 0.5-2: every step must rewrite them to unit rows first."""
    params, key = dict(state["params"]), prototypes.PARAMS_KEY
    params[key] = {
        name: jax.device_put(bank * (1.0 + 0.5 * jnp.sin(jnp.arange(bank.shape[0], dtype=jnp.float32)))[:, None],
                             shardings["params"][key][name])
        for name, bank in state["params"][key].items()
    }
    return {**state, "params": params}


class Run:
    """A few train steps; keeps a host copy of the state before every step and after the last."""

    def __init__(self, config, devices, batches):
        self.config = config
        self.exp = build(config, devices)
        self.model, self.shardings, self.abstract, self.step_fn = (
            self.exp.model, self.exp.shardings, self.exp.abstract_state, self.exp.step)
        state = scale_prototype_rows(self.exp.init_state(), self.shardings)
        self.batches, self.states, self.metrics = batches, [jax.device_get(state)], []
        for local in batches:
            state, metrics = self.step_fn(state, self.global_batch(local))
            self.states.append(jax.device_get(state))
            self.metrics.append({k: float(v) for k, v in metrics.items()})

    def global_batch(self, local):
        return self.exp.global_batch(local)

    def on_device(self, host_state):
        return jax.device_put(host_state, self.shardings)


@pytest.fixture(scope="module")
def reference():
    config = train_config()
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    return Run(config, jax.devices()[:1], helpers.random_batches(config, STEPS))


def adam_leaves(opt_state, pattern=f"[{prototypes.PARAMS_KEY!r}]"):
    """Float leaves of the optimizer state that belong to prototype banks (moments), by path."""
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(opt_state)
            if pattern in jax.tree_util.keystr(p) and np.asarray(x).dtype == np.float32}


@pytest.mark.slow
def test_prototypes_unit_rows_and_freeze(reference):
    states, key = reference.states, prototypes.PARAMS_KEY
    before = states[0]["params"][key]
    assert any(abs(np.linalg.norm(b, axis=1) - 1).max() > 0.1 for b in before.values())
    moments = adam_leaves(states[0]["opt_state"])
    assert moments and all(np.all(v == 0) for v in moments.values())
    for t in range(1, FREEZE + 1):  # frozen steps: the stored banks are the re-normalised rows, moments stay zero
        for name, bank in states[t]["params"][key].items():
            np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=0, atol=tolerances.unit_norm_atol(32))
            # Normalised in float32 once per step: each entry within t unit_rows_relative_error(32) of the exact.
            rtol = t * tolerances.unit_rows_relative_error(32)
            np.testing.assert_allclose(bank, unit(before[name]), rtol=rtol, atol=0)
        assert all(np.all(v == 0) for v in adam_leaves(states[t]["opt_state"]).values())
    # Other parameters did train meanwhile.
    assert np.abs(states[FREEZE]["params"]["text"]["token_embed"] - states[0]["params"]["text"]["token_embed"]).max() > 0
    # After the freeze: banks move (from their unit rows, by at most a few learning-rate steps) and moments fill.
    after = states[FREEZE + 1]["params"][key]
    for name, bank in after.items():
        delta = np.abs(bank - states[FREEZE]["params"][key][name]).max()
        assert 0 < delta < 0.05
        # The step started from unit rows; only this step's update separates the stored rows from the sphere.
        assert np.abs(np.linalg.norm(bank, axis=1) - 1).max() < 0.05
    assert all(np.any(v != 0) for v in adam_leaves(states[FREEZE + 1]["opt_state"]).values())


def teacher_source(params):
    """What the EMA teacher tracks: the student's towers and its banks."""
    return {"towers": registry.model_params(params), "banks": params[prototypes.PARAMS_KEY]}


@pytest.mark.slow
def test_ema_teacher_follows_the_student(reference):
    cfg = reference.config.swap
    for t in range(STEPS):
        m = np.float32(cfg.teacher_momentum_final - (cfg.teacher_momentum_final - cfg.teacher_momentum)
                       * (math.cos(math.pi * t / reference.config.total_steps) + 1) / 2)
        old, new = reference.states[t], reference.states[t + 1]
        before, source = old["objective_states"]["swap"]["teacher"], teacher_source(new["params"])
        want = jax.tree.map(lambda tch, s: m * tch + (np.float32(1) - m) * s, before, source)
        after = jax.tree_util.tree_leaves_with_path(new["objective_states"]["swap"]["teacher"])
        for (path, got), exp, tch, s in zip(after, jax.tree.leaves(want), jax.tree.leaves(before),
                                            jax.tree.leaves(source)):
            # Two float32 evaluations of m t + (1 - m) s (here and in the step, maybe fused), each within 3u (|t| + |s|)
            # of the exact; the two m (float32 schedule, float64 one rounded) within 6u, times |t - s|.
            tch, s = np.asarray(tch, np.float64), np.asarray(s, np.float64)
            atol = 6 * U * float(np.max(np.abs(tch) + np.abs(s))) + 6 * U * float(np.max(np.abs(tch - s)))
            np.testing.assert_allclose(got, exp, rtol=0, atol=atol, err_msg=f"step {t} {jax.tree_util.keystr(path)}")
    # The teacher starts as a copy of the student (whose stored banks this test rescaled after init).
    first = reference.states[0]
    teacher = first["objective_states"]["swap"]["teacher"]
    assert set(teacher) == {"towers", "banks"}
    towers = registry.model_params(first["params"])
    assert set(teacher["towers"]) == set(towers) and prototypes.PARAMS_KEY not in towers
    for a, b in zip(jax.tree.leaves(teacher["towers"]), jax.tree.leaves(towers)):
        np.testing.assert_array_equal(a, b)
    for name, bank in first["params"][prototypes.PARAMS_KEY].items():
        # Normalised in float32: each entry within unit_rows_relative_error(32) of the exact.
        rtol = tolerances.unit_rows_relative_error(32)
        np.testing.assert_allclose(teacher["banks"][name], unit(bank), rtol=rtol, atol=0)


@pytest.mark.slow
def test_queue_fills_fifo_with_teacher_embeddings(reference):
    """Slot 0 holds the newest batch's (teacher) embeddings; the queue is used only once full."""
    apply = jax.jit(make_apply_model(reference.model))
    emb = []
    for t, local in enumerate(reference.batches):
        out = apply(reference.states[t]["objective_states"]["swap"]["teacher"]["towers"],
                    {k: jnp.asarray(v) for k, v in local.items()})
        emb.append({m: np.asarray(out[f"{m}_emb"]) for m in ("image", "text")})
    slots = reference.config.swap.queue_length // reference.config.batch_size
    for t in range(STEPS):
        queue = reference.states[t + 1]["objective_states"]["swap"]["queue"]
        written = [s for s in range(QUEUE_START, t + 1)][::-1][:slots]  # newest first
        assert int(queue["filled"]) == min(len([s for s in range(QUEUE_START, t + 1)]), slots)
        for m in ("image", "text"):
            for slot in range(slots):
                if slot < len(written):
                    # Embeddings recomputed in another program: network_atol's estimate ('mu' towers, 2 blocks).
                    want = emb[written[slot]][m]
                    atol = tolerances.network_atol(256, float(np.abs(want).max()), 3)
                    np.testing.assert_allclose(queue[m][slot], want, rtol=0, atol=atol)
                else:
                    np.testing.assert_array_equal(queue[m][slot], 0.0)
    in_use = [m["swap/queue_in_use"] for m in reference.metrics]
    assert in_use == [0.0] * (QUEUE_START + slots) + [1.0] * (STEPS - QUEUE_START - slots)


# Every mesh against one device, step by step within derived bounds, is tests/train/test_sharded_training.py
# [swap]; here the mesh that splits the banks over 'tensor' runs this file's longer queue schedule.
MESHES = [dict(data=2, fsdp=1, tensor=4)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_meshes_match_one_device(reference, mesh_shape):
    config = train_config()
    config.mesh.update(mesh_shape)
    run = Run(config, jax.devices(), reference.batches)
    if mesh_shape["tensor"] == 4:
        assert run.shardings["params"][prototypes.PARAMS_KEY]["bank_0"].spec == P("tensor")
        assert run.shardings["objective_states"]["swap"]["teacher"]["banks"]["bank_1"].spec == P("tensor")
    assert run.shardings["objective_states"]["swap"]["queue"]["image"].spec == P(None, ("data", "fsdp") if mesh_shape["fsdp"] > 1 else "data")
    # Observed margins, not bounds: the runs train on different roundings, and Adam below has none.
    for key in ("loss", "clip/loss", "swap/loss", "swap/bank_0/loss", "swap/bank_1/loss"):
        np.testing.assert_allclose([m[key] for m in run.metrics], [m[key] for m in reference.metrics], rtol=1e-5, err_msg=key)
    assert [m["swap/queue_in_use"] for m in run.metrics] == [m["swap/queue_in_use"] for m in reference.metrics]
    # Adam divides by sqrt(v): near-zero gradients amplify reduction-order rounding to a fraction of one step.
    # Not a bound: an entry within rounding of zero could flip the sign of a first Adam step (2 lr = 6e-3).
    got, want = run.states[-1], reference.states[-1]
    for part in ("params", "objective_states"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[part]), jax.tree.leaves(want[part])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"{mesh_shape} {part}{jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_checkpoint_restores_banks_queue_and_teacher_exactly(reference, tmp_path):
    mid = STEPS - 1  # queue full, teacher and banks moved
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(mid, reference.on_device(reference.states[mid]), force=True)
    ckpt.wait()
    step, restored = ckpt.restore(reference.abstract)
    ckpt.close()
    assert step == mid
    host = jax.device_get(restored)
    saved = reference.states[mid]
    assert set(host["objective_states"]["swap"]) == {"queue", "teacher"}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(host), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # Training on from the restored state repeats the original step bit for bit.
    state, metrics = reference.step_fn(restored, reference.global_batch(reference.batches[mid]))
    assert float(metrics["loss"]) == reference.metrics[mid]["loss"]
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(reference.states[mid + 1])):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Frozen teacher loaded from a saved run.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_teacher_is_loaded_and_frozen(reference, tmp_path):
    workdir = str(tmp_path / "teacher_run")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    saved = reference.states[2]
    ckpt.save(2, reference.on_device(saved), force=True)
    ckpt.close()

    loaded = teachers.load_params(workdir)
    assert set(loaded) == set(saved["params"])
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(a, b)

    config = train_config(**{"swap.teacher": "checkpoint", "swap.teacher_checkpoint": workdir})
    config.mesh.update(dict(data=2, fsdp=1, tensor=4))
    exp = build(config)
    state = exp.init_state()
    assert exp.shardings["objective_states"]["swap"]["teacher"]["banks"]["bank_0"].spec == P("tensor")

    def as_saved(teacher):  # the teacher laid out as the saved student's parameters
        return {**teacher["towers"], prototypes.PARAMS_KEY: teacher["banks"]}

    teacher = jax.device_get(state["objective_states"]["swap"]["teacher"])
    assert set(as_saved(teacher)) == set(saved["params"])
    for a, b in zip(jax.tree.leaves(as_saved(teacher)), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(a, b)
    batch = exp.global_batch(reference.batches[0])
    for _ in range(2):
        state, metrics = exp.step(state, batch)
        assert np.isfinite(float(metrics["swap/loss"]))
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(as_saved(after["objective_states"]["swap"]["teacher"])), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(a, b)
    assert int(after["objective_states"]["swap"]["queue"]["filled"]) == 1


@pytest.mark.slow
def test_checkpoint_teacher_without_banks_needs_student_prototypes(tmp_path):
    """A CLIP run saved without prototype banks can teach when codes use the student's banks."""
    clip = helpers.tiny_config("clip")
    clip.mesh.update(dict(data=1, fsdp=1, tensor=1))
    state = build(clip, jax.devices()[:1]).init_state()
    ckpt = Checkpointer(str(tmp_path / "clip" / "checkpoints"))
    ckpt.save(7, state, force=True)
    ckpt.close()
    path = str(tmp_path / "clip")
    assert teachers.resolve_checkpoint(path).endswith(os.path.join("checkpoints", "7", "state"))
    assert teachers.resolve_checkpoint(os.path.join(path, "checkpoints", "7")) == teachers.resolve_checkpoint(path)

    config = swap_config(**{"swap.teacher": "checkpoint", "swap.teacher_checkpoint": path})
    config_check.validate(config, 8)  # the keys are fine; the shapes are checked once, by build
    with pytest.raises(ConfigError, match=r"teacher_checkpoint.*swap.*bank_0.*teacher_prototypes='student'"):
        build(config)
    config.swap.teacher_prototypes = "student"
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    new = build(config, jax.devices()[:1]).init_state()
    teacher = jax.device_get(new["objective_states"]["swap"]["teacher"])
    assert set(teacher) == {"towers"}  # no banks: the codes are scored with the student's
    assert set(teacher["towers"]) == set(state["params"])
    for a, b in zip(jax.tree.leaves(teacher["towers"]), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(a, b)


def test_clus_config_is_valid():
    config = config_base.load_config(os.path.join(REPO, "configs", "clus.py"))
    assert dict(config.objectives) == {"clip": 1.0, "swap": 0.5}
    assert config.swap.teacher == "ema" and len(prototypes.bank_sizes(config.swap)) == 2
    config_check.validate(config, 8)
    short = config_base.load_config(os.path.join(REPO, "configs", "clus.py") + ":steps=40,protos=32+64+128,queue=512")
    assert prototypes.bank_sizes(short.swap) == (32, 64, 128) and short.swap.queue_length == 512
    assert short.swap.freeze_prototypes_steps <= 4
    config_check.validate(short, 8)
