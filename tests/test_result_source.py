"""Every result names the file its frame came from: in its JSON (/results, infer) and in the
rich IoT payload, while the seed's payload stays exactly ``{label: prob}``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from inference.outputs.iot import Composer
from inference.pipeline.frames import Frame
from inference.result import Item, Origin, Result
from inference.settings import Settings
from inference.types import ModelInfo

INFO = ModelInfo("catdog", "classification", 224, 224, "onnx", {0: "dog", 1: "cat"})


def result(origin: Origin | None) -> Result:
    return Result(seq=7, timestamp=1.5, model=INFO, frame_size=(64, 48),
                  items=(Item(1, "cat", 0.9), Item(0, "dog", 0.05)), origin=origin)


def test_the_result_json_names_the_file() -> None:
    origin = Origin.of("/photos/cat.jpg")
    assert (origin.name, origin.path, origin.frame) == ("cat.jpg", "/photos/cat.jpg", None)
    assert result(origin).to_json()["source"] == {"name": "cat.jpg", "path": "/photos/cat.jpg"}
    clip = Origin.of("clips/bikes.mp4", 12).to_json()
    assert clip == {"name": "bikes.mp4", "path": "clips/bikes.mp4", "frame": 12}
    assert result(None).to_json()["source"] is None


def test_the_rich_iot_payload_names_the_file_and_the_seed_payload_does_not() -> None:
    frame = Frame(np.zeros((48, 64, 3), np.uint8), result(Origin.of("/photos/cat.jpg")))
    messages = Composer(Settings(iot_payload="rich"), clock=lambda: 0.0).inference(frame)
    rich = json.loads(messages[-1].payload)
    assert rich["source"] == {"name": "cat.jpg", "path": "/photos/cat.jpg"}
    assert rich["payload"] == {"cat": 0.9, "dog": 0.05}
    messages = Composer(Settings(iot_payload="seed"), clock=lambda: 0.0).inference(frame)
    assert json.loads(messages[-1].payload) == {"cat": 0.9, "dog": 0.05}


def test_results_endpoint_names_the_file(tmp_path: Path) -> None:
    from tests.test_server import running_server
    from tests.test_sources import colour_folder

    folder = colour_folder(tmp_path / "imgs")
    with running_server(str(folder), slide_interval=600) as srv:
        srv.wait_frames(1)
        with srv.client() as client:
            body = client.get("/results").json()
    assert body["source"] == {"name": "blue.png", "path": str(folder / "blue.png")}
