"""What an output is (the FIFO, the IoT topic) and the error a bad output setting raises.

An output is a consumer of the frame hub with its own thread. A setting that cannot work (a FIFO
path that is a regular file, ``--iot mqtt`` without a broker, a missing certificate) raises
:class:`OutputError` naming the option, when the outputs are built, before anything starts.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from typing_extensions import Protocol

from inference.settings import Settings


class OutputError(ValueError):
    """An output setting that cannot work; ``option`` is the CLI option to blame (``--fifo``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class Output(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self, deadline: float) -> bool:
        """Stop by ``deadline`` (``time.monotonic()``), delivering what it can first; False if
        its thread was still busy then."""
        ...

    def health(self) -> Tuple[bool, str]: ...

    def stats(self) -> Dict[str, Any]: ...

    def apply(self, settings: Settings) -> None:
        """Take the live settings that concern it."""
        ...

