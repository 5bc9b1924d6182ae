"""Overhead: loop fps with every output on vs model-only fps, and the seed's design, same run.

    python bench/overhead.py [--source PATH] [--cycles 16] [--slice 2] [--settle 0.5]
                             [--viewers 20] [--clients-cpu N|off] [--no-contention]

Every configuration runs in its own processes, all started at once, and they take turns: in each
cycle every configuration runs alone for ``--slice`` seconds (after ``--settle`` seconds to get
going) while the others are stopped (SIGSTOP; their clients wait, idle), and a model-only slice
runs between any two others. This machine's speed drifts by 10-20 % within seconds (other
tenants), so configurations run minutes apart, as they did in earlier versions of this benchmark,
differ by more than what is measured; slices seconds apart see the same machine. Each
configuration's slice is divided by the mean of the model-only slices just before and just after
it, and the median of those ratios is reported.

Configurations, on the same frames (``--source``, default the bundled bikes.mp4, unpaced:
``--source-fps 0``) and model (EfficientNet-Lite0, ONNX Runtime, 1 thread; ``BENCH_THREADS=N``
in the environment for N threads, 0 for the product's auto rule):

- model-only: read the source, preprocess, infer, parse in a plain loop (a worker process);
- dashboard: ``python -m app`` with everything on, as installed (defaults): ``--viewers`` MJPEG
  viewers at ``?res=720p`` (raw sockets, 2 client processes), the FIFO at 480p read by a real
  ``ffmpeg -f mjpeg -i FIFO -f null -``, ``--iot mqtt`` to a real local mosquitto, one SSE client
  on /results/events and /results polled 4 times a second;
- dashboard, unpinned: the same with ``--loop-cpu off --serving-nice 0`` (the loop's CPU
  isolation and the serving threads' lower priority off): what those two defaults buy;
- dashboard, seed's outputs: the defaults with no HTTP client (FIFO + MQTT only);
- seed: bench/seed_baseline.py, the seed Lambda's design on the same frames: encode in the loop
  every frame, a FIFO thread rewriting the JPEG in a busy loop (same ffmpeg reader), a
  synchronous publish to the same mosquitto per inference;
- model-only, pinned: the model-only loop with its thread pinned where the dashboard pins its
  loop, to show how much of the dashboard's figure is pinning itself rather than cheap outputs;
- model-only, pinned, beside the serving work: the same worker running while, in another process
  confined to the other CPU(s), a serving-only dashboard does the dashboard's serving: the same
  outputs and clients, a trivial model (5 classes, 32x32) and the source paced at 0.95 x the
  model-only fps measured at the start. The machine's own bound: what the serving work costs the
  model when it shares neither a process nor a GIL with it.

The clients run on this machine, where on a device they would be browsers and subscribers on
other machines; ``--clients-cpu N`` keeps them all (viewers, SSE/poll, ffmpeg, mosquitto) on CPU N,
so the share of the loop's CPU they take here can be told from the product's own.

Also reported per dashboard: where the loop thread's time per frame goes (kernel schedstat), its
process's and its clients' CPU, and what each output delivered while it ran.
Target: dashboard fps >= 0.95 x model-only fps.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    MODEL,
    PRODUCT,
    ROOT,
    THREADS,
    Server,
    child_env,
    collect_viewers,
    cpu_seconds,
    dashboard,
    demo_clip,
    ffmpeg_reader,
    machine,
    machine_ticks,
    median,
    model_step,
    mosquitto,
    poll_results_process,
    sse_process,
    start_viewers,
    stop_process,
    thread_sched,
)

TARGET = 0.95


def model_only_forever(source: str, counter: Any, pin: bool = False) -> None:
    """The model-only loop, counting frames into ``counter`` (a shared value) until killed.
    ``pin``: the loop thread on the CPU the dashboard's ``--loop-cpu auto`` picks (its decoder
    threads, started before, keep every CPU, as the dashboard gives them)."""
    from inference.affinity import available_cpus, choose_cpu
    from inference.models import load_model
    from inference.settings import Settings
    from inference.sources import make_source

    model = load_model(Settings(model=MODEL, threads=int(THREADS)))
    src = make_source(source, fps=0.0)
    src.open()
    cpu = choose_cpu("auto", available_cpus()) if pin else None
    if cpu is not None:
        os.sched_setaffinity(threading.get_native_id(), {cpu})
    try:
        while True:
            frame = src.read()
            if frame is not None:
                model_step(model, frame)
                counter.value += 1
    finally:
        src.close()


@dataclass
class Config:
    """One configuration: its main process, how to read its frame count, its client processes."""

    key: str
    label: str
    pid: int
    frames: Callable[[], int]
    server: Server | None = None
    clients: list[int] = field(default_factory=list)
    slices: list[dict[str, float]] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    # A dashboard's client processes, collected at the end: (viewer procs, their queue,
    # SSE/poll procs, their queue), then what they reported.
    client_handles: tuple[Any, ...] | None = None
    viewers: list[dict[str, Any]] = field(default_factory=list)
    side: list[dict[str, Any]] = field(default_factory=list)

    # A model-only worker: its loop is its process's main thread (for the loop breakdown).
    loop_is_main_thread: bool = False
    # A dashboard that runs and stops with this one (beside-serving: the serving-only one).
    companion: Server | None = None

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        if self.companion is not None:
            os.kill(self.companion.pid, signal.SIGSTOP)

    def cont(self) -> None:
        if self.companion is not None:
            os.kill(self.companion.pid, signal.SIGCONT)
        os.kill(self.pid, signal.SIGCONT)


def confine(pids: list[int], cpus: int | set[int] | None) -> None:
    """Every thread of the processes ``pids`` on ``cpus`` (one CPU: ``--clients-cpu``); None:
    leave them. Threads they start later inherit it."""
    if cpus is None:
        return
    mask = {cpus} if isinstance(cpus, int) else cpus
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), mask)


def clients_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(pid)
    return total


def _output(stats: dict[str, Any], name: str, key: str) -> float:
    return float(stats["outputs"].get(name, {}).get(key, 0))


def measure(config: Config, seconds: float) -> dict[str, float]:
    """One slice of ``config`` (already running): fps and, for a dashboard, where it went."""
    server = config.server
    tid = None
    s0: dict[str, Any] = {}
    if server is not None:
        s0 = server.stats()
        tid = s0["loop_thread_id"]
    elif config.loop_is_main_thread:
        tid = config.pid  # a model-only worker's loop is its process's main thread
    f0 = int(s0["frames"]) if s0 else config.frames()
    companion0 = config.companion.stats() if config.companion is not None else {}
    c0, k0 = cpu_seconds(config.pid), clients_cpu(config.clients)
    l0 = thread_sched(config.pid, tid) if tid else (0.0, 0.0)
    m0, w0 = machine_ticks(), time.monotonic()
    time.sleep(seconds)
    s1: dict[str, Any] = server.stats() if server is not None else {}
    f1 = int(s1["frames"]) if s1 else config.frames()
    companion1 = config.companion.stats() if config.companion is not None else {}
    c1, k1 = cpu_seconds(config.pid), clients_cpu(config.clients)
    l1 = thread_sched(config.pid, tid) if tid else (0.0, 0.0)
    m1, w1 = machine_ticks(), time.monotonic()
    elapsed = w1 - w0
    frames = max(f1 - f0, 1)
    out = {
        "fps": (f1 - f0) / elapsed,
        "cpu_percent": 100.0 * (c1 - c0) / elapsed,
        "clients_cpu_percent": 100.0 * (k1 - k0) / elapsed,
        "machine_busy_percent": 100.0 * (os.cpu_count() or 1) * (m1[0] - m0[0])
        / max(1, m1[1] - m0[1]),
        "seconds": elapsed,
    }
    if companion1:
        out.update(serving_fps=(companion1["frames"] - companion0["frames"]) / elapsed,
                   **delivered(companion0, companion1, elapsed))
    if tid:
        cpu, runq = (l1[0] - l0[0]) * 1000 / frames, (l1[1] - l0[1]) * 1000 / frames
        out.update(
            loop_frame_ms=elapsed * 1000 / frames, loop_cpu_ms=cpu, loop_runq_ms=runq,
            loop_sleep_ms=max(0.0, elapsed * 1000 / frames - cpu - runq),
        )
    if s1:
        out.update(delivered(s0, s1, elapsed))
    return out


def delivered(s0: dict[str, Any], s1: dict[str, Any], elapsed: float) -> dict[str, float]:
    """What a dashboard's outputs did between two /api/stats readings, per second."""
    return {
        "encodes_per_s": (s1["jpeg"]["encodes_total"] - s0["jpeg"]["encodes_total"]) / elapsed,
        "sent_per_s": (s1["frames_sent"] - s0["frames_sent"]) / elapsed,
        "fifo_fps": (_output(s1, "fifo", "frames_written")
                     - _output(s0, "fifo", "frames_written")) / elapsed,
        "mqtt_per_s": (_output(s1, "iot", "sent") - _output(s0, "iot", "sent")) / elapsed,
    }


