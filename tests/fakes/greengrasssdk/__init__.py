"""Fake ``greengrasssdk`` 1.6.1 (tests only), faithful to its documented behaviour:

- ``client('iot-data')`` outside a Greengrass core raises
  ``ModuleNotFoundError: No module named 'greengrass_common'``; the fake "core" is present when
  ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` and ``MY_FUNCTION_ARN`` are set, as on a core.
- ``publish(*, topic, payload, queueFullPolicy='')`` keyword-only, returns None; a missing topic
  raises ValueError; a str payload breaks the IPC call under Python 3 (raised here as TypeError).
  Published messages are kept in ``published`` and appended as JSON lines to
  ``FAKE_GREENGRASS_LOG`` when set, so a subprocess test can read them.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from typing import Any

published: list[dict[str, Any]] = []
_lock = threading.Lock()
fail_publish = False  # tests may set: publish raises as a failing IPC does


class InvocationException(Exception):
    pass


class IotDataClient:
    def publish(self, **kwargs: Any) -> None:
        if "topic" not in kwargs or not kwargs["topic"]:
            raise ValueError("Parameter 'topic' is required")
        payload = kwargs.get("payload", b"")
        policy = kwargs.get("queueFullPolicy", "")
        if policy not in ("", "BestEffort", "AllOrException"):
            raise ValueError(f"bad queueFullPolicy {policy!r}")
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError("payload must be bytes under Python 3")
        if fail_publish or os.environ.get("FAKE_GREENGRASS_FAIL"):
            raise InvocationException("IPC publish failed")
        entry = {"topic": kwargs["topic"], "payload": bytes(payload)}
        with _lock:
            published.append(entry)
            log = os.environ.get("FAKE_GREENGRASS_LOG")
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"topic": entry["topic"],
                                        "payload_b64": base64.b64encode(entry["payload"]).decode()})
                            + "\n")
        return None


def client(client_type: str, *args: Any, **kwargs: Any) -> IotDataClient:
    if client_type != "iot-data":
        raise Exception(f"unsupported client type {client_type!r}")
    if not (os.environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN") and os.environ.get("MY_FUNCTION_ARN")):
        raise ModuleNotFoundError("No module named 'greengrass_common'", name="greengrass_common")
    return IotDataClient()
