"""The command line as a new user meets it: one spelling for an option in every command, every option
explained with its default once, exit status 2 and the command's own usage for a bad command line, and
`serve` refusing a port in use before it reads a weight."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from groklm import cli
from groklm.config import get_preset
from groklm.train.common import loss_ends
from tests.conftest import GOLDEN, TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
CASE = str(GOLDEN / "case.json")


@pytest.fixture(scope="module")
def hollow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config and a tokenizer but no weights: a command that reached the weights fails with "0 tensor
    files", so an error about the command line proves it was found first."""
    out = tmp_path_factory.mktemp("hollow")
    (out / "ckpt-0").mkdir()
    (out / "config.json").write_text(json.dumps(get_preset("mini").to_dict()))
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    return out


def _parsers() -> list[argparse.ArgumentParser]:
    """Every command's parser, `analyze routing` included."""
    out, todo = [], [cli.build_parser()]
    while todo:
        p = todo.pop()
        out.append(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    return out


def test_every_option_has_help_and_shows_its_default_once() -> None:
    parsers = _parsers()
    assert len(parsers) == 14  # groklm, its 12 commands and analyze routing
    for p in parsers:
        text = p.format_help()
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help is not argparse.SUPPRESS, (p.prog, action.option_strings)
            # The option's entry: from its first option string to the next entry (two-space indent).
            start = text.index("\n  " + ", ".join(action.option_strings[:1]))
            end = text.find("\n  -", start + 1)
            entry = " ".join(text[start : end if end > 0 else None].split())
            assert entry.count("default") <= 1, (p.prog, entry)
    generate = next(p for p in parsers if p.prog == "groklm generate").format_help()
    assert "at most this many new tokens (default: 100)" in " ".join(generate.split())


def test_the_checkpoint_is_an_option_in_every_command_and_the_old_paths_still_work() -> None:
    parser = cli.build_parser()
    for argv in (["quantize", "IN", "OUT"], ["quantize", "--checkpoint", "IN", "--out", "OUT"],
                 ["quantize", "--checkpoint", "IN", "OUT"], ["quantize", "IN", "--bits", "8", "OUT"]):  # fmt: skip
        args = parser.parse_args(argv)
        assert (args.checkpoint, args.out) == ("IN", "OUT"), argv
    for argv in (
        ["convert", "IN", "OUT", "--to", "hf"],
        ["convert", "--to", "hf", "--out", "OUT", "--checkpoint", "IN"],
    ):
        args = parser.parse_args(argv)
        assert (args.checkpoint, args.out, args.to) == ("IN", "OUT", "hf")
    assert (
        parser.parse_args(["verify", "C"]).checkpoint == parser.parse_args(["verify", "--checkpoint", "C"]).checkpoint
    )
    assert parser.parse_args(["init-random", "O"]).out == "O"
    for command in ("generate", "serve", "quantize", "convert", "verify", "info", "finetune", "merge", "plan"):
        assert "--checkpoint PATH" in parser._subparsers._group_actions[0].choices[command].format_usage()  # type: ignore[union-attr]
    ro = ["analyze", "routing", "--checkpoint", "C", "--out", "O"]
    assert (
        parser.parse_args([*ro, "--text", "f"]).prompt_file
        == parser.parse_args([*ro, "--prompt-file", "f"]).prompt_file
    )
    train = ["train", "--preset", "tiny", "--data", "d", "--out", "o", "--train-tokenizer", "512"]
    ft = ["finetune", "--checkpoint", "C", "--data", "d", "--out", "o"]
    assert not parser.parse_args(train).checkpointing and parser.parse_args([*train, "--checkpointing"]).checkpointing
    assert parser.parse_args(ft).checkpointing and not parser.parse_args([*ft, "--no-checkpointing"]).checkpointing


# (arguments, where {H} is a checkpoint without weights and {T} a new directory; the words of the one error
# line; the usage it shows: argparse's errors show the command's own, the later checks none)
BAD: list[tuple[str, str, str | None]] = [
    ("generate --checkpoint {H} --bogus", "unrecognized arguments: --bogus", "groklm generate"),
    ("generate --checkpoint {H} hi --max-new-tokns 5", "unrecognized arguments: --max-new-tokns 5", "groklm generate"),
    ("generate hi", "the following arguments are required: --checkpoint", "groklm generate"),
    ("generate --checkpoint {H} hi --config /nonexistent.json", "--config /nonexistent.json: no such file", None),
    ("generate --checkpoint {H} hi --tokenizer /nonexistent.model", "--tokenizer /nonexistent.model: no such", None),
    ("generate --checkpoint {H} --prompt-ids 1 --adapter /nonexistent", "--adapter /nonexistent: no such dir", None),
    ("serve --checkpoint {H} --prot 80", "unrecognized arguments: --prot 80", "groklm serve"),
    ("serve --checkpoint {H} --port 70000", "--port 70000: not a port", None),
    ("serve --checkpoint {H} --chat-template /nonexistent.j2", "--chat-template /nonexistent.j2: no such", None),
    ("quantize {H}", "the following arguments are required: --out", "groklm quantize"),
    ("quantize {H} {T}/q {T}/r", "unrecognized arguments: {T}/r", "groklm quantize"),
    ("quantize --checkpoint {H} --out {T}/q --bits 3", "argument --bits: invalid choice: 3", "groklm quantize"),
    ("quantize --checkpoint {H} --out {T}/q --bits 8 --group-size 32", "--group-size is for --bits 4", None),
    ("convert --checkpoint {G} --out {T}/c --to gguf --type q3_k --config {C}", "--type for --to gguf must be", None),
    ("convert --checkpoint {G} --out {T}/c --to native --type q8_0", "--type is for --to hf or gguf", None),
    ("convert {G} {T}/c --to xml", "argument --to: invalid choice: 'xml'", "groklm convert"),
    ("verify", "the following arguments are required: --checkpoint", "groklm verify"),
    ("verify {G} --sha256 /nonexistent.sha256", "--sha256 /nonexistent.sha256: no such file", None),
    ("info --checkpont {H}", "unrecognized arguments: --checkpont", "groklm info"),
    ("analyze routing --checkpoint {H} --out {T}/a --bogus", "unrecognized arguments: --bogus", "groklm analyze routing"),
    ("analyze routing --checkpoint {H} --out {T}/a", "give one input: --prompt-file FILE", None),
    ("analyze routing --checkpoint {H} --out {T}/a --text /nonexistent.txt", "--prompt-file /nonexistent.txt", None),
    ("finetune --checkpoint {H} --data /nonexistent.jsonl --out {T}/f", "--data /nonexistent.jsonl: no such file", None),
    ("finetune --checkpoint {H} --data {T} --out {T}/f", "not a file", None),
    ("finetune --checkpoint {H} --data {T} --out {T}/f --checkpointing=no", "ignored explicit argument", "groklm finetune"),
    ("merge --checkpoint {H} --adapter /nonexistent --out {T}/m", "--adapter /nonexistent: no such directory", None),
    ("train --preset tiny --data /nonexistent --out {T}/t --train-tokenizer 512", "--data /nonexistent: no such", None),
    ("train --preset tiny --data {T} --out {T}/t", "one of the arguments --tokenizer --train-tokenizer", "groklm train"),
    ("train --data {T} --out {T}/t --train-tokenizer 512", "give the model to train: --preset NAME or --config", None),
    ("plan --gpus 0", "--gpus must be at least 1, not 0", None),
    ("plan --gpus 8 --gpu tpu", "argument --gpu: invalid choice: 'tpu'", "groklm plan"),
    ("init-random", "the following arguments are required: --out", "groklm init-random"),
    ("frobnicate", "argument COMMAND: invalid choice: 'frobnicate'", "groklm"),
]  # fmt: skip


@pytest.mark.parametrize("template, words, usage", BAD, ids=[b[0][:40] for b in BAD])
def test_a_bad_command_line_exits_2_with_one_error_line_and_its_own_usage(
    template: str, words: str, usage: str | None, hollow: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill = {"{H}": str(hollow), "{T}": str(tmp_path), "{G}": str(GOLDEN), "{C}": CASE}
    for key, value in fill.items():
        template, words = template.replace(key, value), words.replace(key, value)
    try:
        code = cli.main(template.split())
    except SystemExit as e:  # argparse's own errors
        code = e.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in err and "tensor files" not in err
    if usage is None:
        assert err.count("\n") == 1, err  # the one line, no usage
    else:
        assert err.startswith(f"usage: {usage} "), err
        assert errors[0].startswith(f"{usage}: error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_serve_refuses_a_port_in_use_before_reading_a_weight(hollow: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The checkpoint has no weights: had serve loaded first, the error would be about its tensor files.
        r = subprocess.run([sys.executable, "-m", "groklm", "serve", "--checkpoint", str(hollow), "--port", str(port)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"groklm serve: error: cannot listen on 127.0.0.1:{port}: "), r.stderr
    assert "Traceback" not in r.stderr and "tensor files" not in r.stderr and "serving" not in r.stdout


def test_loss_summaries_compare_windows_that_do_not_overlap() -> None:
    assert loss_ends([float(x) for x in range(30, 0, -1)]) == {"loss_window": 10, "first_loss": 25.5, "last_loss": 5.5}
    assert loss_ends([4.0, 3.0, 2.0, 1.0, 0.5]) == {"loss_window": 2, "first_loss": 3.5, "last_loss": 0.75}
    assert loss_ends([2.0]) == {"loss_window": 1, "first_loss": 2.0, "last_loss": 2.0}
    summary = {"steps": 5, **loss_ends([4.0, 3.0, 2.0, 1.0, 0.5])}
    assert cli._loss_change(summary, 2) == "3.50 (first 2 steps) -> 0.75 (last 2 steps)"
    assert cli._loss_change({"steps": 1, **loss_ends([2.0])}, 2) == "2.00 (one step)"


def test_info_shows_a_small_model_in_units_it_fills(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    total, active = get_preset("tiny").param_counts()
    assert f"parameters: {total / 1e6:.2f} M total, {active / 1e6:.2f} M active per token" in out, out
    assert "0.00 B" not in out and "0.00 GiB" not in out and " MiB as int8" in out, out
    assert cli._count(999) == "999" and cli._count(1500) == "1.50 K" and cli._count(316_000_000_000) == "316.00 B"
    assert cli._bytes(512) == "512 bytes" and cli._bytes(3 * 2**20) == "3.00 MiB" and cli._bytes(2**31) == "2.00 GiB"
