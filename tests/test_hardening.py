"""Bad input of every kind gets a clear error naming what is wrong, before any weights are read, and
crafted files cannot hang or balloon the readers."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import groklm
from groklm import cli, kernels
from groklm.config import GrokConfig, get_preset
from groklm.convert import save_native
from groklm.files import CheckpointError
from groklm.formats.safe_pickle import _BFloat16, read_record
from groklm.formats.safetensors_io import read_header, read_into
from groklm.quant import check_int4_group
from groklm.tokenizer import TextStream, Tokenizer
from tests.conftest import GOLDEN, TOKENIZER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hollow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint with a config and a tokenizer but no weights: any command that reached the
    weights would fail with "0 tensor files", so an error about the request itself proves it was
    found first."""
    out = tmp_path_factory.mktemp("hollow")
    (out / "ckpt-0").mkdir()
    (out / "config.json").write_text(json.dumps(get_preset("mini").replace(sequence_len=200).to_dict()))
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    mini = get_preset("mini").to_dict()
    made = {
        "not-json": "{ not json",
        "missing": json.dumps({k: v for k, v in mini.items() if k != "emb_size"}),
        "wrong-type": json.dumps({**mini, "num_layers": "4"}),
        "negative": json.dumps({**mini, "key_size": -32}),
        "nan": json.dumps({**mini, "norm_eps": float("nan")}),
        "unknown": json.dumps({**mini, "n_layers": 4}),
        "other": json.dumps({**mini, "num_layers": 2}),
    }
    paths = {}
    for name, text in made.items():
        paths[name] = d / f"{name}.json"
        paths[name].write_text(text)
    paths["latin1"] = d / "prompt.txt"
    paths["latin1"].write_bytes("caf\xe9".encode("latin-1"))
    paths["long"] = d / "long.txt"
    paths["long"].write_text("word " * 200)
    paths["empty-dir"] = d / "empty"
    paths["empty-dir"].mkdir()
    paths["file"] = d / "prompt.txt"
    paths["full"] = d / "full"
    paths["full"].mkdir()
    (paths["full"] / "keep.txt").write_text("do not overwrite")
    return paths


