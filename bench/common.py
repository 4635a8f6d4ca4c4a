"""Shared benchmark helpers: the T/S architectures, configs for them, peak FLOP/s, timing and tables.

Every comparison in these scripts is measured side by side in one process: candidates are run in
interleaved rounds (A B C A B C ...) and each is summarised by its median, so a noisy, shared host slows
all candidates alike and ratios stay meaningful.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from clus_jax.common import hostmem  # noqa: E402  (no jax import: safe before XLA flags are set)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host import cpu_model, family, matmul_peak_fn  # noqa: E402,F401  (re-exported for the benches)

# Architectures of the step and open_clip comparisons. MLP ratio 4 everywhere; batch 128.
ARCHS: dict[str, dict[str, Any]] = {
    "T": dict(image_size=64, patch_size=8, vision_width=192, vision_layers=6, vision_heads=3, embed_dim=256,
              context_length=32, vocab_size=49408, text_width=192, text_layers=6, text_heads=3, mlp_ratio=4,
              batch_size=128),
    "S": dict(image_size=96, patch_size=16, vision_width=384, vision_layers=6, vision_heads=6, embed_dim=384,
              context_length=32, vocab_size=49408, text_width=256, text_layers=6, text_heads=4, mlp_ratio=4,
              batch_size=128),
}

# Dense peak TFLOP/s per chip from vendor datasheets (no sparsity), by dtype. float32 on NVIDIA means
# plain FP32 (TF32 tensor cores are listed separately since XLA uses them only under a precision flag).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5},
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0},
    "TPU v5e": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0},
    "TPU v6e": {"bfloat16": 918.0},
}


# XLA:CPU allocates each step's temporaries afresh; glibc serves large blocks from mmap in worker-thread
# arenas and unmaps them on free, so every step page-faults its whole temporary buffer in again (a fifth of
# the CPU time of the T step goes to the kernel). The trainer keeps freed memory mapped by default
# (``clus_jax.common.hostmem``); these settings apply the same to any process, PyTorch included, from its start.
MALLOC_ENVS: dict[str, dict[str, str]] = {
    # glibc defaults (what a plain PyTorch process gets)
    "system": {"CLUS_JAX_HOST_MALLOC": "system"},
    # one arena, no mmap, no trimming: freed temporaries stay mapped for the next step (clus_jax's default)
    "retain": {"CLUS_JAX_HOST_MALLOC": "retain", "GLIBC_TUNABLES": hostmem.GLIBC_TUNABLES},
    # TCMalloc (Debian/Ubuntu package libtcmalloc-minimal4), never returning memory to the OS
    "tcmalloc": {"CLUS_JAX_HOST_MALLOC": "system", "LD_PRELOAD": "libtcmalloc_minimal.so.4",
                 "TCMALLOC_RELEASE_RATE": "0"},
}


def malloc_env(name: str) -> dict[str, str]:
    """Environment for allocator setting ``name`` (see ``MALLOC_ENVS``); must be set before a process starts."""
    if name not in MALLOC_ENVS:
        raise ValueError(f"unknown allocator setting {name!r}; known: {sorted(MALLOC_ENVS)}")
    return dict(MALLOC_ENVS[name])


def reexec_with_malloc(name: str) -> None:
    """Restarts this script with allocator setting ``name`` unless it is already in effect."""
    env = malloc_env(name)
    if os.environ.get("CLUS_JAX_BENCH_MALLOC") == name:
        return
    os.environ.update(env, CLUS_JAX_BENCH_MALLOC=name)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def set_host_devices(n: int) -> None:
    """Asks XLA for ``n`` CPU devices; must run before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def arch_config(arch: str, objective: str = "clip", *, batch_size: int | None = None, dtype: str = "float32",
                remat: bool = False, num_prototypes: int = 3000):
    """A trainer ConfigDict for architecture ``arch`` ('T' or 'S') with random data and AdamW."""
    from clus_jax.config import base as config_base

    a = ARCHS[arch]
    c = config_base.base_config()
    c.objectives = {objective: 1.0}
    c.batch_size = int(batch_size or a["batch_size"])
    c.total_steps = 1000
    c.model.image.update(dict(size="tiny", image_size=a["image_size"], patch_size=a["patch_size"],
                              width=a["vision_width"], depth=a["vision_layers"], heads=a["vision_heads"],
                              mlp_dim=a["mlp_ratio"] * a["vision_width"]))
    c.model.text.update(dict(size="tiny", context_length=a["context_length"], vocab_size=a["vocab_size"],
                             width=a["text_width"], depth=a["text_layers"], heads=a["text_heads"],
                             mlp_dim=a["mlp_ratio"] * a["text_width"]))
    c.model.embed_dim = a["embed_dim"]
    c.model.dtype = dtype
    c.model.remat = remat
    c.data.source = "synthetic"
    c.evals.run = "none"
    configure_objective(c, objective, num_prototypes)
    return c


