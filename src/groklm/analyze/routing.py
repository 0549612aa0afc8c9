"""Routing statistics: what the experts do, measured on text run through the model.

`capture_routing(model)` records, through forward pre-hooks on every MoE (the model is not changed),
each token's chosen experts and gates as the forward computes them (the native MoE's own routing
function where that path runs, `MoE.route` elsewhere) and the router's full probabilities. `analyze`
runs a text through the model in windows and `summarize` turns the capture into:

- load: the share of (token, slot) choices each expert gets per layer, and that share times E (1.0 is
  the uniform share);
- entropy: the router distribution's mean entropy per layer, in nats and as a fraction of log E;
- co-selection: per layer, how often each pair of experts is chosen together for a token;
- adjacent layers: the top-1 transition counts from each layer to the next, their normalised mutual
  information (0: independent, 1: one determines the other), and how often the top-2 set stays the
  same (expert ids are not aligned across layers; the chance rate for k of E is 1 / C(E, k));
- repeats: for each token id that occurs again, how often a later occurrence gets the same top-2 set
  (and top-1) as its first, per layer;
- a route map: the top-1 expert of each of the first tokens at each layer.

`write_report` writes routing.json, PNG plots (matplotlib) and one self-contained report.html.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from groklm.config import GrokConfig
from groklm.model import Grok, MoE, capped


@dataclass
class Capture:
    """Per MoE layer, one entry per forward call: expert ids [N, k], gates [N, k], probabilities [N, E]."""

    experts: list[list[Tensor]] = field(default_factory=list)
    gates: list[list[Tensor]] = field(default_factory=list)
    probs: list[list[Tensor]] = field(default_factory=list)

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """[L, T, k] expert ids, [L, T, k] gates, [L, T, E] probabilities over every call in order."""
        return (torch.stack([torch.cat(x) for x in self.experts]), torch.stack([torch.cat(x) for x in self.gates]),
                torch.stack([torch.cat(x) for x in self.probs]))  # fmt: skip


@contextlib.contextmanager
def capture_routing(model: Grok) -> Iterator[Capture]:
    """Record the routing of every MoE call made inside the block (see the module docstring)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    cap = Capture([[] for _ in moes], [[] for _ in moes], [[] for _ in moes])

    def hook(i: int) -> Any:
        def pre(moe: MoE, args: tuple[Tensor, ...]) -> None:
            xs = args[0].reshape(-1, args[0].shape[-1])
            with torch.no_grad():
                gates, experts = moe.route(xs)
                logits = moe.router(xs.float())
                if moe.router_softcap is not None:
                    logits = capped(logits, moe.router_softcap)
                cap.experts[i].append(experts.cpu())
                cap.gates[i].append(gates.float().cpu())
                cap.probs[i].append(logits.softmax(-1).cpu())

        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(moes)]
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def analyze(model: Grok, tokens: list[int], window: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """Run `tokens` through the model in windows of `window` tokens (each from position 0, no head);
    returns the capture stacked: expert ids [L, T, k], gates [L, T, k], probabilities [L, T, E]."""
    window = min(window, model.config.sequence_len)
    device = model.device
    with capture_routing(model) as cap, torch.inference_mode():
        for start in range(0, len(tokens), window):
            model.hidden(torch.tensor([tokens[start : start + window]], device=device))
    return cap.stacked()


def _nmi(a: Tensor, b: Tensor, n: int) -> float:
    """Normalised mutual information of two label sequences over n labels (sqrt normalisation)."""
    joint = torch.zeros(n, n, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum().item()
    ha = -(pa[pa > 0] * pa[pa > 0].log()).sum().item()
    hb = -(pb[pb > 0] * pb[pb > 0].log()).sum().item()
    return mi / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0


def summarize(experts: Tensor, probs: Tensor, tokens: list[int], labels: list[str] | None = None,
              map_tokens: int = 48) -> dict[str, Any]:  # fmt: skip
    """The statistics of the module docstring, as plain lists (JSON-ready)."""
    n_layers, n_tokens, k = experts.shape
    n_experts = probs.shape[-1]
    counts = torch.stack([torch.bincount(experts[layer].flatten(), minlength=n_experts) for layer in range(n_layers)])
    share = counts.double() / (n_tokens * k)
    p = probs.double().clamp_min(1e-30)
    entropy = -(p * p.log()).sum(-1).mean(-1)  # [L]
    cosel = torch.zeros(n_layers, n_experts, n_experts, dtype=torch.long)
    for layer in range(n_layers):
        for i in range(k):
            for j in range(k):
                if i != j:
                    cosel[layer].index_put_((experts[layer, :, i], experts[layer, :, j]),
                                            torch.ones(n_tokens, dtype=torch.long), accumulate=True)  # fmt: skip
    sets = experts.sort(-1).values  # [L, T, k]
    top1 = experts[..., 0]
    adjacent = []
    for layer in range(n_layers - 1):
        trans = torch.zeros(n_experts, n_experts, dtype=torch.long)
        trans.index_put_((top1[layer], top1[layer + 1]), torch.ones(n_tokens, dtype=torch.long), accumulate=True)
        adjacent.append({
            "from_layer": layer,
            "top1_transitions": trans.tolist(),
            "top1_nmi": round(_nmi(top1[layer], top1[layer + 1], n_experts), 4),
            "same_topk_set": round((sets[layer] == sets[layer + 1]).all(-1).double().mean().item(), 4),
        })  # fmt: skip
    first: dict[int, int] = {}
    pairs = []  # (first occurrence, later occurrence)
    for t, tok in enumerate(tokens[:n_tokens]):
        if tok in first:
            pairs.append((first[tok], t))
        else:
            first[tok] = t
    repeats: dict[str, Any] = {"occurrences": len(pairs), "token_ids": len({tokens[b] for _, b in pairs})}
    if pairs:
        a, b = torch.tensor([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])
        repeats["same_topk_set"] = [round((sets[li, a] == sets[li, b]).all(-1).double().mean().item(), 4)
                                    for li in range(n_layers)]  # fmt: skip
        repeats["same_top1"] = [round((top1[li, a] == top1[li, b]).double().mean().item(), 4) for li in range(n_layers)]
    shown = min(map_tokens, n_tokens)
    return {
        "tokens": n_tokens,
        "layers": n_layers,
        "experts": n_experts,
        "top_k": k,
        "expert_counts": counts.tolist(),
        "expert_share": [[round(x, 5) for x in row] for row in share.tolist()],
        "load_vs_uniform": [[round(x * n_experts, 4) for x in row] for row in share.tolist()],
        "max_load_vs_uniform": [round(x, 4) for x in (share.max(-1).values * n_experts).tolist()],
        "router_entropy_nats": [round(x, 4) for x in entropy.tolist()],
        "router_entropy_fraction": [round(x / math.log(n_experts), 4) for x in entropy.tolist()],
        "coselection": cosel.tolist(),
        "adjacent_layers": adjacent,
        "chance_same_topk_set": round(1 / math.comb(n_experts, k), 4),
        "repeats": repeats,
        "route_map": {
            "token_ids": tokens[:shown],
            "labels": (labels or [str(t) for t in tokens])[:shown],
            "top1": top1[:, :shown].tolist(),  # [L, shown]
        },
    }


# -- the report -------------------------------------------------------------------------------------------


def _plots(stats: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    n_layers, n_experts = stats["layers"], stats["experts"]
    load = torch.tensor(stats["load_vs_uniform"])

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 0.6 * n_experts + 3, 1.5 + 0.3 * n_layers),
                                  gridspec_kw={"width_ratios": [n_experts, 3]})  # fmt: skip
    im = ax.imshow(load, cmap="viridis", aspect="auto")
    ax.set(xlabel="expert", ylabel="layer", title="load / uniform share", xticks=range(n_experts))
    if n_layers * n_experts <= 1024:
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_experts)).tolist(),
                             load.flatten().tolist(), strict=True):  # fmt: skip
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < load.mean() else "k")
    fig.colorbar(im, ax=ax)
    ax2.plot(stats["router_entropy_fraction"], range(n_layers), marker="o")
    ax2.set(xlim=(0, 1.02), ylim=(n_layers - 0.5, -0.5), xlabel="entropy / log E", title="router entropy")
    fig.tight_layout()
    files.append(("load.png", "Expert load per layer (1.0 is the uniform share) and the router's entropy"))
    fig.savefig(out / files[-1][0], dpi=110)
    plt.close(fig)

    cosel = torch.tensor(stats["coselection"]).double()
    picks = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
    panels = [("all layers", cosel.sum(0)), *((f"layer {i}", cosel[i]) for i in picks)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, m) in zip(axes, panels, strict=True):
        ax.imshow(m / m.sum().clamp_min(1), cmap="magma")
        ax.set(title=title, xticks=range(n_experts), yticks=range(n_experts), xlabel="expert")
    fig.suptitle("How often two experts are chosen together")
    fig.tight_layout()
    files.append(("coselection.png", "Co-selection: pairs of experts chosen for the same token"))
    fig.savefig(out / files[-1][0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    adj = stats["adjacent_layers"]
    if adj:
        xs = [a["from_layer"] + 0.5 for a in adj]
        ax.plot(xs, [a["top1_nmi"] for a in adj], marker="o", label="top-1 NMI, layer to next")
        ax.plot(xs, [a["same_topk_set"] for a in adj], marker="s", label="same top-k ids, layer to next")
    if "same_topk_set" in stats["repeats"]:
        ax.plot(range(n_layers), stats["repeats"]["same_topk_set"], marker="^", label="repeated token: same top-k")
    ax.axhline(stats["chance_same_topk_set"], color="grey", ls="--", lw=1, label="chance: same top-k")
    ax.set(xlabel="layer", ylim=(0, 1.02), title="Consistency of the choice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(("consistency.png", "Consistency between adjacent layers and for repeats of a token"))
    fig.savefig(out / files[-1][0], dpi=110)
    plt.close(fig)

    route = torch.tensor(stats["route_map"]["top1"])
    labels = stats["route_map"]["labels"]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(labels) + 2), 1.5 + 0.3 * n_layers))
    ax.imshow(route, cmap="tab10" if n_experts <= 10 else "tab20", vmin=0, vmax=max(9, n_experts - 1), aspect="auto")
    if route.numel() <= 4096:
        for (i, j), v in zip(torch.cartesian_prod(torch.arange(route.shape[0]), torch.arange(route.shape[1])).tolist(),
                             route.flatten().tolist(), strict=True):  # fmt: skip
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(labels)), [repr(s)[1:-1][:12] for s in labels], rotation=90, fontsize=7)
    ax.set(ylabel="layer", title="Top-1 expert of each token")
    fig.tight_layout()
    files.append(("route_map.png", "Route map: each token's top-1 expert at each layer"))
    fig.savefig(out / files[-1][0], dpi=110)
    plt.close(fig)
    return files


