"""``/health``, ``/api/stats``, ``/metrics`` and ``/api/iot/messages``: how the device is doing."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from app.broadcast import Broadcaster
from app.deps import ServiceDep, ViewDep
from app.routes import PrettyJSONResponse
from inference.service import Service

router = APIRouter(tags=["health"])

STALL_SECONDS = 5.0  # a running loop without a frame this long is a stalled camera
OPENING_SECONDS = 3.0  # a source still opening after this is shown (an RTSP camera takes ~1-2 s)
MODEL_ERROR_WINDOW = 30.0
PIPELINE_STATES = {
    "running": "running",
    "paused": "paused on request (POST /api/pipeline/resume goes on)",
    "stopped": "stopped on request (POST /api/pipeline/start starts it again)",
}


def _broadcaster(request: Request) -> Broadcaster | None:
    return getattr(request.app.state, "broadcaster", None)


def health_report(service: Service, fallbacks: Sequence[str] = ()) -> dict[str, Any]:
    """``fallbacks``: settings that could not be used and what runs instead (the Lambda, which
    has no command line to refuse them, comes up without them)."""
    loop, capture = service.loop, service.capture
    stats = loop.stats
    state = loop.state.value
    reasons: list[str] = [f"settings: {message}" for message in fallbacks]

    camera: dict[str, Any] = {"ok": True, "consecutive_failures": capture.consecutive_failures,
                              "last_error": capture.last_error}
    if capture.consecutive_failures:
        camera["ok"] = False
        reasons.append(f"camera: {capture.last_error or 'no frame'} "
                       f"({capture.consecutive_failures} failed reads in a row)")
    elif state == "running" and stats.last_frame_time:
        stalled = time.time() - stats.last_frame_time
        if stalled > STALL_SECONDS:
            camera["ok"] = False
            reasons.append(f"camera: no frame for {stalled:.0f} s")
    stuck = _stuck_source(capture)
    if stuck:
        camera["ok"] = False
        reasons.append(stuck)

    model_info = loop.model.info.to_json() if loop.model else None
    model: dict[str, Any] = {"ok": True, "model": model_info, "errors": stats.model_errors,
                             "last_error": stats.last_model_error}
    if stats.model_load_error or loop.model is None:
        model["ok"] = False
        reasons.append(f"model: not loaded: {stats.model_load_error or 'no model'}")
    else:
        age = stats.model_error_age()
        if age is not None and age < MODEL_ERROR_WINDOW:
            model["ok"] = False
            reasons.append(f"model: errors in the last {MODEL_ERROR_WINDOW:.0f} s: "
                           f"{stats.last_model_error}")

    outputs: dict[str, Any] = {}
    for output in service.outputs:
        try:
            ok, message = output.health()
        except Exception as exc:  # a broken health check is itself unhealthy, not a 500
            ok, message = False, f"health check failed: {exc}"
        outputs[output.name] = {"ok": ok, "message": message}
        if not ok:
            reasons.append(f"outputs: {output.name}: {message}")
    iot = service.iot
    if iot is not None:
        outputs[iot.name]["backlog"] = iot.backlog

    # A stopped or paused loop is what someone asked for (the page, the API): state to show, not
    # a fault to alert on. A monitor that wants it alerts on "state" itself.
    pipeline = {"ok": True, "state": state, "message": PIPELINE_STATES.get(state, state)}
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "state": state,
        "checks": {"pipeline": pipeline, "settings": {"ok": not fallbacks, "fallbacks": list(fallbacks)},
                   "camera": camera, "model": model, "outputs": outputs},
    }


def _stuck_source(capture: Any) -> str:
    """The loop waiting on its source too long (a stream that accepts and never answers, a
    driver that hangs), which no failed read reports while it lasts; '' otherwise."""
    waiting = capture.waiting()
    if waiting is None:
        return ""
    what, seconds = waiting
    if what == "opening":
        return f"source: opening {capture.name} for {seconds:.0f} s" if seconds > OPENING_SECONDS else ""
    fps = getattr(capture.source, "fps", 0) or 0
    paced = 2.0 / fps if fps > 0 else 0.0  # a paced source waits for its next frame on purpose
    if seconds > STALL_SECONDS + paced:
        return f"source: no frame for {seconds:.0f} s (a read of {capture.name} has not returned)"
    return ""


@router.get("/health", response_class=PrettyJSONResponse, summary="ok or degraded, with the reasons")
async def health(request: Request, service: ServiceDep) -> PrettyJSONResponse:
    """Always 200 while the server answers; ``status`` is ``ok`` or ``degraded`` (faults only)
    and ``reasons`` names the part (settings, camera, model, outputs); ``state`` is the
    pipeline's (running, paused, stopped)."""
    return PrettyJSONResponse(health_report(service, getattr(request.app.state, "fallbacks", ())))