# (arguments, where {H} is the hollow checkpoint and {F:name} a file above; the words the error must hold)
CLI_CASES: list[tuple[str, str]] = [
    ("generate --checkpoint {H}", "give one prompt"),
    ("generate --checkpoint {H} hello --prompt-ids 1,2", "got PROMPT and --prompt-ids"),
    ("generate --checkpoint {H} --prompt-ids 1,x", "--prompt-ids '1,x': not a comma-separated list"),
    ("generate --checkpoint {H} --prompt-ids ,", "--prompt-ids: no token ids"),
    ("generate --checkpoint {H} --prompt-ids 5,999999", "token ids [999999] are outside the vocabulary"),
    ("generate --checkpoint {H} ''", "the prompt is empty"),
    ("generate --checkpoint {H} --prompt-file /nonexistent/p.txt", "--prompt-file /nonexistent/p.txt: No such file"),
    ("generate --checkpoint {H} --prompt-file {F:latin1}", "not UTF-8 text"),
    ("generate --checkpoint {H} hi --top-p 0", "--top-p must be in (0, 1]"),
    ("generate --checkpoint {H} hi --top-p 1.5", "--top-p must be in (0, 1]"),
    ("generate --checkpoint {H} hi --temperature -1", "--temperature must be >= 0"),
    ("generate --checkpoint {H} hi --temperature nan", "--temperature must be a finite number"),
    ("generate --checkpoint {H} hi --top-k -5", "--top-k must be >= 0, or -1"),
    ("generate --checkpoint {H} hi --stop ''", "--stop: a stop string must not be empty"),
    ("generate --checkpoint {H} hi --max-new-tokens 0", "--max-new-tokens must be at least 1"),
    ("generate --checkpoint {H} hi --seed -1", "--seed must be in 0..9223372036854775807"),
    ("generate --checkpoint {H} hi --seed 18446744073709551616", "--seed must be in 0.."),
    ("generate --checkpoint {F:empty-dir} --prompt-ids 1 --config {F:nan}", "norm_eps must be a finite number"),
    ("generate --checkpoint {H} --tokenizer /nonexistent/t.model hi", "--tokenizer /nonexistent/t.model: no such file"),
    ("generate --checkpoint {H} --prompt-file {F:long}", "exceed the context of 200 tokens"),
    ("generate --checkpoint {H} hi --max-new-tokens 200", "the prompt (1 tokens) + --max-new-tokens 200 exceed"),
    ("generate --checkpoint {H} hi --threads 0", "--threads must be at least 1"),
    ("generate --checkpoint {H} hi --device cuda", "--device cuda: no CUDA device"),
    ("generate --checkpoint {H} hi --device tpu", "--device 'tpu': not a device"),
    ("generate --checkpoint {H} hi --mmap", "--mmap needs groklm's own layout"),
    ("generate --checkpoint /nonexistent --prompt-ids 1", "/nonexistent: no such checkpoint directory"),
    ("generate --checkpoint {F:long} --prompt-ids 1", "not a directory"),
    ("generate --checkpoint {F:empty-dir} --prompt-ids 1", "no checkpoint found"),
    ("generate --checkpoint {H} hi --config {F:not-json}", "not-json.json: not valid JSON"),
    ("generate --checkpoint {H} hi --config {F:missing}", "missing.json: config fields missing: ['emb_size']"),
    ("generate --checkpoint {H} hi --config {F:wrong-type}", "num_layers must be an integer, not '4'"),
    ("generate --checkpoint {H} hi --config {F:negative}", "key_size must be positive, not -32"),
    ("generate --checkpoint {H} hi --config {F:unknown}", "unknown config fields: ['n_layers']"),
    ("generate --checkpoint {H} hi --config {F:other}", "its config.json differs from the config given"),
    ("generate --checkpoint {H} hi --config {F:other} --preset mini", "not allowed with argument --config"),
    ("generate --checkpoint {H} hi --dtype fp16", "invalid choice: 'fp16'"),
    ("generate --checkpoint {H} hi --max-new-tokens abc", "invalid int value: 'abc'"),
    ("init-random {F:full}", "exists and is not empty (--force"),
    ("init-random {F:empty-dir}/x --tokenizer /nonexistent/t.model", "--tokenizer /nonexistent/t.model: no such file"),
    ("quantize " + str(GOLDEN) + " {F:empty-dir}/q0 --config " + str(GOLDEN / "case.json") + " --group-size 0",
     "int4 group size must be a positive integer, not 0"),
    ("quantize " + str(GOLDEN) + " {F:empty-dir}/q24 --config " + str(GOLDEN / "case.json") + " --group-size 24",
     "must be a multiple of 16 dividing every input size"),
    ("quantize " + str(GOLDEN) + " {F:full} --config " + str(GOLDEN / "case.json") + " --group-size 16", "exists and is not empty"),
    ("quantize " + str(GOLDEN) + " {F:empty-dir}/q8 --bits 8 --group-size 32", "--group-size is for --bits 4"),
    ("generate --checkpoint {H} hi --min-p 2", "--min-p must be in 0..1"),
    ("generate --checkpoint {H} hi --frequency-penalty 9", "--frequency-penalty must be in -2..2"),
    ("generate --checkpoint {H} hi --logit-bias 5", "--logit-bias: '5' is not ID=BIAS"),
    ("generate --checkpoint {H} hi --logit-bias 999999999=1", "--logit-bias: token ids [999999999] are outside"),
    ("serve --checkpoint {H} --lora-modules x", "--lora-modules 'x': give NAME=DIR"),
    ("serve --checkpoint {H} --lora-modules a=/nonexistent", "no adapter here"),
    ("info --checkpoint {F:empty-dir}", "no checkpoint found"),
    ("info --checkpoint {H} --config {F:not-json}", "not valid JSON"),
]  # fmt: skip


def _argv(template: str, hollow: Path, files: dict[str, Path]) -> list[str]:
    import shlex

    text = template.replace("{H}", str(hollow))
    for name, path in files.items():
        text = text.replace("{F:" + name + "}", str(path))
    return shlex.split(text)


