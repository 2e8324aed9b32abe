# The compiled decode's extension (agent/native/pydecode.c, built by `make native`).
from typing import Any

WALK_ABI: int
VIEW_SIZE: int

class Decoder:
    def __init__(
        self,
        fns: tuple[int, int, int, int, int, int],
        jfmt: int | None,
        fast: int | None,
        families: tuple[int, int, int],
        owner: object,
    ) -> None: ...
    def decode_batch(
        self, address: int, length: int, offset_ns: int, deliver: bool, start: int, max_items: int
    ) -> tuple[list[Any], list[dict[str, Any]], int]: ...
    def decode(self, raw: bytes, now_ns: int, offset_ns: int) -> dict[str, Any] | int: ...
    def counters(self) -> tuple[int, int, tuple[int, ...]]: ...
