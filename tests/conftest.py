from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# DEEPLENS_TEST_INSTALLED=1 (the device stage of .ci/run, under Python 3.7): the tests drive the
# product installed from the device bundle, never this tree.
INSTALLED = os.environ.get("DEEPLENS_TEST_INSTALLED", "") == "1"


def product_pythonpath(*first: str) -> str:
    """PYTHONPATH for a child process that runs the product (the tree's copy unless installed)."""
    return os.pathsep.join([*first, *([] if INSTALLED else [str(ROOT)])])


def pytest_configure(config: pytest.Config) -> None:
    if INSTALLED:
        import app

        if str(Path(app.__file__).resolve()).startswith(str(ROOT) + os.sep):
            raise pytest.UsageError(
                f"DEEPLENS_TEST_INSTALLED=1 but app comes from the source tree ({app.__file__}): "
                "run the venv's pytest script with --import-mode=append, not python -m pytest")


def require_tool(name: str) -> str:
    """The path of a system tool; in CI a missing tool fails the test, elsewhere it skips."""
    path = shutil.which(name)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is required in CI (.ci/run installs it) but is not on PATH")
    pytest.skip(f"{name} not installed")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True, scope="session")
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Dashboards the tests start keep a generated control token in $XDG_STATE_HOME: never in
    the tester's own home."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data"))  # the event history


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Put the fake awscam / mo / greengrasssdk modules first on the import path."""
    monkeypatch.syspath_prepend(str(FAKES))
    for name in ("awscam", "mo", "greengrasssdk"):
        sys.modules.pop(name, None)
    import awscam

    awscam.reset()
    yield FAKES
    for name in ("awscam", "mo", "greengrasssdk"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def chelsea_bgr():  # type: ignore[no-untyped-def]
    import cv2
    import skimage.data

    return cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def astronaut_bgr():  # type: ignore[no-untyped-def]
    import cv2
    import skimage.data

    return cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)


@pytest.fixture
def image_file(tmp_path: Path, chelsea_bgr) -> Path:  # type: ignore[no-untyped-def]
    import cv2

    path = tmp_path / "chelsea.png"
    cv2.imwrite(str(path), chelsea_bgr)
    return path


@pytest.fixture(scope="session")
def efficientnet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.models.efficientnet import build_efficientnet_lite0_onnx

    path = tmp_path_factory.mktemp("artifacts") / "efficientnet.onnx"
    path.write_bytes(build_efficientnet_lite0_onnx())
    return path


@pytest.fixture
def device_xml(tmp_path: Path, efficientnet_onnx: Path) -> Path:
    """A pre-optimized artifact as the sample projects ship it (the fake awscam runs the ONNX
    graph it names)."""
    xml = tmp_path / "mxnet_efficientnet_FP16_FUSED.xml"
    xml.write_text(f'<net name="efficientnet" onnx="{efficientnet_onnx}" output="SoftMax_67"/>\n')
    return xml


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "it") -> Any:
    """``predicate()``'s first truthy value, polled every 0.1 s; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