@contextlib.contextmanager
def dashboard_config(key: str, label: str, source: str, mqtt: tuple[int, int], tmp: str,
                     viewers: int, stop_clients: Any, clients_at: int | None,
                     *extra: str, product: Path = PRODUCT) -> Iterator[Config]:
    fifo = os.path.join(tmp, f"{key}.mjpeg")
    with dashboard(source, "--source-fps", "0", "--fifo", fifo, "--fifo-res", "480p",
                   "--iot", "mqtt", "--mqtt", f"mqtt://127.0.0.1:{mqtt[0]}",
                   "--thing-name", f"bench-{key}", "--max-viewers", "200", *extra,
                   product=product) as server, \
            ffmpeg_reader(fifo) as reader:
        ctx = mp.get_context("spawn")
        far = time.time() + 24 * 3600  # the clients end on stop_clients, not on a clock
        procs, out = start_viewers(server.port, "/stream.mjpg?res=720p", viewers, time.time(), far,
                                   max_procs=2, stop=stop_clients)
        side = ctx.Queue()
        extra_procs = []
        if viewers:
            extra_procs = [
                ctx.Process(target=sse_process, args=(server.port, time.time(), far, side,
                                                      stop_clients), daemon=True),
                # A long timeout: while this configuration is stopped, a request waits for it.
                ctx.Process(target=poll_results_process, args=(server.port, 4.0, time.time(), far,
                                                               side, stop_clients, 600.0),
                            daemon=True),
            ]
        for p in extra_procs:
            p.start()
        config = Config(key, label, server.pid, lambda: int(server.stats()["frames"]), server)
        config.clients = [reader.pid] + [p.pid for p in procs + extra_procs if p.pid]
        confine(config.clients, clients_at)
        try:
            if viewers:  # everyone connected before the first slice
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    stats = server.stats()
                    if len(stats["viewers"]) >= viewers and stats["event_subscribers"] >= 1:
                        break
                    time.sleep(0.2)
            config.stop()
            config.client_handles = (procs, out, extra_procs, side)
            yield config
        finally:
            config.cont()


