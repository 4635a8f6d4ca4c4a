"""Where a CPU train step's time goes: per-thread busy time, how much of the step runs on one thread
only, and the ops that run alone, from a ``jax.profiler`` trace of a few steps.

XLA:CPU executes a step's ops (thunks) on its intra-op thread pool; each op is one trace event on the
thread that ran it. The sweep below splits the step's wall time into moments when no thread, one thread
or several threads are inside an op, and charges the one-thread moments to the op that was running. On a
2-core host a step with no idle time and no one-thread time would take (total thread time) / 2.

  python bench/profile_step.py --arch T
  python bench/profile_step.py --arch S --top 15
  python bench/profile_step.py --config configs/clip.py     # the default run's own step, random data
  python bench/profile_step.py --quick
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# Events that wrap other events (executor bookkeeping, thread-pool regions) rather than being one op.
WRAPPERS = ("ThunkExecutor", "Slinky", "Threadpool", "end:")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(common.ARCHS), default="T")
    p.add_argument("--config", default="", help="profile this config file's step instead of --arch (random data "
                   "of its shapes), e.g. configs/clip.py or configs/clip.py:batch=64")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after two warm-up steps)")
    p.add_argument("--top", type=int, default=10, help="ops to list by one-thread time")
    p.add_argument("--malloc", choices=sorted(common.MALLOC_ENVS), default="retain")
    p.add_argument("--quick", action="store_true", help="tiny model, one step, to check the script")
    return p.parse_args()


def op_kind(name: str) -> str:
    """'ynn_fusion.378' -> 'ynn_fusion' (library matmul fusions), 'copy_bitcast_fusion.77' -> 'copy_bitcast_fusion'."""
    return re.sub(r"\.\d+$", "", name)


def describe_ops(hlo_text: str) -> dict[str, str]:
    """Op name -> 'result shape  source op' from the compiled HLO (e.g. 'f32[8320,192] .../mlp/fc1/dot_general')."""
    described = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* [^\n]*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        described[m.group(1)] = f"{m.group(2)} {'/'.join(m.group(3).split('/')[-5:])}"
    return described


def thread_events(trace_dir: str) -> dict[str, list[tuple[int, int, str]]]:
    """(start_ns, end_ns, op name) per XLA:CPU worker thread, wrapper events left out."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    threads = {}
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "Eigen" not in line.name:
                continue
            threads[line.name] = sorted((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name)
                                        for ev in line.events if not ev.name.startswith(WRAPPERS))
    return threads


def concurrency(threads: dict[str, list[tuple[int, int, str]]]) -> dict[str, object]:
    """Splits the traced span into idle / one-thread / several-thread time; one-thread time per op."""
    points = []
    for tid, events in enumerate(threads.values()):
        for start, end, name in events:
            points += [(start, 1, tid, name), (end, -1, tid, name)]
    points.sort(key=lambda p: (p[0], p[1]))
    active: dict[int, str] = {}
    solo, idle, several = collections.Counter(), 0, 0
    last = points[0][0]
    for t, delta, tid, name in points:
        span = t - last
        if len(active) == 1:
            solo[next(iter(active.values()))] += span
        elif not active:
            idle += span
        else:
            several += span
        last = t
        if delta > 0:
            active[tid] = name
        else:
            active.pop(tid, None)
    busy = collections.Counter()
    for events in threads.values():
        for start, end, name in events:
            busy[op_kind(name)] += end - start
    return dict(span=points[-1][0] - points[0][0], idle=idle, several=several, solo=solo, busy=busy)


def main() -> None:
    args = parse_args()
    common.reexec_with_malloc(args.malloc)
    import jax

    if args.quick:
        common.ARCHS["quick"] = dict(common.ARCHS["T"], image_size=32, vision_layers=2, text_layers=2, batch_size=16,
                                     vocab_size=1000)
    arch = "quick" if args.quick else args.arch
    steps = 1 if args.quick else args.steps
    config = common.file_config(args.config) if args.config else common.arch_config(arch)
    if args.config:
        arch = args.config
    runner = common.StepRunner(config, jax.devices()[:1])
    for _ in range(2):
        runner()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            runner()
        jax.profiler.stop_trace()
        threads = thread_events(trace_dir)
    c = concurrency(threads)
    ms = lambda ns: ns / steps / 1e6  # noqa: E731
    total_busy = sum(c["busy"].values())
    info = common.device_info()
    print(f"train step {arch} (CLIP), {info['host']} ({info['cpus']} CPUs), jax {info['jax']}, malloc {info['malloc']}, "
          f"{len(threads)} XLA threads; per step: span {ms(c['span']):.0f} ms, thread time {ms(total_busy):.0f} ms "
          f"(ideal span {ms(total_busy) / max(len(threads), 1):.0f} ms), several threads busy {ms(c['several']):.0f} ms, "
          f"one thread {ms(sum(c['solo'].values())):.0f} ms, idle {ms(c['idle']):.0f} ms")
    kinds = [dict(kind=k, thread_ms=ms(v), share=v / total_busy) for k, v in c["busy"].most_common(8)]
    common.print_table(kinds, [("kind", "op kind", ""), ("thread_ms", "thread ms/step", ".1f"), ("share", "share", ".1%")])
    print()
    described = describe_ops(runner.compiled.as_text())
    durations = collections.defaultdict(int)
    for events in threads.values():
        for start, end, name in events:
            durations[name] += end - start
    top = [dict(op=name, solo_ms=ms(v), op_ms=ms(durations[name]), what=described.get(name, ""))
           for name, v in c["solo"].most_common(args.top)]
    common.print_table(top, [("op", "op running alone", ""), ("solo_ms", "alone ms/step", ".1f"),
                             ("op_ms", "op ms/step", ".1f"), ("what", "result, source", "")])
    common.emit(dict(info, bench="profile_step", arch=arch, steps=steps, threads=len(threads),
                     span_ms=ms(c["span"]), thread_ms=ms(total_busy), several_ms=ms(c["several"]),
                     one_thread_ms=ms(sum(c["solo"].values())), idle_ms=ms(c["idle"]),
                     thread_ms_by_kind={k: ms(v) for k, v in c["busy"].items()}))


if __name__ == "__main__":
    main()