def write_report(stats: dict[str, Any], out: str | Path, title: str = "groklm routing") -> Path:
    """routing.json, the PNG plots and report.html (images embedded) into directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(stats))
    figures = _plots(stats, out)
    rows = "".join(
        f"<tr><td>{i}</td><td>{m:.2f}</td><td>{e:.3f}</td></tr>"
        for i, (m, e) in enumerate(zip(stats["max_load_vs_uniform"], stats["router_entropy_fraction"], strict=True))
    )
    images = "".join(
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,"
        f"{base64.b64encode((out / name).read_bytes()).decode()}'><figcaption>{html.escape(caption)}"
        "</figcaption></figure>"
        for name, caption in figures
    )
    rep = stats["repeats"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
img{{max-width:100%}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{stats["tokens"]} tokens, {stats["layers"]} layers, {stats["experts"]} experts, top-{stats["top_k"]}.
Repeated tokens: {rep["occurrences"]} later occurrences of {rep["token_ids"]} ids.
Chance that two tokens share a top-{stats["top_k"]} set: {stats["chance_same_topk_set"]}.</p>
<table><tr><th>layer</th><th>busiest expert / uniform</th><th>router entropy / log E</th></tr>{rows}</table>
{images}<p>Numbers: <code>routing.json</code> beside this page.</p></body></html>"""
    (out / "report.html").write_text(page)
    return out / "report.html"


