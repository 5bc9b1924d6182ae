"""The device path through fake awscam and mo modules that follow the documented API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inference.models import load_model
from inference.models.catalog import DEVICE_DEFAULT_MODEL
from inference.pipeline.loop import LoopState
from inference.service import Service
from inference.settings import Settings
from inference.types import ModelError
from tests.conftest import FAKES, product_pythonpath
from tests.test_loop import collect

pytestmark = pytest.mark.device


def device_settings(model: str, **kw: Any) -> Settings:
    return Settings(source="awscam", model=model, model_type="classification", labels="imagenet",
                    input_size=(224, 224), display_res="480p", **kw)


def test_awscam_model_and_frames_classify_a_cat(
    fake_device: Path, device_xml: Path, image_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import awscam

    monkeypatch.setenv("FAKE_AWSCAM_VIDEO", str(image_file))
    service = Service(device_settings(str(device_xml), top_k=3))
    service.prepare()
    assert awscam.loaded == [(str(device_xml), {"GPU": 1}, 0)]
    model = service.loop.model
    assert model is not None and model.info.backend.startswith("awscam") and model.info.gpu
    service.start()
    try:
        item = collect(service.hub, 3)[-1]
    finally:
        service.stop()
    names = [i.name for i in item.result.items]
    assert names[0] in ("tiger cat", "Egyptian cat", "tabby, tabby cat")
    assert item.image.shape == (300, 451, 3)  # smaller than 480p: drawn at its own size
    assert awscam.calls["getLastFrame"] >= 3 and awscam.calls["parseResult"] >= 3


def test_gpu_off_loads_with_gpu_0(fake_device: Path, device_xml: Path) -> None:
    import awscam

    model = load_model(device_settings(str(device_xml), device_gpu=False))
    assert awscam.loaded[-1][1] == {"GPU": 0}
    assert not model.info.gpu


def test_unoptimized_artifact_goes_through_mo_optimize(
    fake_device: Path, tmp_path: Path, efficientnet_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mo

    monkeypatch.setenv("FAKE_MO_ARTIFACTS", str(tmp_path))
    (tmp_path / "hotdog_or_not_model-symbol.json").write_text(str(efficientnet_onnx))
    (tmp_path / "hotdog_or_not_model-0000.params").write_bytes(b"\0")
    model = load_model(
        device_settings("hotdog_or_not_model", mo_aux={"--epoch": 0, "--precision": "FP16"})
    )
    assert mo.calls == [("hotdog_or_not_model", 224, 224, "mx", {"--epoch": 0, "--precision": "FP16"})]
    assert Path(model.path).name == "mxnet_hotdog_or_not_model_FP16_FUSED.xml"  # type: ignore[attr-defined]


def test_mo_optimize_error_names_the_artifact(fake_device: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MO_ARTIFACTS", str(tmp_path))
    with pytest.raises(ModelError, match=r"mo.optimize failed for artifact 'missing_model': error 2"):
        load_model(device_settings("missing_model"))
    with pytest.raises(ModelError, match="error 1 \\(platform not supported\\)"):
        from inference.models.awscam import resolve_artifact

        resolve_artifact("x", 224, 224, 0, platform="pytorch")


def test_missing_xml_is_refused_naming_the_path(fake_device: Path, tmp_path: Path) -> None:
    path = tmp_path / "nope.xml"
    with pytest.raises(ModelError, match=str(path)):
        load_model(device_settings(str(path)))


def test_neo_runtime_parses_the_raw_result(fake_device: Path, device_xml: Path, tmp_path: Path,
                                           chelsea_bgr: Any) -> None:
    import awscam

    neo = tmp_path / "neo"
    neo.mkdir()
    (neo / "compiled.xml").write_text(device_xml.read_text())
    model = load_model(device_settings(str(neo), device_runtime=1))
    assert awscam.loaded[-1] == (str(neo), {"GPU": 1}, 1)
    parsed = model.parse(model.infer(model.preprocess(chelsea_bgr)))
    assert parsed["classification"][0]["label"] in (281, 282, 285)


def test_device_default_is_the_seed_model(fake_device: Path) -> None:
    from inference.models.catalog import default_model
    from inference.sources import default_source

    assert default_source() == "awscam"
    assert default_model() == DEVICE_DEFAULT_MODEL


def test_get_last_frame_failing_for_a_while_then_back(
    fake_device: Path, device_xml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    fail = tmp_path / "camera-broken"
    monkeypatch.setenv("FAKE_AWSCAM_FAIL_FILE", str(fail))
    service = Service(device_settings(str(device_xml)))
    service.prepare()
    service.start()
    try:
        collect(service.hub, 2)
        fail.touch()
        lost = collect(service.hub, 6)
        assert lost[-1].result.error is not None and "no signal" in lost[-1].result.error
        assert service.capture.consecutive_failures >= 5
        fail.unlink()
        back = collect(service.hub, 3, timeout=15)
        assert back[-1].result.error is None and back[-1].result.items
        assert service.state is LoopState.RUNNING
        assert [t for t in threading.enumerate() if t.name == "inference-loop"]
    finally:
        service.stop()


def test_cli_on_the_device_imports_awscam_before_cv2(device_xml: Path, image_file: Path,
                                                    tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=product_pythonpath(str(FAKES)), FAKE_AWSCAM_VIDEO=str(image_file))
    code = (
        "import sys, runpy\n"
        "sys.argv = ['deeplens-dashboard', 'infer', '--frames', '1', '--model', sys.argv[1],"
        " '--model-type', 'classification', '--labels', 'imagenet']\n"
        "from app.cli import main\n"
        "rc = main()\n"
        "import awscam\n"
        "sys.stderr.write('CV2_FIRST=%s\\n' % awscam.CV2_IMPORTED_BEFORE_AWSCAM)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(device_xml)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CV2_FIRST=False" in proc.stderr
    line = json.loads(proc.stdout.splitlines()[0])
    assert line["result"]["model"]["backend"].startswith("awscam")
    assert set(line["payload"]) & {"tiger cat", "Egyptian cat", "tabby, tabby cat"}
