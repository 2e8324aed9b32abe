"""The typed event: JSON shape, wire conversion both ways (and with older peers), and the
strace-like human rendering with control characters escaped."""

from __future__ import annotations

import json

from tracefleet.model import Arg, Event, FlagSet, OpenHow, SocketAddress, flag_names, human, wire
from tracefleet.model.event import STATUSES
from tracefleet.v1 import types_pb2


def _event(**kw: object) -> Event:
    base: dict[str, object] = dict(
        ts_ns=5_000, event_set="file", syscall="openat", pid=42, tid=43, comm="cat", ret=-2,
        time_ns=1_700_000_000_123_456_789, duration_ns=12_000, delivery_latency_ns=900,
        strategy="exit-retry", ppid=1, uid=1000, gid=100, exe="/usr/bin/cat", node="db-1",
        args={
            "dfd": Arg(-100, strategy="register"),
            "flags": Arg(FlagSet(0o2000000, ("O_RDONLY", "O_CLOEXEC")), strategy="register"),
            "mode": Arg(0, strategy="register"),
            "pathname": Arg("/nonexistent", strategy="exit-retry", addr=0x7000),
        },
    )  # fmt: skip
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def _through_wire(e: Event) -> Event:
    pb = types_pb2.Event.FromString(wire.event_to_pb(e).SerializeToString())
    return wire.event_from_pb(pb)


def test_every_kind_of_value_survives_the_wire_typed():
    e = _event(
        syscall="execve",
        args={
            "argv": Arg(["/bin/echo", "a b", "c"], strategy="exit-retry", addr=0x10),
            "addr": Arg(SocketAddress("inet", "127.0.0.1", 1), strategy="exit-retry"),
            "peer": Arg(SocketAddress("unix", path="@abstract"), strategy="nofault"),
            "how": Arg(OpenHow(0o2000000, 0o644, 8), strategy="sleepable"),
            "filename": Arg(None, status="lost", strategy="nofault", error="EFAULT", addr=0x20),
            "flags": Arg(FlagSet(0x1000, ("AT_EMPTY_PATH",)), strategy="register"),
            "dfd": Arg(-100, strategy="register"),
        },
    )
    back = _through_wire(e)
    assert back == e
    data = back.to_json()
    assert data["args"]["argv"]["value"] == ["/bin/echo", "a b", "c"]
    assert data["args"]["addr"]["value"] == {"family": "inet", "address": "127.0.0.1", "port": 1}
    assert data["args"]["filename"] == {"value": None, "status": "lost", "strategy": "nofault",
                                        "addr": "0x20", "error": "EFAULT"}  # fmt: skip
    assert data["args"]["flags"]["value"] == 0x1000  # raw kept
    assert data["args"]["flags"]["names"] == ["AT_EMPTY_PATH"]
    assert data["args"]["dfd"]["value"] == -100
    assert data["time"] == "2023-11-14T22:13:20.123456Z" and data["time_ns"] == e.time_ns
    assert (data["ppid"], data["uid"], data["gid"]) == (1, 1000, 100)
    assert data["exe"] == "/usr/bin/cat"


def test_the_executable_crosses_the_wire_and_unknown_stays_null():
    pb = types_pb2.Event.FromString(wire.event_to_pb(_event()).SerializeToString())
    assert pb.HasField("exe") and pb.exe == "/usr/bin/cat"
    # a path the kernel marked, bytes that are not UTF-8 escaped as the agent decodes them
    odd = "/srv/x\\xff (deleted)"
    assert _through_wire(_event(exe=odd)).exe == odd
    unknown = wire.event_to_pb(_event(exe=None))
    assert not unknown.HasField("exe")  # unset, not ""
    back = _through_wire(_event(exe=None))
    assert back.exe is None and back.to_json()["exe"] is None
    assert Event.from_json({"pid": 1}).exe is None  # an older agent's jsonl


def test_older_clients_still_read_the_text_value_and_enums_match_it():
    pb = wire.event_to_pb(
        _event(args={"argv": Arg(["a", "b c"]), "lost": Arg(None, status="lost")})
    )
    assert json.loads(pb.args["argv"].value) == ["a", "b c"]
    assert pb.args["argv"].status == "ok" and pb.args["argv"].status_code == types_pb2.ARG_STATUS_OK
    assert pb.args["lost"].value == "" and pb.args["lost"].WhichOneof("typed") is None
    assert pb.args["lost"].status_code == types_pb2.ARG_STATUS_LOST
    pb2 = wire.arg_to_pb(Arg(1, strategy="exit-retry"))
    assert pb2.strategy_code == types_pb2.STRATEGY_EXIT_RETRY


def test_every_status_round_trips_with_its_own_enum_value_and_string():
    """Each status the model knows has its own ArgStatus value (never UNSPECIFIED), the
    string stays for older clients, and a peer that sends only the enum is read back."""
    assert {"reread", "mismatch"} <= set(STATUSES)
    codes = set()
    for status in STATUSES:
        value = None if status == "lost" else "/x"
        a = Arg(value, status=status, strategy="exit-retry")
        pb = types_pb2.EventArg.FromString(wire.arg_to_pb(a).SerializeToString())
        assert pb.status == status  # older clients read the string
        assert pb.status_code != types_pb2.ARG_STATUS_UNSPECIFIED, status
        assert types_pb2.ArgStatus.Name(pb.status_code) == f"ARG_STATUS_{status.upper()}"
        codes.add(pb.status_code)
        assert wire.arg_from_pb(pb) == a
        pb.ClearField("status")  # a newer peer that fills only the enum
        assert wire.arg_from_pb(pb).status == status
    assert len(codes) == len(STATUSES)


