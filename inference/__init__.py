"""The inference core: frame sources, models, the loop and its hub. Never imports ``app``."""

from __future__ import annotations

RESOLUTIONS: dict[str, tuple[int, int]] = {
    "480p": (858, 480),
    "720p": (1280, 720),
    "1080p": (1920, 1080),
}
"""The DeepLens display sizes, exactly as the seed's ``LocalDisplay`` defines them."""

RESOLUTION_NAMES: tuple[str, ...] = (*RESOLUTIONS, "native")
