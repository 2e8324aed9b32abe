"""Node selectors: parsing, canonical text, matching, and errors that say how to fix them."""

import pytest

from tracefleet.controller.common.selector import SelectorError, parse


@pytest.mark.parametrize("text", ["", "all", " all ", "*"])
def test_all_selects_every_node(text):
    s = parse(text)
    assert s.selects_all
    assert s.matches("anything", {})
    assert str(s) == "all"


def test_labels_are_anded():
    s = parse("role=db,zone=a")
    assert s.matches("n1", {"role": "db", "zone": "a", "x": "y"})
    assert not s.matches("n1", {"role": "db", "zone": "b"})
    assert not s.matches("n1", {"role": "db"})


def test_alternatives_negation_and_node_names():
    s = parse("role=db|cache, zone!=b")
    assert s.matches("n", {"role": "cache", "zone": "a"})
    assert s.matches("n", {"role": "db"})  # a missing label is "not equal"
    assert not s.matches("n", {"role": "db", "zone": "b"})
    assert not s.matches("n", {"role": "web"})
    names = parse("node=web-1|web-2")
    assert names.matches("web-2", {})
    assert not names.matches("web-3", {"node": "web-1"})  # node= is the name, not a label


def test_canonical_text_is_order_independent():
    assert str(parse("zone=a, role=db|cache")) == str(parse("role=cache|db,zone=a"))
    assert str(parse("role==db")) == "role=db"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("role", "has no '='"),
        ("web-1", "node=NAME"),
        ("role=db,,zone=a", "extra comma"),
        ("role=", "bad value ''"),
        ("=db", "bad label key ''"),
        ("ro le=db", "bad label key"),
        ("role=d b", "bad value"),
        ("role=db|", "bad value ''"),
        ("all,role=db", "cannot be combined"),
    ],
)
def test_malformed_selectors_explain_the_fix(text, fragment):
    with pytest.raises(SelectorError) as e:
        parse(text)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg
    assert "e.g." in msg or "combined" in msg
