"""Frame -> model input: crop, resize, colour order, scale/mean/std, layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from inference.types import Image


@dataclass(frozen=True)
class Preprocess:
    width: int
    height: int
    color: Literal["bgr", "rgb"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Fraction of the short side kept by a centre crop (0.875 = the ImageNet 256 -> 224 habit);
    # 0 resizes the whole frame.
    center_crop: float = 0.0
    layout: Literal["nchw", "nhwc", "hwc"] = "nchw"
    dtype: Literal["float32", "uint8"] = "float32"

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The frame region the model sees, as x0, y0, x1, y1."""
        if not self.center_crop:
            return 0, 0, width, height
        aspect = self.width / self.height
        side = min(width / aspect, height) * self.center_crop
        cw, ch = side * aspect, side
        x0, y0 = int(round((width - cw) / 2)), int(round((height - ch) / 2))
        return x0, y0, x0 + int(round(cw)), y0 + int(round(ch))

    def __call__(self, frame: Image) -> npt.NDArray[Any]:
        h, w = frame.shape[:2]
        x0, y0, x1, y1 = self.crop_box(w, h)
        # Crop first, then one resize of the smaller region: cheaper than resize-then-crop.
        region = frame[y0:y1, x0:x1] if (x0, y0, x1, y1) != (0, 0, w, h) else frame
        resized = cv2.resize(region, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        if self.color == "rgb":
            resized = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
        if self.dtype == "uint8":
            out: npt.NDArray[Any] = resized
        else:
            # (x * scale - mean) / std folded into one multiply-add per channel.
            mul = np.float32(self.scale) / np.asarray(self.std, np.float32)
            add = -np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)
            out = resized.astype(np.float32) * mul + add
        if self.layout == "hwc":
            return out
        if self.layout == "nhwc":
            return out[None]
        return np.ascontiguousarray(out.transpose(2, 0, 1))[None]
