"""OpenCV's and FFmpeg's own stderr lines go through the log (issue 15.17)."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

from inference.sources.video import demo_clip
from tests.conftest import ROOT

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def _corrupt_clip(path: Path) -> Path:
    """The demo clip with garbage written over its middle: FFmpeg complains on every bad frame."""
    data = bytearray(demo_clip().read_bytes())
    rng = random.Random(1)
    for at in range(200_000, 400_000, 997):
        data[at:at + 40] = bytes(rng.getrandbits(8) for _ in range(40))
    path.write_bytes(bytes(data))
    return path


def test_ffmpeg_errors_are_log_records_and_a_repeated_one_is_logged_once(tmp_path: Path) -> None:
    clip = _corrupt_clip(tmp_path / "corrupt.mp4")
    proc = subprocess.run(
        [sys.executable, "-m", "app", "infer", "--source", str(clip), "--frames", "200",
         "--source-fps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    raw = [line for line in lines if not LOG_LINE.match(line)]
    assert raw == [], raw[:5]
    native = [line for line in lines if " WARNING native: [h264 @ 0x" in line]
    assert native, proc.stderr[-2000:]
    # "error while decoding MB 22 12, bytestream 1081": the numbers vary, the line is the same
    assert sum("error while decoding MB" in line for line in lines) == 1
    assert len(proc.stdout.splitlines()) == 200  # the JSON lines on stdout are untouched


NATIVE_SCRIPT = r"""
import logging, os, sys
from app.cli import setup_logging
from app.nativelog import NativeStderr
setup_logging("info")
native = NativeStderr()
native.start()
os.write(2, b"[ WARN:0@1.810] global cap_v4l.cpp:915 open VIDEOIO(V4L2:/dev/video0): can't open camera\n")
os.write(2, b"[ERROR:0@2.000] global something failed\n")
logging.getLogger("app").info("a python record")
print("python's own stderr", file=sys.stderr)
native.stop()
os.write(2, b"after stop\n")
"""


def test_opencv_tags_set_the_level_and_python_stderr_bypasses_the_pipe() -> None:
    proc = subprocess.run([sys.executable, "-c", NATIVE_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(re.search(r" WARNING native: global cap_v4l\.cpp:915 open VIDEOIO", x) for x in lines), lines
    assert any(" ERROR native: global something failed" in x for x in lines), lines
    assert sum(" INFO app: a python record" in x for x in lines) == 1, lines  # not looped back
    assert "python's own stderr" in lines
    assert lines[-1] == "after stop"
