"""The loop's CPU: a core of its own (--loop-cpu), serving threads below it (--serving-nice), and
each result published as soon as it is made (before the next frame's preprocess), the loop run by
its Service."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from inference import affinity
from inference.affinity import (
    CpuIsolation,
    choose_cpu,
    lower_priority,
    parse_loop_cpu,
    serving_thread,
)
from inference.compat import native_thread_id
from inference.models.parse import CutsAfterParsing
from inference.pipeline.frames import Frame, FrameHub
from inference.service import Service
from inference.settings import ConfigError, Settings
from inference.types import Image, ModelInfo

LINUX = sys.platform.startswith("linux")
CPUS = affinity.available_cpus()


def thread_cpus(tid: int) -> set[int]:
    return set(os.sched_getaffinity(tid))


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def parse_value(name: str, value: str) -> Any:
    """One option given as a flag, validated as the CLI does."""
    return getattr(Settings.load(flags={name: value}, env={}), name)


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# -- choosing and parsing ------------------------------------------------------------------------
def test_choose_cpu() -> None:
    two = frozenset({0, 1})
    assert choose_cpu("auto", two) == 1  # the last CPU; interrupts favour the first
    assert choose_cpu("auto", frozenset({0, 2, 5})) == 5
    assert choose_cpu("0", two) == 0
    assert choose_cpu("off", two) is None
    assert choose_cpu("auto", frozenset({3})) is None  # one CPU: nothing to keep apart
    assert choose_cpu("auto", None) is None  # no affinity calls on this OS
    assert choose_cpu("auto", two, gpu_model=True) is None  # a GPU model's loop mostly waits
    assert choose_cpu("1", two, gpu_model=True) == 1  # asked for explicitly: done anyway


def test_auto_threads_leave_one_cpu_to_serving() -> None:
    assert affinity.auto_threads("auto", frozenset({0, 1})) == 1  # then isolated by auto
    assert affinity.auto_threads("auto", frozenset({0, 1, 2, 3})) == 3
    assert affinity.auto_threads("1", frozenset({0, 1})) == 1
    assert affinity.auto_threads("3", frozenset({0, 1, 2, 3})) == 1  # pinned by number: one CPU
    assert affinity.auto_threads("off", frozenset({0, 1})) == 0  # ONNX Runtime's own default
    assert affinity.auto_threads("auto", frozenset({0})) == 0
    assert affinity.auto_threads("auto", None) == 0


def test_the_default_model_gets_the_auto_thread_count() -> None:
    from inference.models import load_model

    expected = affinity.auto_threads("auto", CPUS)
    model = load_model(Settings(model="efficientnet-lite0"))
    assert model.info.threads == expected
    assert load_model(Settings(model="efficientnet-lite0", threads=3)).info.threads == 3


def test_loop_cpu_values_are_checked_against_this_machine() -> None:
    assert parse_loop_cpu(" Auto ") == "auto"
    assert parse_loop_cpu("off") == "off"
    with pytest.raises(ValueError, match="expected auto, off or a CPU number"):
        parse_loop_cpu("fast")
    with pytest.raises(ConfigError, match="--loop-cpu"):
        parse_value("loop_cpu", "fast")
    if CPUS is not None:
        cpu = max(CPUS)
        assert parse_loop_cpu(str(cpu)) == str(cpu)
        with pytest.raises(ValueError, match="not available to this process"):
            parse_loop_cpu(str(max(CPUS) + 1000))


def test_serving_nice_is_checked() -> None:
    assert parse_value("serving_nice", "19") == 19
    assert Settings().serving_nice == 10 and Settings().loop_cpu == "auto"
    with pytest.raises(ConfigError, match="--serving-nice: Input should be less than or equal to 19"):
        parse_value("serving_nice", "20")


# -- isolation of a running loop -----------------------------------------------------------------
class ThreadedSource:
    """A source that, like VideoSource, starts a helper thread when the loop opens it."""

    name = "threaded"

    def __init__(self) -> None:
        self.helper_tid: int | None = None
        self._stop = threading.Event()
        self._frame = np.full((48, 64, 3), 90, np.uint8)

    def open(self) -> None:
        started = threading.Event()

        def helper() -> None:
            self.helper_tid = native_thread_id()
            started.set()
            self._stop.wait(30)

        self._stop = threading.Event()
        threading.Thread(target=helper, name="source-helper", daemon=True).start()
        started.wait(5)

    def read(self) -> Image | None:
        time.sleep(0.002)
        return self._frame.copy()

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        self._stop.set()


class TinyModel(CutsAfterParsing):
    """Records each call in order, for the publication order tests."""

    threads = 1  # intra-op threads, as ModelInfo.threads

    def __init__(self, events: list[str] | None = None) -> None:
        self.info = ModelInfo("tiny", "classification", 8, 8, "test", {0: "a", 1: "b"},
                              threads=self.threads)
        self.events = events if events is not None else []
        self.n = 0

    def preprocess(self, frame: Image) -> Any:
        self.n += 1
        self.events.append(f"preprocess {self.n}")
        return frame[:8, :8]

    def infer(self, inputs: Any) -> dict[str, Any]:
        self.events.append(f"infer {self.n}")
        time.sleep(0.001)
        return {"out": np.array([0.25, 0.75], np.float32)}

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        from inference.models import parse

        return parse.classification(raw["out"])

    def close(self) -> None:
        pass


@pytest.fixture
def run_loop() -> Iterator[Any]:
    """The loop over ``source`` and ``model`` run by a Service, once it made 5 frames."""
    services: list[Service] = []

    def make(settings: Settings, source: Any, model: Any) -> Service:
        service = Service(settings, lambda s: source, lambda s: model)
        services.append(service)
        service.prepare()
        service.start()
        assert wait_until(lambda: service.loop.stats.frames >= 5), "the loop made no frames"
        return service

    yield make
    for service in services:
        service.stop()


needs_linux = pytest.mark.skipif(not LINUX, reason="CPU affinity calls are Linux's")


@needs_linux
def test_the_loop_keeps_a_cpu_and_gives_it_back_when_it_stops(run_loop: Any) -> None:
    assert CPUS is not None
    if len(CPUS) < 2:  # one CPU to share: auto must leave it alone
        assert run_loop(Settings(source="x"), ThreadedSource(), TinyModel()).loop.isolation is None
        return
    tids: dict[str, int] = {}
    hold = threading.Event()

    def server(nice: int) -> None:  # a serving thread already running: an encoder, the event loop
        serving_thread(nice)
        tids["server"] = native_thread_id()
        hold.wait(30)

    def bystander() -> None:  # any other thread: the Greengrass runtime's, a library's
        tids["bystander"] = native_thread_id()
        hold.wait(30)

    threading.Thread(target=server, args=(0,), name="server", daemon=True).start()
    threading.Thread(target=bystander, name="bystander", daemon=True).start()
    assert wait_until(lambda: len(tids) == 2)
    source = ThreadedSource()
    try:
        service = run_loop(Settings(source="x", loop_cpu="auto"), source, TinyModel())
        loop = service.loop
        iso = loop.isolation
        assert iso is not None and iso.active and iso.cpu == max(CPUS)
        tid = loop.stats.thread_id
        assert tid is not None
        assert thread_cpus(tid) == {iso.cpu}
        others = set(CPUS) - {iso.cpu}
        assert thread_cpus(tids["server"]) == others
        assert thread_cpus(tids["bystander"]) == set(CPUS)  # not ours to move
        # Started by the loop thread (it inherited the loop's one CPU), given every CPU back at
        # once, as a video source's decoder threads are.
        assert source.helper_tid is not None and thread_cpus(source.helper_tid) == set(CPUS)

        late: list[int] = []

        def late_server() -> None:  # a serving thread started while the loop runs
            serving_thread(0)
            late.append(native_thread_id())
            hold.wait(30)

        threading.Thread(target=late_server, name="late-server", daemon=True).start()
        assert wait_until(lambda: bool(late))
        assert thread_cpus(late[0]) == others
        report = iso.to_json()
        assert report["cpu"] == iso.cpu and report["active"] and report["error"] is None
        assert report["serving_threads_moved"] >= 2 and report["threads_freed"] >= 1

        service.stop()
        assert loop.isolation is not None and not loop.isolation.active  # released by the loop
        assert thread_cpus(tids["server"]) == set(CPUS)
        assert thread_cpus(late[0]) == set(CPUS)
    finally:
        hold.set()


@needs_linux
def test_threads_that_inherit_the_loops_cpu_are_given_every_cpu_back(run_loop: Any) -> None:
    assert CPUS is not None
    if len(CPUS) < 2:
        assert run_loop(Settings(source="x"), ThreadedSource(), TinyModel()).loop.isolation is None
        return
    service = run_loop(Settings(source="x", loop_cpu="auto"), ThreadedSource(), TinyModel())
    iso = service.loop.isolation
    assert iso is not None
    tid: list[int] = []
    hold = threading.Event()

    def pool_worker() -> None:
        tid.append(native_thread_id())
        os.sched_setaffinity(0, {iso.cpu})  # as a pool started lazily from the loop thread is
        hold.wait(30)

    try:
        threading.Thread(target=pool_worker, name="pool-worker", daemon=True).start()
        assert wait_until(lambda: bool(tid) and thread_cpus(tid[0]) == {iso.cpu}, 5)
        # The loop re-checks every CHECK_INTERVAL seconds.
        assert wait_until(lambda: thread_cpus(tid[0]) == set(CPUS), affinity.CHECK_INTERVAL + 5)
    finally:
        hold.set()
        service.stop()


@needs_linux
def test_a_source_or_model_switched_from_a_serving_thread_gets_every_cpu() -> None:
    assert CPUS is not None
    if len(CPUS) < 2:
        pytest.skip("one CPU: the loop is never isolated (tested above)")
    sources: list[ThreadedSource] = []
    pools: list[int] = []

    def make_source(settings: Settings) -> ThreadedSource:
        sources.append(ThreadedSource())
        return sources[-1]

    def make_model(settings: Settings) -> TinyModel:
        # As ONNX Runtime starts its intra-op pool when a session is created.
        started = threading.Event()

        def pool() -> None:
            pools.append(native_thread_id())
            started.set()
            hold.wait(30)

        threading.Thread(target=pool, name="model-pool", daemon=True).start()
        started.wait(5)
        return TinyModel()

    hold = threading.Event()
    service = Service(Settings(source="a", model="m1", loop_cpu="auto"), make_source, make_model)
    service.prepare()
    service.start()
    try:
        assert wait_until(lambda: service.loop.stats.frames >= 5)
        iso = service.loop.isolation
        assert iso is not None and iso.active
        others = set(CPUS) - {iso.cpu}
        seen: dict[str, set[int]] = {}

        def serving_worker() -> None:  # the event loop's worker thread running a PATCH
            serving_thread(0)
            service.apply({"source": "b", "model": "m2"})
            seen["after"] = thread_cpus(native_thread_id())

        worker = threading.Thread(target=serving_worker, name="patch-worker", daemon=True)
        worker.start()
        worker.join(10)
        assert len(sources) == 2 and sources[1].helper_tid is not None and len(pools) == 2
        assert thread_cpus(sources[1].helper_tid) == set(CPUS)  # not the serving CPUs
        assert thread_cpus(pools[1]) == set(CPUS)
        assert seen["after"] == others  # the serving thread itself is confined again
    finally:
        hold.set()
        service.stop()
        for source in sources:
            source.close()


@needs_linux
def test_a_loop_that_waits_for_its_source_lets_go_of_its_cpu_and_takes_it_back_when_busy(
    run_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Isolation is for a loop the model paces: one that waits for its camera leaves room on its
    CPU, and keeping the serving threads off it would only queue them on the others."""
    assert CPUS is not None
    if len(CPUS) < 2:
        pytest.skip("one CPU: the loop is never isolated (tested above)")
    monkeypatch.setattr(affinity, "CHECK_INTERVAL", 0.1)
    source = ThreadedSource()
    waiting = threading.Event()
    waiting.set()
    source.ready = lambda: not waiting.is_set()  # type: ignore[method-assign]
    hold = threading.Event()
    tids: list[int] = []

    def server() -> None:
        serving_thread(0)
        tids.append(native_thread_id())
        hold.wait(30)

    threading.Thread(target=server, name="server", daemon=True).start()
    try:
        assert wait_until(lambda: bool(tids))
        service = run_loop(Settings(source="x", loop_cpu="auto"), source, TinyModel())
        iso = service.loop.isolation
        assert iso is not None and iso.active
        tid = service.loop.stats.thread_id
        others = set(CPUS) - {iso.cpu}
        # Never the next frame waiting: let go within an interval or two.
        assert wait_until(lambda: not iso.engaged, 5)
        assert thread_cpus(tids[0]) == set(CPUS)  # the serving thread may use the loop's CPU
        # Nobody watching: the loop itself stays where its caches are.
        assert thread_cpus(tid) == {iso.cpu} and iso.to_json()["loop_pinned"] is True
        # Someone watching (frames encoded for a viewer): the loop may step aside for them.
        watching = threading.Event()
        watching.set()

        def viewer() -> None:
            seq = 0
            while watching.is_set():
                item = service.hub.wait_newer(seq, 1.0)
                if item is not None:
                    encoded = service.hub.encode("native", item)
                    seq = encoded.seq if encoded is not None else item.seq

        threading.Thread(target=viewer, name="viewer", daemon=True).start()
        assert wait_until(lambda: thread_cpus(tid) == set(CPUS), 5)
        assert not iso.engaged and not iso.to_json()["loop_pinned"]
        watching.clear()
        assert wait_until(lambda: thread_cpus(tid) == {iso.cpu}, 5)  # nobody watches again
        report = iso.to_json()
        assert report["active"] and not report["engaged"] and report["saturation"] <= 0.25
        # The model falls behind its source (every frame finds the next one waiting): engage.
        waiting.clear()
        assert wait_until(lambda: iso.engaged, 5)
        assert thread_cpus(tid) == {iso.cpu} and thread_cpus(tids[0]) == others
        assert iso.to_json()["saturation"] >= 0.75 and iso.engagements >= 2
    finally:
        hold.set()