def test_an_older_agents_event_reads_back_without_inventing_values():
    old = types_pb2.Event(ts_ns=7, event_set="file", syscall="openat", pid=1, tid=1, comm="x")
    old.args["pathname"].CopyFrom(types_pb2.EventArg(value="/etc", status="ok", strategy="nofault"))
    old.args["gone"].CopyFrom(types_pb2.EventArg(value="None", status="lost", strategy="nofault"))
    e = wire.event_from_pb(old)
    assert e.args["pathname"].value == "/etc"
    assert e.args["gone"].value is None and e.args["gone"].status == "lost"
    assert e.time_ns == 0 and e.ppid is None and e.uid is None  # unknown, not 0
    assert e.exe is None  # not ""
    assert human.clock_text(e.time_ns) == "--:--:--.------"


def test_jsonl_shape_round_trips_through_the_model():
    e = _event()
    assert Event.from_json(json.loads(json.dumps(e.to_json()))) == e


def test_flag_names_keep_unknown_bits():
    assert flag_names("openat", "flags", 0o2000000) == ("O_RDONLY", "O_CLOEXEC")
    assert flag_names("newfstatat", "flags", 0x1000) == ("AT_EMPTY_PATH",)
    assert flag_names("renameat2", "flags", 1 | 0x40) == ("RENAME_NOREPLACE", "0x40")
    assert flag_names("openat", "mode", 0o644) is None


def test_human_line_reads_like_strace():
    line = human.call_text(_event())
    assert line == (
        'openat(AT_FDCWD, "/nonexistent", O_RDONLY|O_CLOEXEC) = -1 ENOENT '
        "(No such file or directory) <0.000012>"
    )
    creat = _event(
        args={
            "dfd": Arg(3),
            "pathname": Arg("/srv/x"),
            "flags": Arg(FlagSet(0o101, ("O_WRONLY", "O_CREAT"))),
            "mode": Arg(0o644),
        },
        ret=4,
    )
    assert human.call_text(creat) == 'openat(3, "/srv/x", O_WRONLY|O_CREAT, 0644) = 4 <0.000012>'
    ex = _event(syscall="execve", ret=0, args={"argv": Arg(["/bin/echo", "a b"]),
                                               "filename": Arg("/bin/echo")})  # fmt: skip
    assert human.call_text(ex) == 'execve("/bin/echo", ["/bin/echo", "a b"]) = 0 <0.000012>'
    sa = SocketAddress("inet", "127.0.0.1", 80)
    conn = _event(syscall="connect", ret=0,
                  args={"fd": Arg(3), "addrlen": Arg(16), "addr": Arg(sa)})  # fmt: skip
    assert human.call_text(conn) == (
        'connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("127.0.0.1")}, '
        "16) = 0 <0.000012>"
    )
    lost = _event(args={"pathname": Arg(None, status="lost", error="EFAULT")})
    assert human.call_text(lost).startswith("openat(<lost EFAULT>) = -1 ENOENT")
    assert human.line(_event(), node_width=6).startswith("22:13:20.123456 db-1        42 cat ")


def test_control_characters_never_reach_the_terminal_raw():
    evil_comm = "x\x1b[2J\x1b]0;pwned\x07"
    evil_path = "/srv/\x1b[31mred\r\n\u202egnp.exe\x7f\x9b"
    e = _event(comm=evil_comm, node="n\x1b[1m", args={"pathname": Arg(evil_path)})
    line = human.line(e, node_width=12)
    assert not any(ch in line for ch in "\x1b\x07\r\n\x7f\x9b\u202e")
    assert "x\\x1b[2J\\x1b]0;pwned\\x07" in line
    assert '"/srv/\\x1b[31mred\\r\\n\\u202egnp.exe\\x7f\\x9b"' in line
    # JSON stays exact
    assert json.loads(json.dumps(e.to_json()))["args"]["pathname"]["value"] == evil_path
    assert e.to_json()["comm"] == evil_comm
    # the wide table's EXE column is escaped too
    wide = human.line(_event(exe="/srv/\x1b[2Jbin"), exe=True)
    assert "\x1b" not in wide and "/srv/\\x1b[2Jbin" in wide


def test_wide_table_has_an_exe_column_and_the_default_table_does_not():
    head, row = human.header(exe=True), human.line(_event(), exe=True)
    assert head.split()[:5] == ["TIME", "(UTC)", "PID", "COMM", "EXE"]
    assert row.split()[1:4] == ["42", "cat", "/usr/bin/cat"]
    assert row.index("openat(") == head.index("CALL")  # aligned
    assert "EXE" not in human.header() and "/usr/bin/cat" not in human.line(_event())
    assert human.line(_event(exe=None), exe=True).split()[3] == "-"  # unknown