def wait_started(frames: Callable[[], int], alive: Callable[[], bool], what: str,
                 timeout: float = 120.0) -> None:
    """Until ``frames()`` reaches 30 (warm), or raise if the process died or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while frames() < 30:
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.2)


@contextlib.contextmanager
def seed_config(source: str, mqtt: tuple[int, int], tmp: str,
                clients_at: int | None) -> Iterator[Config]:
    fifo = os.path.join(tmp, "seed.mjpeg")
    os.mkfifo(fifo)
    counter_path = os.path.join(tmp, "seed.count")
    with open(counter_path, "wb") as f:
        f.write(b"\0" * 8)
    cmd = [sys.executable, str(ROOT / "bench" / "seed_baseline.py"), "--source", source,
           "--source-fps", "0", "--fifo", fifo, "--mqtt", f"mqtt://127.0.0.1:{mqtt[0]}",
           "--counter", counter_path]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env())
    try:
        with ffmpeg_reader(fifo) as reader, open(counter_path, "rb") as f:
            counts = mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)
            config = Config("seed", "seed design (FIFO + MQTT)", proc.pid,
                            lambda: int(struct.unpack_from("Q", counts, 0)[0]))
            config.clients = [reader.pid]
            confine(config.clients, clients_at)
            wait_started(config.frames, lambda: proc.poll() is None, "the seed baseline")
            config.stop()
            try:
                yield config
            finally:
                config.cont()
    finally:
        stop_process(proc)


@contextlib.contextmanager
def model_only_config(source: str, pin: bool = False) -> Iterator[Config]:
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0, lock=False)
    proc = ctx.Process(target=model_only_forever, args=(source, counter, pin), daemon=True)
    proc.start()
    try:
        wait_started(lambda: int(counter.value), proc.is_alive, "the model-only worker")
        assert proc.pid is not None
        key, label = ("model-pinned", "model-only, its loop pinned like the dashboard's") if pin \
            else ("model-only", "model-only")
        config = Config(key, label, proc.pid, lambda: int(counter.value),
                        loop_is_main_thread=True)
        config.stop()
        try:
            yield config
        finally:
            config.cont()
    finally:
        proc.terminate()
        proc.join(10)


# -- the machine's own bound: the model beside the serving work, or a busy unrelated process ------
def trivial_classifier(path: str) -> None:
    """A 5-class ONNX classifier on a 32x32 input (mean colour -> linear -> softmax): a loop that
    costs next to nothing, so a dashboard running it is its serving work alone."""
    from tests.onnx_graphs import classifier

    Path(path).write_bytes(classifier(num_classes=5, size=32))


def serving_cpus() -> set[int]:
    """The CPUs the dashboard keeps its serving threads on (all but the loop's)."""
    from inference.affinity import available_cpus, choose_cpu

    cpus = available_cpus() or set(os.sched_getaffinity(0))
    loop_cpu = choose_cpu("auto", cpus)
    return (cpus - {loop_cpu}) or cpus


def probe_worker(source: str, seconds: float) -> float:
    """The model alone on one decoded frame, no other thread: fps over ``seconds``."""
    from inference.models import load_model
    from inference.settings import Settings
    from inference.sources import make_source

    model = load_model(Settings(model=MODEL, threads=int(THREADS)))
    src = make_source(source, fps=0.0)
    src.open()
    try:
        frame = None
        while frame is None:
            frame = src.read()
    finally:
        src.close()
    for _ in range(10):
        model_step(model, frame)
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        model_step(model, frame)
        n += 1
    return n / (time.monotonic() - t0)


def probe(source: str, seconds: float) -> float:
    code = f"from bench.overhead import probe_worker; print(probe_worker({source!r}, {seconds!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=child_env(), timeout=seconds + 120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def contention(source: str, pairs: int = 3, seconds: float = 5.0) -> list[float]:
    """What the second vCPU costs the first: the model alone, then the same while another process
    spins pure Python (no memory, no I/O shared with it) on the other vCPU. Per-pair ratios."""
    ratios = []
    spin = "import time\nend = time.monotonic() + 300\nwhile time.monotonic() < end:\n    pass\n"
    for _ in range(pairs):
        alone = probe(source, seconds)
        burner = subprocess.Popen([sys.executable, "-c", spin])
        try:
            busy = probe(source, seconds)
        finally:
            stop_process(burner)
        ratios.append(busy / alone)
    return ratios


def run(args: argparse.Namespace) -> list[Config]:
    source = args.source or demo_clip()
    ctx = mp.get_context("spawn")
    stop_clients = ctx.Event()
    with contextlib.ExitStack() as stack:
        mqtt = stack.enter_context(mosquitto())
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        clients_at = None if args.clients_cpu == "off" else int(args.clients_cpu)
        confine([mqtt[1]], clients_at)
        model = stack.enter_context(model_only_config(source))
        outputs = f"{args.viewers} viewers, SSE, /results, FIFO, MQTT"
        # The serving-only dashboard's pace: the rate the target asks of the real one.
        model.cont()
        try:
            time.sleep(args.settle)
            pace = round(measure(model, 2 * args.slice)["fps"] * TARGET, 1)
        finally:
            model.stop()
        tiny = os.path.join(tmp, "trivial.onnx")
        trivial_classifier(tiny)
        serving = stack.enter_context(dashboard_config(
            "serving", "serving-only dashboard", source, mqtt, tmp, args.viewers, stop_clients,
            clients_at, "--model", tiny, "--model-type", "classification",
            "--source-fps", str(pace), "--loop-cpu", "off"))
        assert serving.server is not None
        serving_at = serving_cpus()
        confine([serving.pid], serving_at)
        print(f"beside-serving: the serving-only dashboard paced at {pace:g} fps on CPU(s) "
              f"{','.join(map(str, sorted(serving_at)))}", flush=True)
        configs = [
            stack.enter_context(dashboard_config(
                "dashboard", f"dashboard, everything on ({outputs})", source, mqtt, tmp,
                args.viewers, stop_clients, clients_at)),
            stack.enter_context(dashboard_config(
                "unpinned", f"dashboard, everything on, --loop-cpu off --serving-nice 0 ({outputs})",
                source, mqtt, tmp, args.viewers, stop_clients, clients_at,
                "--loop-cpu", "off", "--serving-nice", "0")),
            stack.enter_context(dashboard_config(
                "seed-outputs", "dashboard, the seed's outputs only (FIFO + MQTT)", source, mqtt,
                tmp, 0, stop_clients, clients_at)),
            stack.enter_context(seed_config(source, mqtt, tmp, clients_at)),
            stack.enter_context(model_only_config(source, pin=True)),
        ]
        pinned = configs[-1]
        for n, other in enumerate(args.compare, start=1):
            # Another checkout of the product, everything on, in the same run: a before/after.
            configs.insert(n, stack.enter_context(dashboard_config(
                f"compare{n}", f"dashboard of {other}, everything on ({outputs})", source, mqtt,
                tmp, args.viewers, stop_clients, clients_at, product=Path(other))))
        configs.append(Config(
            "beside-serving", f"model-only, pinned, beside a serving-only dashboard ({outputs}, "
            f"trivial model, {pace:g} fps, in another process on the other CPU)", pinned.pid,
            pinned.frames, loop_is_main_thread=True, companion=serving.server))
        def slice_of(config: Config) -> dict[str, float]:
            config.cont()
            try:
                time.sleep(args.settle)
                return measure(config, args.slice)
            finally:
                config.stop()

        try:
            # model, config 1, model, config 2, ..., model: every configuration's slice lies
            # between two model-only slices, one slice length away on each side.
            before = slice_of(model)
            model.slices.append(before)
            for cycle in range(args.cycles):
                line = []
                for config in configs:
                    res = slice_of(config)
                    after = slice_of(model)
                    model.slices.append(after)
                    ref = (before["fps"] + after["fps"]) / 2
                    config.slices.append(res)
                    config.ratios.append(res["fps"] / ref)
                    line.append(f"{config.key} {res['fps']:.1f}/{ref:.1f} "
                                f"x{res['fps'] / ref:.3f}")
                    before = after
                print(f"cycle {cycle + 1}: " + " | ".join(line), flush=True)
        finally:
            for config in configs:
                config.cont()
            model.cont()
            stop_clients.set()
            for config in [*configs, serving]:
                if config.client_handles is None:
                    continue
                procs, out, extra_procs, side = config.client_handles
                config.viewers = collect_viewers(procs, out)
                config.side = [side.get(timeout=30) for _ in extra_procs]
                for p in extra_procs:
                    p.join(10)
    return [model, *configs, serving]


def med(config: Config, key: str) -> float:
    return median([s[key] for s in config.slices if key in s])


def report(configs: list[Config], args: argparse.Namespace) -> None:
    model, *others, serving = configs
    print()
    print("| configuration | loop fps (median) | x model-only (median of slices) | slices "
          "(min..max) | process CPU % | client-side CPU % |")
    print("|---|---:|---:|---|---:|---:|")
    print(f"| model-only | {med(model, 'fps'):.1f} | 1.000 | - | {med(model, 'cpu_percent'):.0f} "
          "| - |")
    for c in others:
        print(f"| {c.label} | {med(c, 'fps'):.1f} | {median(c.ratios):.3f} | "
              f"{min(c.ratios):.3f}..{max(c.ratios):.3f} | {med(c, 'cpu_percent'):.0f} | "
              f"{med(c, 'clients_cpu_percent'):.0f} |")
    print()
    print("Where the loop thread's time per frame goes (ms, medians of slices; kernel schedstat; "
          "a model-only worker's loop is its main thread):")
    print()
    print("| configuration | frame | on a CPU | runnable, waiting for a CPU | asleep (GIL, locks, "
          "source) | whole machine busy (of 200 %) |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in (model, *others):
        if not any("loop_cpu_ms" in s for s in c.slices):
            continue
        print(f"| {c.label} | {med(c, 'loop_frame_ms'):.2f} | {med(c, 'loop_cpu_ms'):.2f} | "
              f"{med(c, 'loop_runq_ms'):.2f} | {med(c, 'loop_sleep_ms'):.2f} | "
              f"{med(c, 'machine_busy_percent'):.0f} % |")
    print()
    print("What each dashboard delivered while it ran (medians of slices; viewers: client-side, "
          "parts received over the time it ran):")
    print()
    for c in others:
        if c.server is None:
            continue
        active = sum(s["seconds"] for s in c.slices) + args.settle * len(c.slices)
        viewers = [v for v in c.viewers if v["status"] == 200]
        fps = [v["parts"] / active for v in viewers]
        side = c.side
        sse = next((r for r in side if "events" in r), None)
        poll = next((r for r in side if "ok" in r), None)
        parts = [f"encodes {med(c, 'encodes_per_s'):.1f}/s", f"FIFO {med(c, 'fifo_fps'):.1f} fps",
                 f"MQTT {med(c, 'mqtt_per_s'):.1f}/s"]
        if viewers:
            parts.insert(0, f"{len(viewers)} viewers: median {median(fps):.1f} min {min(fps):.1f} "
                            f"fps (server sent {med(c, 'sent_per_s'):.0f} parts/s)")
        if sse is not None:
            parts.append(f"SSE {sse['events'] / active:.1f} events/s")
        if poll is not None:
            parts.append(f"/results {poll['ok']} ok {poll['errors']} errors "
                         f"({poll.get('reconnects', 0)} retried on a new connection after the "
                         "server closed an idle keep-alive one)")
        print(f"- {c.key}: " + ", ".join(parts))
    beside = next(c for c in others if c.key == "beside-serving")
    active = sum(s["seconds"] for s in beside.slices) + args.settle * len(beside.slices)
    fps = [v["parts"] / active for v in serving.viewers if v["status"] == 200]
    print(f"- beside-serving, the serving-only dashboard: published {med(beside, 'serving_fps'):.1f}"
          f" fps, {len(fps)} viewers: median {median(fps) if fps else 0:.1f} min "
          f"{min(fps) if fps else 0:.1f} fps (server sent {med(beside, 'sent_per_s'):.0f} parts/s), "
          f"encodes {med(beside, 'encodes_per_s'):.1f}/s, FIFO {med(beside, 'fifo_fps'):.1f} fps, "
          f"MQTT {med(beside, 'mqtt_per_s'):.1f}/s")
    print()
    by_key = {c.key: c for c in others}
    ratio = median(by_key["dashboard"].ratios)
    print(f"- dashboard (everything on) / model-only = {ratio:.3f} (target >= {TARGET}): "
          f"{'PASS' if ratio >= TARGET else 'FAIL'}")
    print(f"- the same without the loop's CPU isolation and the serving threads' lower priority: "
          f"x{median(by_key['unpinned'].ratios):.3f}")
    print(f"- same outputs as the seed: dashboard x{median(by_key['seed-outputs'].ratios):.3f} vs "
          f"seed x{median(by_key['seed'].ratios):.3f} of model-only")
    pinned = median(by_key["model-pinned"].ratios)
    print(f"- pinning alone: model-only with its loop pinned runs at x{pinned:.3f} of model-only; "
          f"the dashboard against that: x{ratio / pinned:.3f}")
    bound = median(by_key["beside-serving"].ratios)
    print(f"- the serving work alone: the pinned model beside a serving-only dashboard (same outputs "
          f"and clients, in another process on the other CPU) runs at x{bound:.3f} of model-only; "
          f"the dashboard against that: x{ratio / bound:.3f} (what sharing one process costs)")
    print("- client-side CPU = the viewer and SSE/poll client processes and ffmpeg, on this machine "
          "(mosquitto, shared by all, not counted)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="", help="a video file (default: bikes.mp4)")
    parser.add_argument("--cycles", type=int, default=16)
    parser.add_argument("--compare", action="append", default=[], metavar="DIR",
                        help="also run the dashboard of another checkout (e.g. the code before a "
                        "change), everything on, in the same slices (repeatable)")
    parser.add_argument("--slice", type=float, default=2.0, help="seconds measured per slice")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds each configuration runs before its slice is measured")
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--clients-cpu", default="off", metavar="N|off",
                        help="keep every client process (viewers, SSE/poll, ffmpeg, mosquitto) on "
                             "CPU N, as clients on other machines would leave the loop's CPU alone "
                             "(default off: the scheduler places them)")
    parser.add_argument("--no-contention", action="store_true",
                        help="skip the model-beside-a-spinning-process probe at the end")
    args = parser.parse_args()
    source = args.source or demo_clip()
    if args.clients_cpu != "off" and (not args.clients_cpu.isdigit()
                                      or int(args.clients_cpu) not in os.sched_getaffinity(0)):
        parser.error(f"--clients-cpu: expected off or a CPU this process may use, "
                     f"got {args.clients_cpu!r}")
    clients = "" if args.clients_cpu == "off" else f", clients on CPU {args.clients_cpu}"
    print(f"overhead: source {Path(source).name} unpaced, {args.viewers} viewers at ?res=720p, "
          f"{args.cycles} cycles of {args.slice:g} s slices (+{args.settle:g} s settle)"
          f"{clients}{'' if THREADS == '1' else f', ONNX Runtime threads {THREADS}'}; {machine()}",
          flush=True)
    configs = run(args)
    report(configs, args)
    if not args.no_contention:
        ratios = contention(source)
        bound = median(ratios)
        verdict = ("a busy neighbour alone slows the model" if bound < TARGET
                   else "a busy neighbour alone does not explain a gap")
        print(f"- the machine's bound: the model alone runs at x{bound:.3f} of its speed (pairs: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}) while one other process spins on the "
              f"second vCPU (no shared data, no I/O): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