def test_off_leaves_every_thread_where_it_was(run_loop: Any) -> None:
    before = thread_cpus(native_thread_id()) if LINUX else None
    loop = run_loop(Settings(source="x", loop_cpu="off"), ThreadedSource(), TinyModel()).loop
    assert loop.isolation is None
    if LINUX:
        assert loop.stats.thread_id is not None
        assert thread_cpus(loop.stats.thread_id) == before
        assert thread_cpus(native_thread_id()) == before


def test_a_refused_affinity_call_leaves_the_loop_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(tid: int, cpus: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse, raising=False)
    iso = CpuIsolation(1, {0, 1})
    iso.apply()
    assert not iso.active and iso.error is not None and "not permitted" in iso.error
    iso.check(force=True)  # nothing more is attempted
    iso.release()


# -- serving threads' priority -------------------------------------------------------------------
@pytest.mark.skipif(not LINUX, reason="per-thread nice values are a Linux feature")
def test_lower_priority_is_per_thread_relative_to_the_process_and_idempotent() -> None:
    base = nice_of(0)
    seen: dict[str, Any] = {}

    def worker() -> None:
        seen["first"] = lower_priority(5)
        seen["again"] = lower_priority(5)
        seen["zero"] = lower_priority(0)
        seen["tid"] = native_thread_id()

    thread = threading.Thread(target=worker, name="nice-worker")
    thread.start()
    thread.join(5)
    assert seen["first"] == seen["again"] == seen["zero"] == min(19, affinity.BASE_NICE + 5)
    assert nice_of(0) == base  # this thread was not touched


