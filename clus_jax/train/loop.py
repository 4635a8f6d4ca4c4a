"""The training loop: config -> mesh -> shapes -> workdir checks -> sharded init or restore -> config.json -> steps,
logs, evals, checkpoints."""
from __future__ import annotations

import logging
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from clus_jax.common.cli import format_eta
from clus_jax.data.pipeline import create_train_iterator
from clus_jax.data.tokenizers import create_tokenizer
from clus_jax.train.experiment import build
from clus_jax.config.run_config import save_run_config
from clus_jax.common import faults
from clus_jax.train.checkpoint import Checkpointer
from clus_jax.train import workdir as workdir_lib
from clus_jax.evaluate import registry as evaluators
from clus_jax.evaluate.encoders import make_encoders
from clus_jax.train.eval_hook import evaluate_and_save, state_params
from clus_jax.train.metrics_writer import MetricWriter
from clus_jax.train.progress import Eta

log = logging.getLogger("clus_jax")


class NonFiniteError(RuntimeError):
    pass


class _Preemption:
    """Preemption notice -> save at the next step boundary and exit cleanly, agreed across hosts.

    One process: SIGTERM sets a flag. Several processes: JAX's preemption sync point, which makes every
    host see the notice at the same step (the coordination service catches SIGTERM).
    """

    def __init__(self):
        self.flag = False
        self.multi_host = jax.process_count() > 1
        if not self.multi_host:
            try:
                signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (some test runners)
                pass

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, step: int) -> bool:
        if self.multi_host:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final metrics.

    A workdir that holds another run's checkpoints is refused before anything is written (``train.workdir``);
    ``overwrite`` moves whatever the workdir holds aside to ``replaced-<time>/`` and starts over.
    ``config.json`` is written once the restore succeeded or the run was found to be new.
    """
    resuming = workdir_lib.has_checkpoints(workdir) and not overwrite
    tokenizer = create_tokenizer(config.tokenizer.name, int(config.model.text.context_length), config.tokenizer.get("path") or None)
    # Every check runs in build (config.check.validate, the vocabulary included); a resumed run neither checks
    # nor reads config.init_from.
    exp = build(config, resuming=resuming, tokenizer=tokenizer)
    workdir_lib.check_writable(workdir)
    if resuming:
        workdir_lib.check_same_run(workdir, config, exp.abstract_state)

    pcount, pindex = jax.process_count(), jax.process_index()
    data_iter = create_train_iterator(
        config.data, tokenizer=tokenizer, image_size=int(config.model.image.image_size),
        local_batch_size=int(config.batch_size) // pcount, seed=int(config.seed), process_index=pindex, process_count=pcount,
        fields=exp.fields,
    )

    if overwrite:
        replaced = workdir_lib.replace_run(workdir)
        if replaced:
            log.warning("--overwrite: moved the workdir's earlier run to %s", replaced)
    ckpt = Checkpointer(str(epath.Path(workdir) / workdir_lib.CHECKPOINTS), keep=int(config.keep_checkpoints))
    if resuming:
        start_step, state = ckpt.restore(exp.abstract_state, data_iter)
        log.info("resumed from step %d", start_step)
    else:
        state = exp.init_state()
        start_step = int(state["step"].addressable_data(0))  # 0, or the source's step (init_from mode 'resume')
    if pindex == 0:
        save_run_config(workdir, config)  # the workdir describes itself (clus_jax.load reads it)
    step_fn = exp.step
    writer = MetricWriter(workdir)
    bind_encoders = make_encoders(exp.model, exp.mesh, exp.rules, exp.model_params(exp.shardings["params"]), tokenizer,
                                  int(config.evals.batch_size))

    def run_evals(step: int, state, last: bool = False) -> dict[str, float]:
        """The entries of ``config.evals.run`` due at ``step`` (all after the last step) on this state
        (``train.eval_hook``), logged; {} when none is due or none reports."""
        names = evaluators.due(config, step, last=last)
        if not names:
            return {}
        t0 = time.time()
        results = evaluate_and_save(config, exp.modalities, bind_encoders(exp.model_params(state["params"])),
                                    state_params(state["params"]), workdir, step, names).metrics
        if not results:
            return {}
        results["eval/seconds"] = time.time() - t0
        eta.evaluated(results["eval/seconds"])
        writer.write(step, results)
        return results

    total = int(config.total_steps)
    eta = Eta(total, start_step, [evaluators.every(config, name) for name in evaluators.run_names(config)])
    preemption = _Preemption()
    pending = None  # (step, metrics) of the previous step: read one step late, never blocking the current one
    window = {"t0": time.time(), "images": 0, "data_wait": 0.0, "steps": 0}
    loss_sum, loss_count, skipped_total, consecutive_bad = 0.0, 0, 0, 0
    final_metrics: dict[str, Any] = {}

    def flush(pending_step, pending_metrics, force_log=False):
        nonlocal loss_sum, loss_count, consecutive_bad
        metrics = {k: float(v) for k, v in jax.device_get(pending_metrics).items()}
        consecutive_bad = consecutive_bad + 1 if metrics["nonfinite"] else 0
        if np.isfinite(metrics["loss"]):
            loss_sum, loss_count = loss_sum + metrics["loss"], loss_count + 1
        if consecutive_bad >= int(config.max_consecutive_nonfinite):
            raise NonFiniteError(
                f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (last at step {pending_step}); "
                "the last good state was kept"
            )
        if force_log or (config.log_every and pending_step % int(config.log_every) == 0):
            elapsed = time.time() - window["t0"]
            ips = window["images"] / max(elapsed, 1e-9)
            record = {f"train/{k}": v for k, v in metrics.items()}
            record["train/loss"] = loss_sum / max(loss_count, 1)
            record.update({"train/images_per_sec": ips, "train/data_wait_fraction": window["data_wait"] / max(elapsed, 1e-9),
                           "data/skipped": skipped_total})
            writer.write(pending_step, record)
            if pindex == 0:
                print(f"step {pending_step}/{total}  loss {record['train/loss']:.4f}  {ips:.0f} img/s  "
                      f"data-wait {100 * record['train/data_wait_fraction']:.0f}%  "
                      f"eta {format_eta(eta.left(pending_step))}", flush=True)
            final_metrics.update(record)
            loss_sum, loss_count = 0.0, 0
            window.update(t0=time.time(), images=0, data_wait=0.0, steps=0)

    step = start_step
    try:
        while step < total:
            t_data = time.time()
            local = next(data_iter)
            skipped_total += int(local.pop("skipped", 0))
            batch = exp.global_batch(local)
            window["data_wait"] += time.time() - t_data
            state, metrics = step_fn(state, batch)
            step += 1
            eta.step(step)
            window["images"] += int(config.batch_size)
            window["steps"] += 1
            if pending is not None:
                try:
                    flush(*pending)
                except NonFiniteError:
                    # Bad steps never change the state, so this is the last good state: keep it.
                    ckpt.save(step, state, data_iter, force=True)
                    ckpt.wait()
                    raise
            pending = (step, metrics)
            faults.maybe_inject("after_step", step)
            if config.checkpoint_every and step % int(config.checkpoint_every) == 0 and step < total:
                ckpt.save(step, state, data_iter)
                faults.maybe_inject("during_save", step)
            if step < total:
                final_metrics.update(run_evals(step, state))
            if preemption.requested(step):
                flush(*pending, force_log=True)
                pending = None
                ckpt.save(step, state, data_iter, force=True)
                ckpt.wait()
                log.warning("preempted: saved step %d", step)
                return final_metrics
        if pending is not None:
            flush(*pending, force_log=True)
        ckpt.save(step, state, data_iter, force=True)
        final_metrics.update(run_evals(step, state, last=True))
    finally:
        ckpt.close()
        writer.close()
        data_iter.close()
    return final_metrics
