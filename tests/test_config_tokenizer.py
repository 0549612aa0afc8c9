from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from groklm.config import PRESETS, GrokConfig, get_preset
from groklm.tokenizer import Tokenizer, find_tokenizer
from tests.conftest import TOKENIZER


def test_presets() -> None:
    g = get_preset("grok-1")
    assert (g.emb_size, g.num_layers, g.num_q_heads, g.num_kv_heads, g.ffn_size) == (6144, 64, 48, 8, 32768)
    total, active = g.param_counts()
    assert 315e9 < total < 317e9 and 83e9 < active < 85e9  # about 316 B and 84 B
    b = get_preset("bench-mid")
    assert (
        b.emb_size,
        b.num_q_heads,
        b.num_kv_heads,
        b.key_size,
        b.num_layers,
        b.ffn_size,
        b.vocab_size,
        b.sequence_len,
    ) == (2048, 16, 4, 128, 8, 10240, 131072, 1024)
    assert get_preset("mini").vocab_size == 131072
    assert set(PRESETS) >= {"grok-1", "bench-mid", "mini"}
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("grok-3")


def test_reference_config_dict_and_ffn_rule(golden_case: dict[str, Any]) -> None:
    c = GrokConfig.from_dict(golden_case["config"])
    assert c.ffn_size == 176  # int(2 * 128) * 2 // 3 = 170, rounded up to a multiple of 8
    assert GrokConfig.from_dict(golden_case) == c  # the whole case.json works too
    with pytest.raises(ValueError, match=r"unknown config fields.*'widening'"):
        GrokConfig.from_dict({**golden_case["config"], "widening": 3})


def test_config_json_file(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**get_preset("mini").to_dict(), "name": "ignored", "shard_activations": True}))
    assert GrokConfig.from_json(f) == get_preset("mini")


def test_spec_example_encodes_to_spec_ids_and_round_trips() -> None:
    tok = Tokenizer(TOKENIZER)
    text = "The answer to life the universe and everything is of course"
    assert tok.encode(text) == [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 131072 and tok.eos_id == 2
    odd = "naïve 🤖 — tabs\tand\nnewlines"
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback


def test_find_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "ckpt-0").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        find_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    assert find_tokenizer(tmp_path / "ckpt-0").encode("hi") == Tokenizer(TOKENIZER).encode("hi")
