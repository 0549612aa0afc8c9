"""Converting bench-mid (released format, 5.2 GB) to each format: peak RSS, time and output size, as JSON.

    .venv/bin/python benchmarks/convert.py [--formats hf:bf16 gguf:q8_0 gguf:f16 native:4] [--keep]

Each conversion runs in a fresh process; its peak RSS (VmHWM, Python and torch included) is read
there. Outputs go to benchmarks/.cache/convert/ and are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import groklm
from groklm.config import get_preset

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
_RUN = r"""
import json, sys
from pathlib import Path
from groklm.convert import convert
src, out, to, qtype = sys.argv[1:5]
if to == "native":
    convert(src, out, to, bits=int(qtype), group_size=64, progress=False)
else:
    convert(src, out, to, qtype, progress=False)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({"peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024}))
"""


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--formats", nargs="+", default=["hf:bf16", "gguf:q8_0", "gguf:f16", "native:4"])
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    src = CACHE / "bench-mid"
    if not (src / "ckpt-0").is_dir():
        groklm.write_random_checkpoint(src, get_preset("bench-mid"), seed=0, progress=False)
    checkpoint = size(src / "ckpt-0")
    layer = sum(f.stat().st_size for f in (src / "ckpt-0").iterdir()) / 8  # (the table's file included, roughly)
    report: dict[str, object] = {"checkpoint_bytes": checkpoint}
    for spec in args.formats:
        to, qtype = spec.split(":")
        out = CACHE / "convert" / (f"{to}-{qtype}" + (".gguf" if to == "gguf" else ""))
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _RUN, str(src), str(out), to, qtype], capture_output=True, text=True,
                           cwd=ROOT, check=True)  # fmt: skip
        seconds = time.perf_counter() - t
        peak = json.loads(r.stdout)["peak_rss_bytes"]
        report[spec] = {"peak_rss_GB": round(peak / 1e9, 3), "seconds": round(seconds, 1),
                        "output_GB": round(size(out) / 1e9, 2), "peak_over_a_layer": round(peak / layer, 2)}  # fmt: skip
        print(json.dumps({spec: report[spec]}), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
