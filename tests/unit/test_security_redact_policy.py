"""Pure parts of the security layer: argv redaction (agent) and the policy file (controller)."""

from __future__ import annotations

import pytest

from tracefleet.agent.control.redact import MASK, Redactor
from tracefleet.controller.common import selector as sel
from tracefleet.controller.domain.policy import Policy, PolicyError, parse_policy, within
from tracefleet.controller.domain.redaction import DEFAULT_RULES, TextRedactor, default_patterns


def _exec_event(*argv: str) -> dict:
    return {
        "event_set": "exec",
        "syscall": "execve",
        "pid": 1,
        "args": {
            "filename": {"value": "/usr/bin/psql", "status": "ok", "strategy": "s"},
            "argv": {"value": list(argv), "status": "ok", "strategy": "s"},
        },
    }


def test_group_pattern_masks_only_the_group_and_marks_the_arg() -> None:
    r = Redactor([r"--password=(\S+)"])
    ev = _exec_event("psql", "--password=hunter2", "-h", "db")
    out = r.event(ev)
    assert out["args"]["argv"]["value"] == ["psql", f"--password={MASK}", "-h", "db"]
    assert out["args"]["argv"]["redacted"] is True
    assert "redacted" not in out["args"]["filename"]
    assert ev["args"]["argv"]["value"][1] == "--password=hunter2"  # input left alone


def test_pattern_without_group_masks_the_match_in_string_and_mapping_values() -> None:
    r = Redactor([r"(?i)bearer [A-Za-z0-9]+"])
    ev = {"args": {"cmd": "curl -H Bearer abc123 x", "env": {"value": {"H": "bearer zz"}}}}
    out = r.event(ev)
    assert out["args"]["cmd"] == {"value": f"curl -H {MASK} x", "status": "ok", "redacted": True}
    assert out["args"]["env"]["value"] == {"H": MASK}


def test_no_patterns_or_no_match_returns_the_event_unchanged() -> None:
    ev = _exec_event("ls", "-l")
    assert Redactor().event(ev) is ev
    assert Redactor([r"--password=(\S+)"]).event(ev) is ev


def test_bad_pattern_fails_closed() -> None:
    r = Redactor(["(unclosed"])
    assert r.fail_closed and r.errors
    out = r.event(_exec_event("psql", "--password=hunter2"))
    assert out["args"]["argv"]["value"] == [MASK, MASK]
    assert out["args"]["filename"]["value"] == MASK


def test_several_patterns_and_groups() -> None:
    r = Redactor([r"--password=(\S+)", r"token=(\w+)&key=(\w+)"])
    assert (
        r.text("a --password=x token=t1&key=k2") == f"a --password={MASK} token={MASK}&key={MASK}"
    )


# default rules (issue 15): on without a policy file, across argv elements -------------------

SECRETS = [
    (["psql", "--password", "hunter2", "-h", "db"], "hunter2"),
    (["psql", "--password=hunter2"], "hunter2"),
    (["mysql", "-h", "db", "--db-password", "pw-9"], "pw-9"),
    (["env", "PGPASSWORD=s3cr3t", "psql"], "s3cr3t"),
    (["sh", "-c", "AWS_SECRET_ACCESS_KEY=AKIAxyz aws s3 ls"], "AKIAxyz"),
    (["curl", "https://bob:pw1@example.org/x"], "pw1"),
    (["curl", "-H", "Authorization: Bearer abc.def"], "abc.def"),
    (["curl", "-H", "X-Api-Key: zz99"], "zz99"),
    (["tool", "--api-key", "k-123", "--token=t-456"], "k-123"),
    (["sh", "-c", "mysql --password hunter2"], "hunter2"),
]


@pytest.mark.parametrize(("argv", "secret"), SECRETS)
def test_default_rules_mask_common_secret_shapes(argv: list[str], secret: str) -> None:
    # the patterns the controller sends by default (no policy file)
    out = Redactor(Policy().redact).event(_exec_event(*argv))
    assert secret not in repr(out), out
    assert out["args"]["argv"]["redacted"] is True
    # the controller's own pass over the text form an agent sends (an agent that skipped it)
    assert secret not in TextRedactor(Policy().redact).text(str(argv))


