"""Reading the controller's configuration files (tokens, policy): YAML, or JSON by suffix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def load_yaml_or_json(path: str | Path, what: str, error: type[Exception]) -> Any:
    """Parsed contents of ``path`` (JSON if it ends in .json, else YAML); ``error`` with a
    one-line cause naming ``what`` (e.g. "policy file") if it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror}") from None
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise error(f"{what} {p} is not valid YAML/JSON: {e}") from None
