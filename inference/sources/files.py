"""What a local file or a URL must be to become a source.

A source's frames go to ``/snapshot.jpg`` and the streams, which views get without the token, so
a source must not be a way to read the device's files or reach its network:

- A file read through FFmpeg must start with the signature of a video container or an image
  FFmpeg decodes. FFmpeg picks its demuxer by probing, and some demuxers turn text into
  pictures (``tty``/``ansi`` renders any text file) or open other files and URLs (``hls``,
  ``concat``, ``sdp`` playlists are text too). An allow-list of binary signatures is checked
  before FFmpeg sees the file, whatever its name, and does not depend on which demuxers this
  FFmpeg build has or how it scores them; OpenCV does not tell which demuxer it used, so that
  cannot be checked after the open. Text extensions that FFmpeg maps to its text demuxer are
  refused even with a signature.
- Only a regular file: opening a FIFO waits for a writer forever (holding whoever opens it), a
  socket or a device other than a camera is no video. A V4L2 camera node is a camera.
- A URL only with a scheme the device's owner allows (``--source-schemes``).
"""

from __future__ import annotations

import os
import re
import stat
from typing import Optional, Sequence, Tuple, Union

DEFAULT_SCHEMES = ("rtsp", "rtsps", "http", "https")
# FFmpeg's text demuxer claims these names (libavformat/tty.c).
TEXT_EXTS = frozenset({".ans", ".art", ".asc", ".diz", ".ice", ".nfo", ".txt", ".vt"})
V4L2_MAJOR = 81  # Linux's character-device major number of video4linux nodes (/dev/videoN)
HEAD_BYTES = 400  # enough for two MPEG-TS packets (188 bytes) and a BDAV one (192)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")

# (offset, bytes): containers and image streams FFmpeg decodes into video frames.
SIGNATURES: Tuple[Tuple[int, bytes], ...] = (
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska, WebM
    (4, b"ftyp"),  # MP4, MOV, 3GP, M4V
    *((4, atom) for atom in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")),  # old MOV
    (0, b"FLV\x01"),
    (0, b"OggS"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"),  # ASF, WMV
    (0, b"\x00\x00\x01"),  # MPEG program and elementary streams, H.264/HEVC Annex B
    (0, b"\x00\x00\x00\x01"),
    (0, b"YUV4MPEG2"),
    (0, b"DKIF"),  # IVF (VP8, VP9, AV1)
    (0, b".RMF"),  # RealMedia
    (0, b"nut/multimedia container"),
    (0, b"GIF87a"),
    (0, b"GIF89a"),
    (0, b"\xff\xd8\xff"),  # JPEG, MJPEG
    (0, b"\x89PNG\r\n\x1a\n"),  # PNG, APNG
)
RIFF_FORMS = (b"AVI ", b"AVIX", b"AMV ", b"WEBP")


def video_signature(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) starts like a video container or an image."""
    if head[:4] == b"RIFF" and head[8:12] in RIFF_FORMS:
        return True
    if head[:1] == b"\x47" and head[188:189] == b"\x47":  # MPEG-TS: a sync byte per packet
        return True
    if head[4:5] == b"\x47" and head[196:197] == b"\x47":  # BDAV (M2TS)
        return True
    return any(head[offset:offset + len(magic)] == magic for offset, magic in SIGNATURES)


def is_camera_node(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == V4L2_MAJOR


def file_problem(path: str, kind: str = "video") -> Optional[str]:
    """Why ``path`` cannot be read as a ``kind`` (``video`` through FFmpeg, or an ``image``), or
    None. Never waits: the file is stat'ed, and a video's head read only once it is regular."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        what = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "not a file")
        return (f"{path!r} is {what}, not a regular file: only video or image files, cameras "
                "and streams can be a source")
    if kind != "video":
        return None
    if os.path.splitext(path)[1].lower() in TEXT_EXTS:
        return f"{path!r} is a text file by its name, not a video"
    try:
        # O_NONBLOCK: the path may have become a FIFO since the stat.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return f"{path!r} is not a regular file"
            head = os.read(fd, HEAD_BYTES)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    if not video_signature(head):
        return (f"{path!r} is not a video: its content starts like no video container or image "
                "(text files, playlists and other files are not read as sources)")
    return None


def scheme_of(spec: str) -> Optional[str]:
    """The URL scheme ``spec`` starts with (``rtsp``), lower-case, or None for a path. FFmpeg
    reads any ``NAME:`` prefix as a protocol (``concat:``, ``subfile:``), so ``//`` is not
    required; one letter is a Windows drive, not a scheme."""
    match = _SCHEME.match(spec)
    return match.group(1).lower() if match else None


def allowed_schemes(schemes: Union[str, Sequence[str], None]) -> Tuple[str, ...]:
    """``--source-schemes`` as a tuple: ``rtsp,https``, ``off`` (none) or a sequence."""
    if schemes is None:
        return DEFAULT_SCHEMES
    if isinstance(schemes, str):
        if schemes.strip().lower() in ("off", "none"):
            return ()
        schemes = [s for s in re.split(r"[,\s]+", schemes) if s]
    return tuple(s.strip().lower() for s in schemes)