# -- publication order ---------------------------------------------------------------------------
def record_publishes(hub: FrameHub, events: list[str]) -> None:
    """Log each of ``hub``'s publications into ``events``, in order with the model's calls."""
    publish = hub.publish

    def recorded(image: Image, result: Any, render: Any = None, size: Any = None) -> Frame:
        events.append(f"publish {result.seq}")
        return publish(image, result, render, size)

    hub.publish = recorded  # type: ignore[method-assign]


class PacedSource(ThreadedSource):
    name = "paced"

    def ready(self) -> bool:
        return False  # a camera slower than the model: the loop waits for each frame


@pytest.mark.parametrize("source_cls,deferred", [(ThreadedSource, True), (PacedSource, False)])
def test_a_result_is_published_before_the_next_inference_or_at_once(
    source_cls: Any, deferred: bool
) -> None:
    """With the next frame already waiting (the model sets the pace) frame n is published just
    before frame n+1's inference, while the model runs without the GIL; a loop that waits for its
    source publishes at once. Nothing is held back at pause."""
    events: list[str] = []
    model = TinyModel(events)
    service = Service(Settings(source="x", loop_cpu="off"), lambda s: source_cls(),
                      lambda s: model)
    record_publishes(service.hub, events)
    service.prepare()
    service.start()
    try:
        assert wait_until(lambda: service.loop.stats.frames >= 6)
    finally:
        service.pipeline("pause")
        assert wait_until(lambda: service.hub.seq == service.loop.stats.frames, 5), \
            "a result was held back"
        service.stop()
    # Frame n's publication against frame n+1's preprocess and inference.
    for n in (2, 3, 4):
        publish, pre_next, infer_next = (events.index(f"publish {n}"),
                                         events.index(f"preprocess {n + 1}"),
                                         events.index(f"infer {n + 1}"))
        if deferred:
            assert pre_next < publish < infer_next, events[:30]
        else:
            assert publish < pre_next, events[:30]


