"""Frame sources, chosen by one string: ``awscam``, ``demo``, ``synthetic``, a webcam index, a
URL, a video file, an image file, a folder or a glob of images. What a file or a URL must be to
be one: :mod:`inference.sources.files`."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence, Union

from inference.sources.awscam import awscam_available
from inference.sources.files import allowed_schemes, file_problem, is_camera_node, scheme_of
from inference.types import FrameSource

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
NAMED_SOURCES = ("awscam", "demo", "synthetic")


class SourceSpecError(ValueError):
    """The ``--source`` value names nothing that can be opened."""


def default_source() -> str:
    return "awscam" if awscam_available() else "demo"


def make_source(
    spec: str, fps: float | None = None, interval: float = 3.0, once: bool = False,
    schemes: Union[str, Sequence[str], None] = None,
) -> FrameSource:
    """Build the source ``spec`` names; ``fps`` None keeps each kind's own pace, 0 is unpaced.
    ``once``: a folder or glob hands out each image one time, unpaced, then ends (headless
    ``infer``); a single image still repeats, so ``infer`` can run it ``--frames`` times.
    ``schemes``: the URL schemes allowed (``--source-schemes``; None: rtsp, rtsps, http, https).

    Raises SourceSpecError for a path that does not exist, is not a regular video or image file
    (nor a camera node), a URL of a scheme not allowed or a spec of no known kind, so the CLI
    can refuse it at start and a live change with a 422. Nothing here waits on the source.
    """
    spec = spec.strip()
    if not spec:
        raise SourceSpecError("empty source")
    if spec == "awscam":
        from inference.sources.awscam import AwscamSource

        return AwscamSource(fps=fps)
    if spec == "demo":
        from inference.sources.video import demo_source

        return demo_source(fps=fps)
    if spec == "synthetic" or spec.startswith(("synthetic:", "synthetic@")):
        from inference.sources.synthetic import SyntheticSource

        return SyntheticSource.from_spec(spec, fps=fps)
    if spec.isdigit():
        from inference.sources.video import VideoSource

        return VideoSource(int(spec), live=True, fps=fps)
    scheme = scheme_of(spec)
    if scheme is not None:
        allowed = allowed_schemes(schemes)
        if scheme not in allowed:
            raise SourceSpecError(
                f"the URL scheme {scheme}: is not allowed for a source (allowed: "
                f"{', '.join(allowed) or 'none'}; the device's owner sets them with --source-schemes)")
        from inference.sources.video import VideoSource

        return VideoSource(spec, live=True, fps=fps)
    if any(ch in spec for ch in "*?["):
        from inference.sources.images import ImagesSource

        files = sorted(glob.glob(os.path.expanduser(spec)))
        if not files:
            raise SourceSpecError(f"no file matches {spec!r}")
        return ImagesSource(files, fps=fps, interval=interval, name=spec, once=once)
    path = Path(spec).expanduser()
    if path.is_dir():
        from inference.sources.images import ImagesSource

        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise SourceSpecError(f"folder {spec!r} holds no image ({', '.join(sorted(IMAGE_EXTS))})")
        return ImagesSource(files, fps=fps, interval=interval, name=spec, once=once)
    try:
        st = path.stat()
    except OSError:
        raise SourceSpecError(
            f"{spec!r} is no file, folder, URL, webcam index or one of {', '.join(NAMED_SOURCES)}"
        ) from None
    if is_camera_node(st):
        from inference.sources.video import VideoSource

        return VideoSource(str(path), live=True, fps=fps)
    image = path.suffix.lower() in IMAGE_EXTS
    problem = file_problem(str(path), "image" if image else "video")
    if problem:
        raise SourceSpecError(problem)
    if image:
        from inference.sources.images import ImagesSource

        return ImagesSource([str(path)], fps=fps, interval=interval, name=spec)
    from inference.sources.video import VideoSource

    return VideoSource(str(path), live=False, fps=fps)
