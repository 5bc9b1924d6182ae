"""Label files: id -> name. One name per line (line index = id), or ``id name`` / ``id: name``
lines, or a JSON object ``{"0": "dog"}``."""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"

_NUMBERED = re.compile(r"^\s*(\d+)\s*[:,\t ]\s*(.+?)\s*$")


class LabelsError(ValueError):
    pass


def parse_labels(text: str, source: str = "<labels>") -> dict[int, str]:
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
            return {int(k): str(v) for k, v in data.items()}
        except (ValueError, AttributeError) as exc:
            raise LabelsError(f"labels file {source}: not a JSON object of id -> name ({exc})") from exc
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise LabelsError(f"labels file {source} is empty")
    numbered = [_NUMBERED.match(line) for line in lines]
    if all(numbered):
        return {int(m.group(1)): m.group(2) for m in numbered if m}
    return {i: line.strip() for i, line in enumerate(lines)}


def load_labels(path: str | Path) -> dict[int, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise LabelsError(f"labels file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"labels file {p} cannot be read: {exc}") from exc
    return parse_labels(text, str(p))


def builtin_labels(name: str) -> dict[int, str]:
    """``imagenet`` (1000 classes, id 0..999) or ``voc`` (20 classes, id 1..20 as the DeepLens SSD)."""
    text = (DATA / f"{name}_classes.txt").read_text("utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    offset = 1 if name == "voc" else 0
    return {i + offset: n for i, n in enumerate(names)}