def test_nothing_is_held_back_at_stop() -> None:
    events: list[str] = []
    service = Service(Settings(source="x", loop_cpu="off"), lambda s: ThreadedSource(),
                      lambda s: TinyModel(events))
    record_publishes(service.hub, events)
    service.prepare()
    service.start()
    assert wait_until(lambda: service.loop.stats.frames >= 3)
    service.stop()
    assert service.hub.seq == service.loop.stats.frames


class ThreadedModel(TinyModel):
    threads = 2


def test_auto_does_not_pin_a_loop_whose_model_runs_several_threads(run_loop: Any) -> None:
    if CPUS is None or len(CPUS) < 2:
        pytest.skip("one CPU: the loop is never isolated, which test_the_loop_keeps_a_cpu asserts")
    assert run_loop(Settings(source="x"), ThreadedSource(), ThreadedModel()).loop.isolation is None
    asked = str(max(CPUS))  # asked for by number: done anyway
    assert run_loop(Settings(source="x", loop_cpu=asked), ThreadedSource(),
                    ThreadedModel()).loop.isolation is not None


class GpuModel(TinyModel):
    """A model on the device's GPU (awscam.Model with {'GPU': 1}): its loop mostly waits."""

    def __init__(self) -> None:
        super().__init__()
        self.info = ModelInfo("gpu", "classification", 8, 8, "awscam(runtime=0, GPU=1)",
                              {0: "a", 1: "b"}, gpu=True)


def test_auto_does_not_pin_a_loop_whose_model_runs_on_the_gpu(run_loop: Any) -> None:
    if CPUS is None or len(CPUS) < 2:
        pytest.skip("one CPU: the loop is never isolated, which test_the_loop_keeps_a_cpu asserts")
    assert run_loop(Settings(source="x"), ThreadedSource(), GpuModel()).loop.isolation is None
    asked = str(max(CPUS))  # asked for by number: done anyway
    assert run_loop(Settings(source="x", loop_cpu=asked), ThreadedSource(),
                    GpuModel()).loop.isolation is not None