def stats_report(service: Service, broadcaster: Broadcaster | None,
                 edge: Any = None) -> dict[str, Any]:
    loop, hub = service.loop, service.hub
    viewers = list(broadcaster.viewers.values()) if broadcaster else []
    subscribers = list(broadcaster.subscribers.values()) if broadcaster else []
    outputs: dict[str, Any] = {}
    for output in service.outputs:
        try:
            outputs[output.name] = output.stats()
        except Exception as exc:
            outputs[output.name] = {"error": str(exc)}
    encodes = dict(hub.encodes)
    total = sum(encodes.values())
    return {
        "state": loop.state.value,
        "capture_fps": round(broadcaster.publish_rate.per_second(), 2) if broadcaster else 0.0,
        "inference_fps": round(loop.stats.fps, 2),
        "delivered_fps": round(broadcaster.delivered.per_second(), 2) if broadcaster else 0.0,
        "frames": loop.stats.frames,
        "loop_thread_id": loop.stats.thread_id,
        # --loop-cpu: the CPU the loop keeps to itself (null: not isolated), --serving-nice.
        "loop_cpu": loop.isolation.to_json() if loop.isolation is not None else None,
        "serving_nice": {"setting": service.settings.serving_nice,
                         "encoders": broadcaster.encoder_nice if broadcaster else {}},
        "published": hub.published,
        "seq": hub.seq,
        "stage_ms": {k: round(v, 3) for k, v in loop.stats.stage_ms.items()},
        "model_errors": loop.stats.model_errors,
        "capture_failures": service.capture.failures,
        "jpeg": {
            "encodes": encodes,
            "encodes_total": total,
            "encode_ms_avg": round(hub.encode_seconds * 1000 / total, 3) if total else 0.0,
        },
        "frames_sent": broadcaster.frames_sent if broadcaster else 0,
        "frames_skipped": broadcaster.skipped_total if broadcaster else 0,
        "viewers_rejected": broadcaster.rejected if broadcaster else 0,
        # viewers and subscribers aborted for taking no data (issue 16.4)
        "viewers_evicted": broadcaster.evicted if broadcaster else 0,
        # what the server's edge refused or closed: heads too large, header timeouts, the cap
        "connections": edge.stats() if edge is not None else None,
        "viewers": [v.to_json() for v in viewers],
        "event_subscribers": len(subscribers),
        "outputs": outputs,
    }


@router.get("/api/stats", response_class=PrettyJSONResponse, summary="Rates, encodes and viewers",
            dependencies=[ViewDep])
async def api_stats(request: Request, service: ServiceDep) -> PrettyJSONResponse:
    """Capture, inference and delivered fps; JPEG encodes per resolution; each viewer with its
    fps and the frames it skipped; the outputs' own stats."""
    return PrettyJSONResponse(stats_report(service, _broadcaster(request),
                                           getattr(request.app.state, "edge", None)))