@pytest.mark.parametrize(("argv", "secret"), SECRETS)
def test_controller_masks_every_wire_form_of_an_unredacted_event(argv: list[str], secret: str):
    """An agent that skipped redaction sends the typed argv list and its text form: the
    controller's pass masks both, so no operator reads the secret from either."""
    from tracefleet.controller.domain.controller import _redact_arg
    from tracefleet.model import Event
    from tracefleet.model.wire import event_to_pb

    pb = event_to_pb(Event.from_json(_exec_event(*argv)))
    assert secret in str(pb)  # the agent left it in
    assert _redact_arg(TextRedactor(Policy().redact), pb.args["argv"])
    assert secret not in str(pb), pb.args["argv"]
    assert pb.args["argv"].redacted


def test_flag_value_pair_masks_only_the_value_element() -> None:
    out = Redactor(default_patterns()).event(_exec_event("psql", "--password", "hunter2", "-h"))
    assert out["args"]["argv"]["value"] == ["psql", "--password", MASK, "-h"]


def test_default_rules_leave_ordinary_command_lines_alone() -> None:
    r = Redactor(default_patterns())
    for argv in (["ls", "-l", "/srv/token"], ["git", "clone", "ssh://git@host/x"],
                 ["git", "log", "--author", "me"]):  # fmt: skip
        ev = _exec_event(*argv)
        assert r.event(ev) is ev


def test_policy_relaxes_and_adds_rules() -> None:
    p = parse_policy({"redact_relax": ["url"], "redact": [r"--pin=(\d+)"]})
    assert p.redact == (*default_patterns(["url"]), r"--pin=(\d+)")
    r = Redactor(p.redact)
    assert r.text("curl https://bob:pw1@x/ --pin=1234") == f"curl https://bob:pw1@x/ --pin={MASK}"
    with pytest.raises(PolicyError, match="redact_relax must be a list of default rule names"):
        parse_policy({"redact_relax": ["nope"]})
    assert set(DEFAULT_RULES) == {"flag", "env", "header", "bearer", "url"}


# policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "allowed", "ok"),
    [
        ("role=db", "role=db", True),
        ("role=db,zone=a", "role=db", True),
        ("all", "role=db", False),
        ("role=db|web", "role=db", False),
        ("role=db", "role=db|cache", True),
        ("node=db-1", "role=db", False),
        ("zone!=a|b", "zone!=a", True),
        ("zone=c", "zone!=a", True),
        ("zone=a", "zone!=a", False),
        ("anything=1", "all", True),
    ],
)
def test_selector_within(wanted: str, allowed: str, ok: bool) -> None:
    assert within(sel.parse(wanted), sel.parse(allowed)) is ok


def test_policy_allows_only_listed_sets_on_their_nodes() -> None:
    p = parse_policy(
        {"allow": [{"event_set": "exec", "selector": "role=db"}, {"event_set": "file"}],
         "redact": [r"--password=(\S+)", {"pattern": "x"}]}
    )  # fmt: skip
    assert p.redact == (*default_patterns(), r"--password=(\S+)", "x")
    assert p.check("exec", True, "role=db,zone=a") is None
    assert p.check("file", True, "") is None
    reason = p.check("exec", True, "all")
    assert reason and "role=db" in reason and "\n" not in reason
    assert "net" in (p.check("net", True, "role=db") or "")
    assert p.check("net", False, "") is None  # disabling is always allowed


def test_policy_without_allow_allows_everything() -> None:
    assert parse_policy({"redact": ["a"]}).check("exec", True, "all") is None
    assert parse_policy(None).check("exec", True, "all") is None


@pytest.mark.parametrize(
    "data",
    [
        {"allow": [{"selector": "role=db"}]},
        {"allow": [{"event_set": "exec", "selector": "role="}]},
        {"redact": ["(bad"]},
        {"deny": []},
        ["allow"],
    ],
)
def test_bad_policies_are_rejected(data: object) -> None:
    with pytest.raises(PolicyError):
        parse_policy(data, "p.yaml")
