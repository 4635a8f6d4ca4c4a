"""The host's processor family and measured float32 matmul rate, the context every CPU timing needs.

Hosts of this project differ by a factor of three: an AVX-512 core runs XLA's float32 matmul about three times
as fast as an AVX2-only one. Every timing this repo records is printed next to these figures, and the tests
scale their subprocess time limits by ``host_factor`` so a slow or busy host is not mistaken for a hang.

    python bench/host.py            # one line for a person, then one JSON record
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable

# The host the suite's base time limits were set on: AVX-512, 2 cores, XLA float32 matmul at 200 GFLOP/s.
REFERENCE_GFLOPS = 200.0
REFERENCE_CORES = 2


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where it is not readable)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo (or what the platform module knows)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_ids(info: dict[str, str] | None = None) -> str:
    """'family F model M': the model name alone ('AMD EPYC') hides the generation, and with it whether the
    cores have AVX-512 (Zen 2 is family 23, Zen 4 family 25 model 17 and up)."""
    info = _cpuinfo() if info is None else info
    return f"family {info['cpu family']} model {info['model']}" if "cpu family" in info and "model" in info else ""


def family() -> dict[str, Any]:
    """Model, vector extensions XLA:CPU can use, and the cores this process may run on."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    model = info.get("model name") or platform.processor() or platform.machine()
    return dict(model=model, ids=cpu_ids(info), machine=platform.machine(), cores=cores,
                avx2="avx2" in flags, avx512=any(f.startswith("avx512") for f in flags),
                amx=any(f.startswith("amx") for f in flags))


def matmul_peak_fn(n: int = 2048, dtype: str = "float32") -> tuple[Callable[[], None], float]:
    """(run, flops): a jitted n x n x n matmul chain whose median time gives the achievable FLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype) / n**0.5
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype) / n**0.5
    reps = 4

    @jax.jit
    def chain(x, y):
        for _ in range(reps):
            x = jnp.dot(x, y, preferred_element_type=x.dtype)
        return x

    chain(a, b).block_until_ready()
    return (lambda: chain(a, b).block_until_ready()), 2.0 * n**3 * reps


def xla_matmul_gflops(n: int = 1024, samples: int = 5) -> float:
    """Median float32 GFLOP/s of ``matmul_peak_fn(n)`` on the first JAX device.

    The default takes under a second on any host here (8.6 GFLOP a sample); it measures the host as it is
    now, so a busy host measures slower, which is what a time limit should scale with.
    """
    run, flops = matmul_peak_fn(n)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    times.sort()
    return flops / times[len(times) // 2] / 1e9


def host_factor(gflops: float, cores: int | None = None, reference: float = REFERENCE_GFLOPS) -> float:
    """How many times slower than the reference host this one is (never below 1): its matmul rate, and its
    cores against the reference's two. The matmul alone misses the cores: XLA runs an n=1024 matmul nearly as
    fast on one core as on two, but a test with several processes, or beside another xdist worker, halves."""
    cores = family()["cores"] if cores is None else cores
    return max(1.0, reference / max(gflops, 1e-3)) * max(1.0, REFERENCE_CORES / max(cores, 1))


def describe(gflops: float | None = None) -> dict[str, Any]:
    """Family, measured matmul rate and host factor in one record."""
    gflops = xla_matmul_gflops() if gflops is None else gflops
    record = family()
    return dict(record, xla_matmul_gflops=round(gflops, 1), host_factor=round(host_factor(gflops, record["cores"]), 2))


def summary(record: dict[str, Any]) -> str:
    """One line for a log: 'AMD EPYC | AVX2, no AVX-512, no AMX | 2 cores | XLA f32 matmul 68 GFLOP/s'."""
    ext = ", ".join([("AVX2" if record["avx2"] else "no AVX2"), ("AVX-512" if record["avx512"] else "no AVX-512"),
                     ("AMX" if record["amx"] else "no AMX")])
    ids = f" ({record['ids']})" if record.get("ids") else ""
    return (f"{record['model']}{ids} | {ext} | {record['cores']} cores | XLA float32 matmul "
            f"{record['xla_matmul_gflops']:.0f} GFLOP/s | host factor {record['host_factor']:.2f}")


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    record = describe()
    print("host:", summary(record), flush=True)
    print(json.dumps(dict(bench="host", **record)), flush=True)


if __name__ == "__main__":
    main()