@pytest.mark.parametrize("template, words", CLI_CASES, ids=[c[0][:48] for c in CLI_CASES])
def test_cli_refuses_bad_input_clearly_before_loading(
    template: str, words: str, hollow: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(template, hollow, files)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code in (1, 2), err
    assert words in err, err
    assert "Traceback" not in err and "tensor files" not in err  # the weights were never reached
    assert not list(files["empty-dir"].glob("q*")) and not list(files["empty-dir"].glob(".q*"))  # nothing half-written
    assert (files["full"] / "keep.txt").read_text() == "do not overwrite"


def test_cli_errors_in_a_real_process_have_no_traceback(hollow: Path) -> None:
    for argv, code in (
        (["generate", "--checkpoint", str(hollow), "hi", "--top-p", "0"], 2),
        (["generate", "--checkpoint", "/nonexistent", "hi"], 1),
        (["--version"], 0),
    ):
        r = subprocess.run([sys.executable, "-m", "groklm", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("groklm ")


def test_cli_help_lists_every_command_and_shows_defaults() -> None:
    help_text = cli.build_parser().format_help()
    for command in ("generate", "info", "init-random", "quantize"):
        assert command in help_text
    generate = next(
        a
        for a in cli.build_parser()._subparsers._group_actions[0].choices.items()
        if a[0] == "generate"  # type: ignore[union-attr]
    )[1].format_help()
    assert "(default: 100)" in generate and "--threads" in generate and "--no-echo" in generate


def test_ctrl_c_exits_130_without_a_traceback(mini_ckpt: Path) -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "groklm", "generate", "--checkpoint", str(mini_ckpt), "--prompt-ids", "5",
         "--max-new-tokens", "2000", "--ignore-eos", "--quiet", "--tokenizer", str(TOKENIZER)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.read(20)  # generation has started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def _raises(fn: Callable[[], Any], words: str, kind: type[BaseException] = ValueError) -> None:
    with pytest.raises(kind) as e:
        fn()
    assert words in str(e.value), str(e.value)


API_CASES: list[tuple[str, Callable[[groklm.Grok], Any], str, type[BaseException]]] = [
    ("load: config dict missing fields", lambda m: groklm.load(GOLDEN, config={"emb_size": 128}), "config fields missing", ValueError),
    ("load: config of another type", lambda m: groklm.load(GOLDEN, config=3), "config must be a GrokConfig", TypeError),
    ("load: no such path", lambda m: groklm.load("/nonexistent"), "no such checkpoint directory", CheckpointError),
    ("load: mmap on released", lambda m: groklm.load(GOLDEN, config=GOLDEN / "case.json", mmap=True), "mmap loading needs", ValueError),
    ("generate: top_p 0", lambda m: groklm.generate(m, [[5]], 2, top_p=0.0), "top_p must be in (0, 1]", ValueError),
    ("generate: no prompts", lambda m: groklm.generate(m, [], 2), "non-empty list", ValueError),
    ("generate: an empty prompt", lambda m: groklm.generate(m, [[1, 2], []], 2), "prompt 1 is empty", ValueError),
    ("generate: a text prompt", lambda m: groklm.generate(m, ["hello"], 2), "prompt 0 is empty or not a list", ValueError),
    ("generate: nan temperature", lambda m: groklm.generate(m, [[5]], 2, temperature=math.nan), "temperature must be a finite", ValueError),
    ("generate: negative seed", lambda m: groklm.generate(m, [[5]], 2, seed=-1), "seed must be in", ValueError),
    ("generate: no new tokens", lambda m: groklm.generate(m, [[5]], 0), "max_new_tokens must be at least 1", ValueError),
    ("generate: beyond the context", lambda m: groklm.generate(m, [[5] * 60], 10), "exceeds the context length", ValueError),
    ("generate_stream checks before iterating", lambda m: groklm.generate_stream(m, [[5]], 2, top_k=-2), "top_k must be", ValueError),
    ("TextStream: empty stop", lambda m: TextStream(Tokenizer(TOKENIZER), [], [""]), "must not be empty", ValueError),
    ("GrokConfig: zero layers", lambda m: GrokConfig(num_layers=0), "num_layers must be positive", ValueError),
    ("int4 group size", lambda m: check_int4_group(get_preset("mini"), 48), "multiple of 16", ValueError),
    ("Tokenizer: no file", lambda m: Tokenizer("/nonexistent/t.model"), "no tokenizer.model there", FileNotFoundError),
]  # fmt: skip


@pytest.mark.parametrize("name, call, words, kind", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input_clearly(
    name: str, call: Callable[[groklm.Grok], Any], words: str, kind: type[BaseException], mini_fp32: groklm.Grok
) -> None:
    small = groklm.Grok(mini_fp32.config.replace(sequence_len=64), torch.float32) if "context" in name else mini_fp32
    _raises(lambda: call(small), words, kind)


def test_api_errors_do_not_advise_cli_flags(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        groklm.find_tokenizer(tmp_path)
    assert "--" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Crafted pickles: refused within a second and 100 MB, measured in a fresh process.


def _op_str(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _get(i: int) -> bytes:
    return pickle.BINGET + bytes([i]) if i < 256 else pickle.LONG_BINGET + struct.pack("<I", i)


def _nested(depth: int, memo_base: int = 0) -> bytes:
    """A tuple holding the same tuple twice, `depth` levels deep: 2^depth leaves in a few hundred bytes,
    left on the stack (memo entries memo_base .. memo_base + depth)."""
    out = pickle.EMPTY_TUPLE + pickle.MEMOIZE + pickle.POP
    for level in range(depth):
        out += _get(memo_base + level) + _get(memo_base + level) + pickle.TUPLE2 + pickle.MEMOIZE + pickle.POP
    return out + _get(memo_base + depth)


_GLOBAL = _op_str("numpy.core.multiarray") + _op_str("_reconstruct") + pickle.STACK_GLOBAL
_HEAD = pickle.PROTO + b"\x04"


def _crafted(kind: str) -> bytes:
    deep = 48
    if kind == "shape":  # _reconstruct(ndarray, (0,), b'b'), then BUILD (1, NESTED, dtype, False, b'')
        arr = _GLOBAL + pickle.MEMOIZE + _op_str("numpy") + _op_str("ndarray") + pickle.STACK_GLOBAL + pickle.MEMOIZE
        arr += pickle.EMPTY_TUPLE + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE3 + pickle.REDUCE
        state = pickle.MARK + pickle.BININT1 + b"\x01" + _nested(deep, 2) + _op_str("numpy") + _op_str("dtype")
        state += pickle.STACK_GLOBAL + _op_str("i1") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE
        state += pickle.NEWFALSE + pickle.SHORT_BINBYTES + b"\x00" + pickle.TUPLE + pickle.BUILD
        return _HEAD + arr + state + pickle.STOP
    if kind == "dtype":  # numpy.dtype(NESTED, False, True)
        return (_HEAD + _op_str("numpy") + _op_str("dtype") + pickle.STACK_GLOBAL + _nested(deep)
                + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE + pickle.STOP)  # fmt: skip
    if kind == "dict-key":  # {NESTED: None}
        return _HEAD + pickle.EMPTY_DICT + _nested(deep) + pickle.NONE + pickle.SETITEM + pickle.STOP
    if kind == "list-after":  # L = []; T = (L, L, ...) nested; then L grows: refused once held
        out = _HEAD + pickle.EMPTY_LIST + pickle.MEMOIZE + _get(0) + _get(0) + pickle.TUPLE2 + pickle.MEMOIZE
        return out + _get(0) + pickle.NONE + pickle.APPEND + pickle.STOP
    if kind == "opcodes":  # a million NONE/POP pairs
        return _HEAD + (pickle.NONE + pickle.POP) * 1_000_000 + pickle.NONE + pickle.STOP
    if kind == "memo":
        return _HEAD + (pickle.NONE + pickle.MEMOIZE + pickle.POP) * 50_000 + pickle.NONE + pickle.STOP
    if kind == "wide-list":  # one list of 200k references to the same element
        return _HEAD + pickle.NONE + pickle.MEMOIZE + pickle.MARK + _get(0) * 50_000 + pickle.LIST + pickle.STOP
    if kind == "build-global":  # set attributes of an allowed global: the bfloat16 stand-in class itself
        return (_HEAD + _op_str("ml_dtypes") + _op_str("bfloat16") + pickle.STACK_GLOBAL + pickle.NONE
                + pickle.EMPTY_DICT + _op_str("torch_dtype") + _op_str("evil") + pickle.SETITEM + pickle.TUPLE2
                + pickle.BUILD + pickle.STOP)  # fmt: skip
    raise AssertionError(kind)


_MEASURE = r"""
import json, sys, time
from pathlib import Path
from tests.conftest import peak_rss_since_reset, reset_peak_rss
from groklm.files import CheckpointError
from groklm.formats.safe_pickle import read_record
before = reset_peak_rss()
t = time.perf_counter()
try:
    read_record(Path(sys.argv[1]))
    outcome = "accepted"
except CheckpointError as e:
    outcome = str(e)
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - t, "grew": peak_rss_since_reset() - before}))
"""

CRAFTED = {
    "shape": "over 4096 elements",
    "dtype": "over 4096 elements",
    "dict-key": "over 4096 elements",
    "list-after": "changed after another container took it",
    "opcodes": "more than 100000 pickle opcodes",
    "memo": "more than 10000 memo entries",
    "wide-list": "over 4096 elements",
    "build-global": "refusing to set the state of",
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_pickles_are_refused_within_a_second_and_100mb(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "tensor00000_000"
    path.write_bytes(_crafted(kind))
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    m = json.loads(r.stdout)
    assert str(path) in m["outcome"] and CRAFTED[kind] in m["outcome"], m
    assert m["seconds"] < 1.0 and m["grew"] < 100 * 2**20, m


def test_small_crafted_pickles_are_small() -> None:
    assert len(_crafted("shape")) < 500 and len(_crafted("dict-key")) < 400  # 2^48 elements each


def test_build_on_an_allowed_global_changes_nothing(tmp_path: Path) -> None:
    before = dict(vars(_BFloat16))
    path = tmp_path / "t"
    path.write_bytes(_crafted("build-global"))
    with pytest.raises(CheckpointError, match="refusing to set the state of"):
        read_record(path)
    assert dict(vars(_BFloat16)) == before


def test_numpy_protocol_5_arrays_load(tmp_path: Path, golden_config: GrokConfig) -> None:
    ckpt = tmp_path / "ckpt-0"
    shutil.copytree(GOLDEN / "ckpt-0", ckpt)
    norm = np.linspace(0.5, 1.5, 128, dtype=np.float32)
    (ckpt / "tensor00009_000").write_bytes(pickle.dumps(norm, protocol=5))
    big = np.random.default_rng(0).standard_normal((1024, 128)).astype(np.float32)  # data outside a frame
    (ckpt / "tensor00000_000").write_bytes(pickle.dumps(big, protocol=5))
    model = groklm.load(ckpt, golden_config, dtype=torch.float32, progress=False)
    assert torch.equal(model.layers[0].attn_norm.weight, torch.from_numpy(norm))
    assert torch.equal(model.embed.weight, torch.from_numpy(big))


# ---------------------------------------------------------------------------------------------
# groklm's safetensors shards.


@pytest.fixture
def native(tmp_path: Path, golden_config: GrokConfig) -> Path:
    return save_native(groklm.load(GOLDEN, golden_config, dtype=torch.bfloat16, progress=False), tmp_path / "n")


def _rewrite_header(shard: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    assert len(new) == n, "the change must keep the header's length"
    shard.write_bytes(raw[:8] + new + raw[8 + n :])


def test_corrupt_shard_header_names_the_shard(native: Path) -> None:
    shard = native / "model-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(raw))
    _raises(
        lambda: groklm.load(native, progress=False),
        "model-00002.safetensors: corrupt safetensors header",
        CheckpointError,
    )


def test_oversized_header_length_names_the_shard(native: Path) -> None:
    shard = native / "model-00003.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    _raises(
        lambda: groklm.load(native, progress=False),
        "model-00003.safetensors: not a safetensors file or truncated",
        CheckpointError,
    )


def test_offsets_past_the_end_name_the_shard_and_tensor(native: Path) -> None:
    shard = native / "model-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _raises(lambda: groklm.load(native, progress=False), "model-00001.safetensors: tensor", CheckpointError)
    _raises(lambda: groklm.load(native, progress=False), "past the end of the file", CheckpointError)


def test_scales_of_the_wrong_dtype_are_refused(native: Path) -> None:
    from safetensors.torch import load_file, save_file

    shard = native / "model-00001.safetensors"
    tensors = load_file(str(shard))
    tensors["layers.0.attn.wq.scales"] = tensors["layers.0.attn.wq.scales"].to(torch.int8)
    save_file(tensors, str(shard))
    _raises(
        lambda: groklm.load(native, progress=False),
        "tensor layers.0.attn.wq.scales: stored as I8, expected BF16",
        CheckpointError,
    )


def test_a_missing_shard_is_named(native: Path) -> None:
    (native / "model-00005.safetensors").unlink()
    _raises(
        lambda: groklm.load(native, progress=False), "shard files missing: model-00005.safetensors", CheckpointError
    )


def test_a_shard_truncated_after_its_header_was_read_is_an_error_not_a_crash(native: Path) -> None:
    shard = native / "model-00001.safetensors"
    entries, _ = read_header(shard)
    entry = max(entries.values(), key=lambda e: e.offset)
    shard.write_bytes(shard.read_bytes()[: entry.offset + 10])  # the header is stale now
    _raises(lambda: read_into(entry, torch.empty(entry.shape, dtype=entry.dtype)), "file ended inside", CheckpointError)


_MAPPED = r"""
import os, sys, torch, groklm
model = groklm.load(sys.argv[1], mmap=True, progress=False)
shard = os.path.join(sys.argv[1], "model-00001.safetensors")
os.truncate(shard, 4096)
print("truncated", flush=True)
model(torch.tensor([[5, 6, 7]]))
print("survived")
"""


def test_a_shard_truncated_while_memory_mapped_ends_with_a_message(native: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _MAPPED, str(native)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if not kernels.available():
        pytest.skip("the guard needs the native library; without it faulthandler reports the bus error")
    assert r.returncode == 135, (r.returncode, r.stderr)
    assert "memory-mapped checkpoint file shrank while in use" in r.stderr and "shards of" in r.stderr
    assert "survived" not in r.stdout


# ---------------------------------------------------------------------------------------------
# Threads and slow one-time steps.


def test_busy_cores_sees_a_busy_process_and_threads_follow() -> None:
    quiet = kernels.busy_cores(0.3)
    deadline = time.monotonic() + 10
    while quiet > 0.9 and time.monotonic() < deadline:  # let earlier tests' threads and processes settle
        time.sleep(0.5)
        quiet = kernels.busy_cores(0.3)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = kernels.busy_cores(0.5)
    finally:
        hog.kill()
        hog.wait(timeout=10)
    assert busy > quiet + 0.6, (quiet, busy)
    assert 1 <= kernels.choose_threads() <= len(os.sched_getaffinity(0))


def test_omp_num_threads_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert kernels.choose_threads() == 3


def test_a_stale_build_lock_does_not_stall_the_next_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's extension builder waits for as long as its lock file exists; a build killed mid-way
    leaves one behind. groklm holds its own (kernel-released) lock while building and clears theirs."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("GROKLM_CACHE", str(tmp_path))
    built: list[str] = []

    def fake_load(name: str, sources: list[str], build_directory: str, **_: Any) -> None:
        deadline = time.monotonic() + 5
        while os.path.exists(os.path.join(build_directory, "lock")):  # torch's FileBaton.wait, bounded here
            assert time.monotonic() < deadline, "waited on a stale lock"
            time.sleep(0.05)
        shutil.copy(sys.executable, os.path.join(build_directory, f"{name}.so"))  # any file: loading is not tested
        built.append(name)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(
        kernels.build.ctypes, "CDLL", lambda path: (_ for _ in ()).throw(OSError("not loaded in this test"))
    )
    for stale in tmp_path.glob("ops-*"):
        shutil.rmtree(stale)
    source = kernels.build.CSRC / "ops.cpp"
    key = source.read_bytes() + torch.__version__.encode() + str(Path(torch.__file__).parent).encode()
    import hashlib

    build = tmp_path / f"ops-{hashlib.sha256(key).hexdigest()[:16]}"
    build.mkdir()
    (build / "lock").write_text("")  # left by a killed build
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert kernels.build.build_cpp_ops() is None  # (the fake library does not load)
    assert built and "building the C++ kernel ops" in err.getvalue()
