"""Fidelity of int4 against the released int8 weights, as JSON.

    .venv/bin/python -m benchmarks.int4_report

On the golden miniature checkpoint (the reference's own logits) and on a `mini` random checkpoint:
KL(int8 || int4) per position, top-1 agreement, mean |logit difference| (for golden, also against
the reference), for several group sizes. Random-weight models have no redundancy, so these are
harsh: the golden model loses top-1 positions even when re-quantized to 8 bits with 16-column
groups (`fake_int8_g16`), which calibrates what int4 costs on it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import groklm
from groklm.config import GrokConfig, get_preset
from groklm.quant import Int8ExpertLinear, Int8Linear, dequantize_weight, quantize_int4

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "grok1-tiny12"


def compare(ref: torch.Tensor, other: torch.Tensor, golden: torch.Tensor | None = None) -> dict[str, float]:
    p, q = ref.log_softmax(-1), other.log_softmax(-1)
    out = {
        "kl_vs_int8": round((p.exp() * (p - q)).sum(-1).mean().item(), 4),
        "top1_agreement": round((ref.argmax(-1) == other.argmax(-1)).float().mean().item(), 3),
        "mean_abs_logit_diff": round((ref - other).abs().mean().item(), 4),
    }
    if golden is not None:
        out["mean_abs_diff_vs_reference"] = round((other - golden).abs().mean().item(), 4)
    return out


def _requantize_int8_g16(model: groklm.Grok) -> None:
    for m in list(model.modules()):
        if isinstance(m, (Int8Linear, Int8ExpertLinear)):
            d = dequantize_weight(m.weight, m.scales)
            b = d.reshape(*d.shape[:-1], -1, 16)
            step = b.abs().amax(-1, keepdim=True) / 127
            fq = ((b / step).round() * step).reshape(d.shape)
            m.forward = (lambda w: lambda x, *e: torch.nn.functional.linear(x, w[e[0]] if e else w))(fq)


def main() -> None:
    report: dict[str, object] = {}
    config = GrokConfig.from_json(GOLDEN / "case.json")
    with np.load(GOLDEN / "golden.npz") as z:
        tokens, golden = torch.tensor(z["batch"], dtype=torch.long), torch.tensor(z["logits"])
    int8 = groklm.load(GOLDEN, config, dtype=torch.float32, progress=False)(tokens)
    report["golden_int8_vs_reference"] = round((int8 - golden).abs().mean().item(), 4)
    fake = groklm.load(GOLDEN, config, dtype=torch.float32, progress=False)
    _requantize_int8_g16(fake)
    report["golden_fake_int8_g16"] = compare(int8, fake(tokens), golden)
    m = groklm.load(GOLDEN, config, dtype=torch.float32, progress=False)
    report["golden_int4_g16"] = compare(int8, quantize_int4(m, 16)(tokens), golden)  # 176-wide layers allow 16 only

    with tempfile.TemporaryDirectory() as tmp:
        groklm.write_random_checkpoint(tmp, get_preset("mini"), seed=0, progress=False)
        toks = torch.tensor([[422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805, 17, 245, 999, 3, 42]])
        ref = groklm.load(tmp, dtype=torch.float32, progress=False)(toks)
        for group in (32, 64, 128):
            m = groklm.load(tmp, dtype=torch.float32, progress=False)
            report[f"mini_int4_g{group}"] = compare(ref, quantize_int4(m, group)(toks))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
