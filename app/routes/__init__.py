"""One router per concern, and how they answer in JSON."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse


class PrettyJSONResponse(JSONResponse):
    """Indented JSON with a final newline: ``curl http://device:8080/results`` reads well."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, indent=2, ensure_ascii=False, allow_nan=False)
        except ValueError:  # a NaN from a broken model must not turn the view into a 500
            text = json.dumps(_finite(content), indent=2, ensure_ascii=False)
        return (text + "\n").encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def field_error(field: str, message: str, status: int = 422) -> PrettyJSONResponse:
    """The shape FastAPI uses for its own validation errors, naming one body field."""
    loc: list[str] = ["body", field] if field else ["body"]
    return PrettyJSONResponse(
        {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}, status_code=status
    )