def main(*, checkpoint: str, out: str, prompt_file: str | None = None, prompt: str | None = None,
         prompt_ids: str | None = None, max_tokens: int = 2000, window: int = 512, map_tokens: int = 48,
         tokenizer: str | None = None, config: GrokConfig | None = None, dtype: str = "bf16", device: str = "cpu",
         threads: int | None = None, bits: int | None = None, quiet: bool = False) -> Path:  # fmt: skip
    """`groklm analyze routing`: route one input (a file's text, a text or token ids) through the model and
    write the report into `out`; every argument is checked before the weights are read (`UsageError`). The
    report's path."""
    import time

    from groklm.load import load
    from groklm.runtime import (
        UsageError,
        check_at_least,
        check_device,
        check_format_options,
        model_config,
        parse_ids,
        read_prompt_file,
        set_threads,
        tokenizer_fits,
        torch_dtype,
    )
    from groklm.tokenizer import find_tokenizer

    given = [n for n, v in (("--prompt-file", prompt_file), ("--prompt", prompt), ("--prompt-ids", prompt_ids)) if v]
    if len(given) != 1:
        raise UsageError("give one input: --prompt-file FILE (- for stdin), --prompt TEXT or --prompt-ids"
                         + (f" (got {' and '.join(given)})" if given else ""))  # fmt: skip
    check_at_least(1, max_tokens=max_tokens, window=window, map_tokens=map_tokens)
    check_device(device)
    config = model_config(checkpoint, config)
    check_format_options(checkpoint, bits=bits)
    tok = None
    if prompt_ids:
        ids = parse_ids(prompt_ids)
    else:
        try:
            tok = find_tokenizer(checkpoint, tokenizer)
        except FileNotFoundError as e:
            raise UsageError(f"{e} (--tokenizer PATH); a text input needs it") from None
        tokenizer_fits(tok, config, "analyze")
        ids = tok.encode(read_prompt_file(prompt_file) if prompt_file else prompt)
    ids = ids[:max_tokens]
    if not ids:
        raise UsageError("the input encodes to no tokens")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise UsageError(f"token ids {bad[:5]} are outside the vocabulary (0..{config.vocab_size - 1})")
    set_threads(threads)
    t0 = time.perf_counter()
    model = load(checkpoint, config, dtype=torch_dtype(dtype), device=device, progress=not quiet, bits=bits)
    t1 = time.perf_counter()
    experts, _gates, probs = analyze(model, ids, window)
    labels = [tok.decode([t]) for t in ids[:map_tokens]] if tok else None
    stats = summarize(experts, probs, ids, labels, map_tokens)
    report = write_report(stats, out, f"Routing of {Path(checkpoint).name}: {len(ids)} tokens")
    if not quiet:
        print(f"routed {len(ids)} tokens in {time.perf_counter() - t1:.1f} s (load {t1 - t0:.1f} s); wrote {report} "
              f"and routing.json, load.png, coselection.png, consistency.png, route_map.png beside it")  # fmt: skip
    return report
