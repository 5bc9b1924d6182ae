"""Bad values refused at the edge (issue 16.7): exit 2 naming the option, or 422 naming the field,
never a traceback, an abort or a loop whose every frame fails. Real CLI subprocesses, a real
tmpfs for the full filesystem, real uvicorn for the 422s."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.test_server import TOKEN, running_server

BIG = 10**400


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPLENS_")}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``serve`` on a free loopback port; a bad value must end it before it serves."""
    return cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--iot", "off",
               "--source", "synthetic:64x48", "--token-file", "off", *args)


def assert_usage_error(proc: subprocess.CompletedProcess[str], option: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert f"error: {option}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@contextmanager
def small_tmpfs(where: Path, size: str = "64k", inodes: int = 0) -> Iterator[Path]:
    """A real tmpfs of ``size`` (and ``inodes`` inodes, 0: the default) mounted at ``where``,
    unmounted at the end; skips unless root may mount one here."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(folder: Path, inodes: bool = False) -> list[Path]:
    """Use up ``folder``'s filesystem: its blocks, and with ``inodes`` its inodes (bounded)."""
    made: list[Path] = []
    big = folder / "fill"
    try:
        with open(big, "wb") as file:
            for _ in range(1 << 14):
                file.write(b"\0" * 4096)
                file.flush()
    except OSError:
        pass
    made.append(big)
    for i in range(1 << 16 if inodes else 0):
        path = folder / f"inode-{i}"
        try:
            path.touch()
        except OSError:
            break
        made.append(path)
    return made


# -- --fifo --------------------------------------------------------------------------------------
def test_fifo_in_a_missing_directory_exits_2_naming_fifo(tmp_path: Path) -> None:
    proc = serve("--fifo", str(tmp_path / "no-such-dir" / "results.mjpeg"))
    assert_usage_error(proc, "--fifo")
    assert "no-such-dir" in proc.stderr


def test_fifo_in_a_directory_it_cannot_write_exits_2_naming_fifo(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    proc = serve("--fifo", str(target / "results.mjpeg"))
    assert_usage_error(proc, "--fifo")


@pytest.mark.parametrize("full", ["blocks", "inodes"])
def test_fifo_on_a_full_filesystem_exits_2_naming_fifo(tmp_path: Path, full: str) -> None:
    with small_tmpfs(tmp_path / "mnt", inodes=64 if full == "inodes" else 0) as mnt:
        fill(mnt, inodes=full == "inodes")
        proc = serve("--fifo", str(mnt / "results.mjpeg"))
        assert_usage_error(proc, "--fifo")
        assert "No space left" in proc.stderr or "full" in proc.stderr, proc.stderr[-2000:]


# -- values that would make every frame fail ------------------------------------------------------
@pytest.mark.parametrize(("option", "value"), [
    ("--source-fps", "1e-300"), ("--center-crop", "1e-9"), ("--input-size", "4096x4096"),
])
def test_values_that_would_fail_every_frame_exit_2_naming_them(option: str, value: str) -> None:
    proc = cli("infer", "--frames", "1", "--source", "synthetic:160x120", f"{option}={value}")
    assert_usage_error(proc, option)
    assert proc.stdout == ""


# -- checked already (regressions) ----------------------------------------------------------------
@pytest.mark.parametrize(("text", "option"), [
    (b"threshold = 1" + b"0" * 400 + b"\n", "--config"),
    (b"iot_max_rate = 1" + b"0" * 400 + b"\n", "--config"),
    (b"top_k = 3\nthreshold = \xff\n", "--config"),
])
def test_config_files_with_huge_numbers_or_not_utf8_exit_2(tmp_path: Path, text: bytes,
                                                           option: str) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(text)
    assert_usage_error(cli("infer", "--frames", "1", "--config", str(config)), option)


@pytest.mark.parametrize("url", ["mqtt://h:99999", "mqtt://h:0", "mqtts://h:65536"])
def test_mqtt_ports_out_of_range_exit_2(url: str) -> None:
    assert_usage_error(serve("--fifo", "off", "--iot", "mqtt", "--mqtt", url), "--mqtt")


def test_huge_integers_live_are_422_naming_the_field() -> None:
    with running_server() as srv, srv.client(TOKEN) as client:
        srv.wait_frames(1)
        for field in ("threshold", "iot_max_rate", "top_k", "jpeg_quality"):
            body = f'{{"{field}": {BIG}}}'
            response = client.patch("/api/config", content=body,
                                    headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (field, response.text)
            assert response.json()["detail"][0]["loc"][-1] == field, response.text
        assert client.get("/health").json()["status"] == "ok"