class DashboardCollector:
    """Reads the service at scrape time: no counters to keep in step with the loop."""

    def __init__(self, service: Service, app_state: Any) -> None:
        self.service = service
        self.app_state = app_state

    def collect(self) -> Iterator[Metric]:
        loop, hub = self.service.loop, self.service.hub
        stats = loop.stats
        broadcaster: Broadcaster | None = getattr(self.app_state, "broadcaster", None)

        yield CounterMetricFamily("deeplens_frames", "Frames processed by the loop", stats.frames)
        yield CounterMetricFamily("deeplens_model_errors", "Frames the model failed on",
                                  stats.model_errors)
        yield CounterMetricFamily("deeplens_capture_failures", "Failed frame reads",
                                  self.service.capture.failures)
        yield GaugeMetricFamily("deeplens_inference_fps", "Loop frames per second", stats.fps)
        stage = GaugeMetricFamily("deeplens_stage_ms", "Average milliseconds per stage",
                                  labels=["stage"])
        for name, ms in stats.stage_ms.items():
            stage.add_metric([name], ms)
        yield stage
        encodes = CounterMetricFamily("deeplens_jpeg_encodes", "JPEG encodes by resolution",
                                      labels=["res"])
        for res, count in hub.encodes.items():
            encodes.add_metric([res], count)
        yield encodes
        state = GaugeMetricFamily("deeplens_pipeline_state", "1 for the current state",
                                  labels=["state"])
        current = loop.state.value
        for name in ("running", "paused", "stopped"):
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        viewers = len(broadcaster.viewers) if broadcaster else 0
        subscribers = len(broadcaster.subscribers) if broadcaster else 0
        yield GaugeMetricFamily("deeplens_viewers", "Connected MJPEG viewers", viewers)
        yield GaugeMetricFamily("deeplens_event_subscribers", "Connected SSE subscribers", subscribers)
        yield CounterMetricFamily("deeplens_frames_sent", "MJPEG parts sent to viewers",
                                  broadcaster.frames_sent if broadcaster else 0)
        yield CounterMetricFamily("deeplens_frames_skipped", "Frames viewers skipped (slow or capped)",
                                  broadcaster.skipped_total if broadcaster else 0)
        yield CounterMetricFamily("deeplens_viewers_evicted",
                                  "Viewers and subscribers dropped for taking no data",
                                  broadcaster.evicted if broadcaster else 0)
        edge = getattr(self.app_state, "edge", None)
        if edge is not None:
            refused = CounterMetricFamily(
                "deeplens_connections_refused", "Connections refused or closed at the server's "
                "edge, by reason", labels=["reason"])
            for reason, count in edge.counts.items():
                refused.add_metric([reason], count)
            yield refused
        healthy = GaugeMetricFamily("deeplens_output_healthy", "1 when the output is healthy",
                                    labels=["output"])
        for output in self.service.outputs:
            try:
                ok = output.health()[0]
            except Exception:
                ok = False
            healthy.add_metric([output.name], 1.0 if ok else 0.0)
        yield healthy
        model = loop.model
        if model is not None:
            info = model.info
            yield InfoMetricFamily("deeplens_model", "The model the loop runs", value={
                "name": info.name, "type": info.type, "backend": info.backend,
                "input_size": f"{info.input_width}x{info.input_height}"})
        yield from self._iot()
        yield from self._fifo()

    def _iot(self) -> Iterator[Metric]:
        iot = self.service.iot
        if iot is None:
            return
        stats = iot.stats()
        yield CounterMetricFamily("deeplens_iot_messages_sent", "IoT messages handed to the publisher",
                                  stats["sent"])
        dropped = CounterMetricFamily(
            "deeplens_iot_messages_dropped", "IoT messages lost: queue = the publisher thread fell "
            "behind the loop, backlog = the broker was away longer than --iot-queue",
            labels=["reason"])
        dropped.add_metric(["queue"], stats["dropped_queue"])
        dropped.add_metric(["backlog"], stats["dropped_backlog"])
        yield dropped
        skipped = CounterMetricFamily(
            "deeplens_iot_messages_skipped", "Inferences not published by choice (--iot-max-rate, "
            "--iot-on-change, nothing above the threshold)", labels=["reason"])
        for reason in ("rate", "unchanged", "empty"):
            skipped.add_metric([reason], stats.get(f"skipped_{reason}", 0))
        yield skipped
        yield GaugeMetricFamily("deeplens_iot_backlog", "IoT messages waiting for the broker",
                                stats["backlog"])
        yield CounterMetricFamily("deeplens_iot_publish_errors", "IoT publishes that failed",
                                  stats["errors"])
        yield GaugeMetricFamily("deeplens_iot_connected", "1 while the publisher can send",
                                1.0 if stats["connected"] else 0.0)

    def _fifo(self) -> Iterator[Metric]:
        fifo = self.service.fifo
        if fifo is None:
            return
        stats = fifo.stats()
        for key, help_text in (
            ("frames_written", "Frames written whole to the project-stream FIFO"),
            ("frames_dropped", "Frames not written because the FIFO reader was behind"),
            ("bytes_written", "Bytes written to the project-stream FIFO"),
            ("readers", "FIFO readers served since start"),
            ("errors", "FIFO writer errors"),
        ):
            yield CounterMetricFamily(f"deeplens_fifo_{key}", help_text, stats[key])
        yield GaugeMetricFamily("deeplens_fifo_reader_connected", "1 while a reader has the FIFO open",
                                1.0 if stats["reader"] else 0.0)


def make_registry(service: Service, app_state: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DashboardCollector(service, app_state))
    # process_cpu_seconds_total, process_resident_memory_bytes, open fds (Linux /proc; elsewhere
    # it yields nothing)
    ProcessCollector(registry=registry)
    return registry


@router.get("/metrics", response_class=Response, summary="Prometheus text format",
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/iot/messages", response_class=PrettyJSONResponse, summary="The last IoT messages",
            dependencies=[ViewDep])
async def iot_messages(service: ServiceDep) -> PrettyJSONResponse:
    """The IoT output's recent messages (topic, payload, time), newest last; [] without one."""
    iot = service.iot
    return PrettyJSONResponse(iot.recent_messages() if iot is not None else [])
