"""benchmarks/builds.py runs its builds side by side and reports each; bad sizes are refused up front."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from groklm import kernels

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.builds", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.skipif(not kernels.available(), reason="the native kernels are not built on this machine")
@pytest.mark.parametrize(("bits", "rows"), [("8", "1"), ("8", "8"), ("4", "1")])
def test_builds_alternate_and_report_each(bits: str, rows: str) -> None:
    done = run("--bits", bits, "--rows", rows, "--groups", "2", "--mb", "2", "--seconds", "0.3", "--", "",
               "-DROW_PREFETCH=1024")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["weight"]["layout"] == ("rows" if bits == "8" else "panels")
    assert list(report["builds"]) == ["(source as it is)", "-DROW_PREFETCH=1024"]
    for build in report["builds"].values():
        assert build["GBps"]["min"] > 0 and build["over_plain_read"]["median"] > 0
    assert report["calls_each"] >= 1 and report["activation_rows"] == int(rows)


def test_bad_sizes_are_refused_before_any_build() -> None:
    done = run("--k", "100", "--", "")
    assert done.returncode == 2 and "--k must split" in done.stderr.splitlines()[-1]
