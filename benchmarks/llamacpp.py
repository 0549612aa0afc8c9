"""groklm against llama.cpp on the same weights, alternating in one run: batch-1 decode and a 512-token
prefill at int8 / Q8_0 and int4 / Q4_0, as JSON with the CPU named and groklm's speed over llama.cpp's.

    .venv/bin/python -m benchmarks.llamacpp [--preset bench-mid | --checkpoint DIR] [--reps 3] [--threads N]

llama.cpp is built once from llama-cpp-python's sdist on PyPI (it vendors the whole llama.cpp tree;
VERSION pins it), CPU only and for this CPU (`GGML_NATIVE`), into benchmarks/.cache/llamacpp: the
first run needs PyPI (or the sdist already there), cmake and a C++ compiler; later runs need neither.
The checkpoint is a random one of the preset (as decode.py makes it) unless --checkpoint names one;
its GGUFs are written by `groklm convert --to gguf --type q8_0 / q4_0 --embedding-type q8_0`, and groklm's
int4 side is an
int4 copy with 32-column groups (Q4_0's blocks, so both read the same bytes). groklm runs the code
decode.py measures (eager decode after a 64-token context, one prompt's prefill) in this process;
llama.cpp runs `llama-bench -p 512 -n 0` and `-p 0 -n STEPS`, one repetition a call, with the same
threads.

The head: groklm's GGUF keeps the embedding F32 by default (see formats/gguf.py), and with a tied head
llama.cpp would then read the whole F32 table every token, where groklm reads its own int8 copy; the
GGUFs are written with a Q8_0 embedding so that both systems read the same bytes (the report names the
head's type: `as_written.head`, `as_run.head`). A file without a vocabulary (a random checkpoint has no
tokenizer) gets llama.cpp's `none` tokenizer with the model's vocabulary size from llama-quantize,
which llama-bench needs (every tensor copied as it is, the Q8_0 head too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import torch

import groklm
from benchmarks import cpu
from benchmarks.decode import decode_rate, int4_checkpoint, prefill_rate, read_bandwidth, weight_bytes
from groklm import kernels
from groklm.config import get_preset

VERSION = "0.3.36"  # llama-cpp-python, vendoring llama.cpp with ggml 0.25.3
CACHE = Path(__file__).resolve().parent / ".cache"
LLAMA = CACHE / "llamacpp"
TOOLS = ("llama-bench", "llama-quantize")
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_METAL=OFF", "-DGGML_CUDA=OFF",
                 "-DGGML_VULKAN=OFF"]  # fmt: skip
QTYPES = {"int8": "q8_0", "int4": "q4_0"}


def build(jobs: int) -> Path:
    """The directory of llama.cpp's built TOOLS (downloaded, unpacked and built on the first call)."""
    src = LLAMA / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    out = LLAMA / f"build-{VERSION}"
    if all((out / "bin" / tool).is_file() for tool in TOOLS):
        return out / "bin"
    if not (src / "CMakeLists.txt").is_file():
        sdist = LLAMA / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={VERSION}", "-d", str(LLAMA)], check=True)  # fmt: skip
        with tarfile.open(sdist) as tar:
            tar.extractall(LLAMA, filter="data")
    if not (out / "CMakeCache.txt").is_file():
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(src), "-B", str(out), *generator, *CMAKE_OPTIONS], check=True)
    subprocess.run(["cmake", "--build", str(out), "--target", *TOOLS, "-j", str(jobs)], check=True)
    return out / "bin"


def gguf_summary(path: Path) -> dict[str, object]:
    """The GGUF's head type (token_embd: the head too, being tied), its tensors' types counted, and
    whether it has a vocabulary llama.cpp can load."""
    import gguf

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    head = types.get("output.weight", types.get("token_embd.weight"))
    return {
        "head": head,
        "tensor_types": dict(Counter(types.values())),
        "vocabulary": "tokenizer.ggml.model" in reader.fields,
    }


def llama_gguf(bin_dir: Path, ckpt: Path, qtype: str, vocab: int, threads: int) -> tuple[Path, dict[str, object]]:
    """The GGUF llama.cpp runs for `qtype` (written by `groklm convert` with a Q8_0 head, then given a
    vocabulary by llama-quantize where it lacks one) and what was done to it."""
    written = CACHE / "gguf" / f"{ckpt.name}-{qtype}-q8head.gguf"
    if not written.is_file():
        written.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "groklm", "convert", "--checkpoint", str(ckpt), "--out", str(written),
                        "--to", "gguf", "--type", qtype, "--embedding-type", "q8_0", "--quiet", "--force"],
                       check=True)  # fmt: skip
    found = gguf_summary(written)
    report: dict[str, object] = {"written": str(written), "as_written": found}
    if found["vocabulary"]:
        return written, report
    # (--token-embedding-type names the type the head has, so that llama-quantize copies it as it is.)
    extra = ["--token-embedding-type", "q8_0", "--override-kv", "tokenizer.ggml.model=str:none",
             "--override-kv", f"grok.vocab_size=int:{vocab}"]  # fmt: skip
    ran = written.with_name(written.stem + "-llamacpp.gguf")
    if not ran.is_file():
        tmp = ran.with_suffix(".tmp")
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", "--pure", *extra, str(written), str(tmp),
                        qtype.upper(), str(threads)], check=True, capture_output=True)  # fmt: skip
        tmp.rename(ran)
    report |= {"ran": str(ran), "vocabulary_by": "llama-quantize " + " ".join(extra), "as_run": gguf_summary(ran)}
    return ran, report