def file_config(spec: str):
    """The trainer ConfigDict of a config file (``configs/clip.py[:ARGS]``) for timing its step on random
    batches: no evaluation sets and no dataset to build."""
    from clus_jax.config import base as config_base

    config = config_base.load_config(spec)
    config.data.source = "synthetic"
    config.evals.run = "none"
    return config


def configure_objective(config, objective: str, num_prototypes: int = 3000) -> None:
    """Sets what an objective needs beyond its own defaults (SigLIP's bias, the Clus prototype bank, the
    BriVL queue length as a multiple of the batch)."""
    config.objectives = {objective: 1.0}
    if objective == "siglip" and config.model.get("logit_bias_init") is None:
        config.model.logit_bias_init = -10.0
    if objective == "swap":
        config.swap.num_prototypes = (int(num_prototypes),)
    if objective == "brivl":  # BriVL's 9600-key queues, rounded to a multiple of the batch
        batch = int(config.batch_size)
        config.brivl.queue_length = max(1, round(9600 / batch)) * batch


def random_batch(config, seed: int = 0) -> dict[str, Any]:
    """One host batch of uint8 images and token ids (EOT somewhere in the second half of the context)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s, t = int(config.batch_size), int(config.model.image.image_size), int(config.model.text.context_length)
    text = rng.integers(1, int(config.model.text.vocab_size), (b, t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, b)
    text[np.arange(t)[None, :] >= lengths[:, None]] = 0
    return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "text": text}


class StepRunner:
    """A compiled train step with its own state and a device-resident batch, for timing."""

    def __init__(self, config, devices: Sequence[Any] | None = None):
        import jax

        from clus_jax.train.experiment import build

        self.config = config
        self.experiment = exp = build(config, devices)
        self.state = exp.init_state()
        self.step = exp.step
        self.batch = exp.global_batch(random_batch(config))
        self.mesh, self.rules, self.shardings = exp.mesh, exp.rules, exp.shardings
        t0 = time.perf_counter()
        self.compiled = self.step.jitted.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.metrics = None
        jax.block_until_ready(self.state)

    def __call__(self) -> None:
        import jax

        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.state)


def interleaved(candidates: Mapping[str, Callable[[], Any]], rounds: int, per_round: int = 1,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each candidate, timed in interleaved rounds after ``warmup`` untimed calls each."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> float:
    """Interquartile range over median: a rough noise figure for a timing series."""
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def device_info() -> dict[str, Any]:
    """Platform, device kind and count, host CPU, versions and the date, for every record."""
    import jax

    d = jax.devices()[0]
    return dict(platform=d.platform, device_kind=d.device_kind, device_count=jax.device_count(),
                host=cpu_model(), cpus=os.cpu_count(), jax=jax.__version__,
                **{k: v for k, v in family().items() if k in ("ids", "avx2", "avx512", "amx")},
                date=datetime.date.today().isoformat(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                malloc=os.environ.get("CLUS_JAX_BENCH_MALLOC", "retain"), load_average=load_average())


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages of the host: other work running while a benchmark is timed."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def datasheet_peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Datasheet dense peak for an accelerator ``device_kind`` and compute dtype, or None if unknown."""
    for name, table in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return table.get(dtype) or table.get("bfloat16")
    return None


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Prints ``rows`` as an aligned table; columns are (key, header, format spec)."""
    cells = [[format(r.get(k, ""), f) if r.get(k) is not None and f else str(r.get(k, "")) for k, _, f in columns]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(columns)]
    line = "  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def emit(record: Mapping[str, Any]) -> None:
    """One JSON line per measurement."""
    print(json.dumps(dict(record), sort_keys=True, default=float))


class Worker:
    """A benchmark candidate in its own process (own XLA flags, or another framework), driven line by line.

    The child calls ``serve(fn, info)``; the parent's ``run(n)`` makes it time ``n`` calls of ``fn`` and
    returns their seconds. Only one worker runs at a time, so candidates in different processes can be
    interleaved round by round exactly like in-process ones.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 900.0):
        import subprocess

        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        self.info = json.loads(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"benchmark worker exited with code {self.proc.wait()}")
            if line.startswith(prefix):
                return line[len(prefix):]

    def run(self, n: int = 1) -> list[float]:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("TIMES "))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def serve(fn: Callable[[], Any], info: Mapping[str, Any]) -> None:
    """Child side of ``Worker``: announce ``info``, then time ``fn`` on request until told to quit."""
    print("READY " + json.dumps(dict(info), default=float), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        times = []
        for _ in range(int(cmd[1])):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print("TIMES " + json.dumps(times), flush=True)
