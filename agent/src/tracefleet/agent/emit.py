"""Emit user_events from a Python service: the fleet switches them on and off.

    from tracefleet.agent.emit import UserEvent
    checkout = UserEvent("checkout_latency", "u32 ms; char[32] sku")
    if checkout.enabled:               # one load of a word the kernel writes
        checkout.emit(ms, sku)

Registration (``DIAG_IOCSREG`` on ``user_events_data``) hands the kernel the address of a
32-bit word in this process; the kernel sets bit 31 of it while a tracer (the tracefleet
agent's perf ring, ftrace, perf) is attached and clears it after. ``emit`` checks the bit
before building the payload. Where the kernel lacks user_events (or tracefs is not mounted,
or the process may not open the file) the event is a no-op and ``reason`` says why; nothing
raises after construction. Supported field types: u8/s8..u64/s64, int, unsigned int,
char[N] (fixed) and __rel_loc char[] (variable strings).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
from pathlib import Path

DATA_FILE = Path("/sys/kernel/tracing/user_events_data")
ENABLE_BIT = 31
# _IOWR('*', 0, struct user_reg *) and _IOW('*', 2, struct user_unreg *)
DIAG_IOCSREG = 0xC0082A00
DIAG_IOCSUNREG = 0x40082A02
# struct user_reg (packed): size u32, enable_bit u8, enable_size u8, flags u16,
# enable_addr u64, name_args u64, write_index u32
_USER_REG = struct.Struct("<IBBHQQI")
_USER_UNREG = struct.Struct("<IBBHQ")

_INTS = {
    "u8": "B", "s8": "b", "u16": "H", "s16": "h", "u32": "I", "s32": "i", "u64": "Q",
    "s64": "q", "int": "i", "unsigned int": "I", "long": "q", "unsigned long": "Q",
}  # fmt: skip


def _parse_fields(args: str) -> list[tuple[str, str, int]]:
    """ "u32 ms; char[32] sku" -> [("int", "<I", 4), ("chars", "", 32)]."""
    out: list[tuple[str, str, int]] = []
    for part in filter(None, (p.strip() for p in args.split(";"))):
        ftype, _, name = part.rpartition(" ")
        if not ftype or not name:
            raise ValueError(f"field {part!r}: expected 'TYPE NAME' (e.g. 'u32 ms')")
        if ftype in _INTS:
            fmt = "<" + _INTS[ftype]
            out.append(("int", fmt, struct.calcsize(fmt)))
        elif ftype.startswith("char[") and ftype.endswith("]") and ftype[5:-1].isdigit():
            out.append(("chars", "", int(ftype[5:-1])))
        elif ftype == "__rel_loc char[]":
            out.append(("rel_loc", "", 4))
        else:
            raise ValueError(
                f"field {part!r}: type {ftype!r} not supported here (use u8..u64, s8..s64, "
                "int, char[N] or __rel_loc char[])"
            )
    return out


class UserEvent:
    """One registered user_event. ``enabled`` is the kernel-written bit; ``emit`` writes."""

    def __init__(self, name: str, fields: str = "", data_file: Path = DATA_FILE) -> None:
        self.name = name
        self._fields = _parse_fields(fields)  # bad formats are a caller bug: raise now
        self._word = ctypes.c_uint32(0)
        self._fd = -1
        self._index = -1
        self.reason = ""
        self.emitted = 0
        self.last_error = ""
        if not data_file.exists():
            self.reason = (
                f"{data_file} is missing: this kernel ({os.uname().release}) has no "
                "user_events (CONFIG_USER_EVENTS, Linux 6.4+) or tracefs is not mounted; "
                "events are dropped here"
            )
            return
        try:
            self._fd = os.open(data_file, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            self.reason = f"cannot open {data_file}: {e.strerror}; events are dropped here"
            return
        cmd = ctypes.create_string_buffer(f"{name} {fields}".strip().encode())
        reg = bytearray(
            _USER_REG.pack(
                _USER_REG.size,
                ENABLE_BIT,
                4,
                0,
                ctypes.addressof(self._word),
                ctypes.addressof(cmd),
                0,
            )
        )
        try:
            fcntl.ioctl(self._fd, DIAG_IOCSREG, reg)
        except OSError as e:
            os.close(self._fd)
            self._fd = -1
            self.reason = (
                f"DIAG_IOCSREG {name!r}: {e.strerror} (a bad field list, or the name is "
                "registered with another format); events are dropped here"
            )
            return
        self._index = _USER_REG.unpack(reg)[6]
        self._head = struct.pack("<i", self._index)

    @property
    def registered(self) -> bool:
        return self._fd >= 0

    @property
    def enabled(self) -> bool:
        """True while some tracer is attached (always False when not registered)."""
        return bool(self._word.value >> ENABLE_BIT & 1)

    def emit(self, *values: int | str) -> bool:
        """Write one event if enabled; returns whether it was written."""
        if not self._word.value >> ENABLE_BIT & 1:
            return False
        return self.write(*values)

    def write(self, *values: int | str) -> bool:
        """Write unconditionally (what an emitter without the enable check does)."""
        if self._fd < 0:
            return False
        try:
            os.writev(self._fd, [self._head, *self.encode(*values)])
        except OSError as e:  # e.g. EBADF after close, or the event was deleted
            self.last_error = e.strerror or str(e)
            return False
        self.emitted += 1
        return True

    def encode(self, *values: int | str) -> list[bytes]:
        """The payload after the write index: fixed fields, then rel_loc strings."""
        if len(values) != len(self._fields):
            raise TypeError(f"{self.name}: {len(self._fields)} values expected, got {len(values)}")
        fixed: list[bytes] = []
        tail: list[bytes] = []
        fixed_len = sum(size for _, _, size in self._fields)
        pos = 0
        for (kind, fmt, size), v in zip(self._fields, values, strict=True):
            if kind == "int":
                fixed.append(struct.pack(fmt, int(v)))
            elif kind == "chars":
                b = str(v).encode()[: size - 1]
                fixed.append(b + b"\0" * (size - len(b)))
            else:  # rel_loc: offset from the end of this 4-byte field, length in the high half
                b = str(v).encode() + b"\0"
                rel = fixed_len - pos - 4 + sum(len(t) for t in tail)
                fixed.append(struct.pack("<I", len(b) << 16 | rel))
                tail.append(b)
            pos += size
        return fixed + tail

    def close(self) -> None:
        """Unregister (the kernel stops writing the word) and close."""
        if self._fd < 0:
            return
        unreg = bytearray(
            _USER_UNREG.pack(_USER_UNREG.size, ENABLE_BIT, 0, 0, ctypes.addressof(self._word))
        )
        with contextlib.suppress(OSError):  # closing the fd unregisters too
            fcntl.ioctl(self._fd, DIAG_IOCSUNREG, unreg)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> UserEvent:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