def llama_bench(bin_dir: Path, gguf: Path, prompt: int, gen: int, threads: int) -> float:
    """Tokens/s of one llama-bench repetition: a prompt of `prompt` tokens, or `gen` decoded tokens."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-r", "1",
                          "-t", str(threads), "-o", "json"], check=True, capture_output=True, text=True)  # fmt: skip
    return bench_rate(out.stdout)


def bench_rate(text: str) -> float:
    """The mean tokens/s of llama-bench's JSON output (one test)."""
    (test,) = json.loads(text)
    return float(test["avg_ts"])


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def compare(groklm_rates: list[float], llama_rates: list[float]) -> dict[str, object]:
    """Both systems' tokens/s over the rounds, and groklm's over llama.cpp's: of the medians, and round
    by round (each round ran both back to back, so a change in the machine's speed falls on both)."""
    paired = [g / ll for g, ll in zip(groklm_rates, llama_rates, strict=True)]
    return {"groklm_tokens_per_s": spread(groklm_rates), "llamacpp_tokens_per_s": spread(llama_rates),
            "groklm_over_llamacpp": round(statistics.median(groklm_rates) / statistics.median(llama_rates), 3),
            "groklm_over_llamacpp_by_round": spread(paired)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-mid")
    parser.add_argument("--checkpoint", help="benchmark this int8 checkpoint (groklm's layout or released) instead")
    parser.add_argument("--reps", type=int, default=3, help="rounds, each running both systems")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of both")
    parser.add_argument("--steps", type=int, default=32, help="decoded tokens a measurement")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens a prefill measurement")
    parser.add_argument("--build-jobs", type=int, default=os.cpu_count(), help="parallel jobs of llama.cpp's build")
    parser.add_argument("--bits", default="8,4", help="which of int8 (8) and int4 (4) to run, comma-separated")
    args = parser.parse_args()

    bin_dir = build(args.build_jobs)
    ckpt = Path(args.checkpoint) if args.checkpoint else CACHE / args.preset
    if not args.checkpoint and not (ckpt / "ckpt-0").is_dir():
        groklm.write_random_checkpoint(ckpt, get_preset(args.preset), seed=0, progress=False)
    torch.set_num_threads(args.threads)
    report: dict[str, object] = {"cpu": cpu(), "threads": args.threads, "checkpoint": str(ckpt),
                                 "llamacpp": f"llama-cpp-python {VERSION}'s llama.cpp, llama-bench"}  # fmt: skip
    for bits in [{"8": "int8", "4": "int4"}[b] for b in args.bits.split(",")]:
        path = ckpt if bits == "int8" else int4_checkpoint(ckpt, 32)
        model = groklm.load(path, dtype=torch.bfloat16, progress=False)
        gguf, how = llama_gguf(bin_dir, ckpt, QTYPES[bits], model.config.vocab_size, args.threads)
        rates: dict[str, list[float]] = {k: [] for k in ("g_decode", "l_decode", "g_prefill", "l_prefill")}
        levels: dict[str, list[float]] = {"groklm": [], "llamacpp": []}  # the memory's speed before each decode
        decode_rate(model, 1, 2)  # warm-up (first-touch of the weights, the kernels' build)
        for _ in range(args.reps):
            levels["groklm"].append(read_bandwidth(0.5, 3) / 1e9)
            rates["g_decode"].append(decode_rate(model, 1, args.steps))
            levels["llamacpp"].append(read_bandwidth(0.5, 3) / 1e9)
            rates["l_decode"].append(llama_bench(bin_dir, gguf, 0, args.steps, args.threads))
            rates["g_prefill"].append(prefill_rate(model, args.prefill)[0])
            rates["l_prefill"].append(llama_bench(bin_dir, gguf, args.prefill, 0, args.threads))
        # groklm's bytes a token; llama.cpp's GGUF holds the same weights (its head quantized too) in about as
        # many (Q8_0 6% more): a decode rate times them is about the speed each read memory at.
        step_bytes = weight_bytes(model, 2)
        report[bits] = {"groklm_checkpoint": str(path), "gguf": how, "kernels": kernels.isa(),
                        "weight_bytes_per_token": step_bytes,
                        "read_bandwidth_GBps_before_decode": {k: spread(v) for k, v in levels.items()},
                        "decode_b1": compare(rates["g_decode"], rates["l_decode"]),
                        f"prefill_{args.prefill}": compare(rates["g_prefill"], rates["l_prefill"])}  # fmt: skip
        del model
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
