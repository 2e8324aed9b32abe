"""Shared fixtures: repo paths, and skips that name what is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
WORKLOADS = BUILD / "workloads"
BPF_DIR = BUILD / "bpf"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_BPF, CAP_PERFMON): run the BPF suite with sudo")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def workloads() -> Path:
    if not (WORKLOADS / "cold_rodata").exists():
        pytest.skip("test workloads not built: run `make workloads`")
    return WORKLOADS
