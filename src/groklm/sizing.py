"""`groklm plan`: which tensor/expert-parallel layouts of a model fit a set of GPUs, what each rank
holds, and the decode speed each would reach: a model, not a measurement.

Bytes are exact: the model is laid out on the meta device, quantized as it would load, and split by
`parallel.apply_plan` for the layout, so a rank's weights are what it would hold. The KV cache is
bf16, a rank's kv heads for every layer: 2 x layers x kv heads a rank x head size x 2 bytes a token.

The speed model (`estimate`): a decode step of batch B reads, on each rank, its attention and dense
weights, the output head's rows, the norms and router, the KV cache of the B rows, and the weights of
the experts the step's tokens chose among the rank's own: with top-k routing spread evenly, a rank
holding E / ep experts expects E / ep x (1 - (1 - k / E)^B) of them touched. At an achieved fraction
`efficiency` of the memory bandwidth that takes

    t_mem = bytes read by a rank / (efficiency x memory bandwidth)

and the collectives take, for each of the step's 2 x layers + 1 all-reduces (attention, MoE, embedding)
and one all-gather (logits) over n ranks (ring algorithms),

    t_comm = sum over collectives of (latency + 2(n - 1)/n x bytes / link bandwidth)

(the bytes a rank sends in a ring all-reduce; an all-gather sends (n - 1)/n x its bytes; `latency` is
a small collective's whole time, as nccl-tests measures it). Partial sums go in fp32 (4 bytes a value). Collectives over ranks on
several machines go at the slower inter-node latency and bandwidth. groklm runs them one after the
other, so a step takes t_mem + t_comm, and decode runs at B / (t_mem + t_comm) tokens/s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from groklm.config import GrokConfig
from groklm.model import Grok
from groklm.parallel import ParallelError, apply_plan, plan
from groklm.quant import Int4ExpertLinear, Int8ExpertLinear, quantize_int4, quantize_int8, released_groups


@dataclass(frozen=True)
class Hardware:
    memory: float  # bytes a GPU
    bandwidth: float  # memory bytes/s a GPU
    link: float  # collective bytes/s a GPU within a machine
    link_latency: float  # s a small collective takes within a machine
    inter_node: float = 50e9  # bytes/s a GPU between machines (400 Gb/s InfiniBand or RoCE per GPU)
    inter_node_latency: float = 30e-6


GPUS: dict[str, tuple[float, float]] = {  # name: (memory, bandwidth)
    "h200": (141e9, 4.8e12),
    "h100": (80e9, 3.35e12),
    "a100": (80e9, 2.04e12),
    "a100-40": (40e9, 1.56e12),
    "l40s": (48e9, 0.864e12),
}
# name: (bytes/s a GPU, a small collective's latency): NVLink 4 (H100/H200), NVLink 3 (A100), PCIe
LINKS: dict[str, tuple[float, float]] = {
    "nvlink": (450e9, 12e-6),
    "nvlink3": (300e9, 15e-6),
    "pcie5": (50e9, 25e-6),
    "pcie4": (25e9, 30e-6),
}


@dataclass
class Layout:
    tp: int
    ep: int
    bits: int
    weight_bytes: int  # a rank's
    kv_bytes: int  # a rank's, at the given context and batch
    total_bytes: int  # weights + KV + the reserve
    fits: bool
    read_bytes_per_step: int  # a rank's, at the given batch
    comm_bytes_per_step: int  # what each rank sends and receives in collectives, at the given batch
    t_mem_ms: float
    t_comm_ms: float
    tokens_per_s: float  # batch / step time
    tokens_per_s_batch1: float


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _meta_model(config: GrokConfig, bits: int) -> Grok:
    with torch.device("meta"):
        model = Grok(config, torch.bfloat16)
        return quantize_int8(model, released_groups) if bits == 8 else quantize_int4(model, 64)  # type: ignore[return-value]


def _collective(nbytes: float, n: int, link: float, latency: float, gather: bool = False) -> tuple[float, float]:
    """(bytes a rank sends, seconds) of a ring all-reduce (or all-gather) of `nbytes` over n ranks."""
    if n == 1:
        return 0.0, 0.0
    sent = ((n - 1) if gather else 2 * (n - 1)) / n * nbytes
    return sent, latency + sent / link


def estimate(config: GrokConfig, hw: Hardware, tp: int, ep: int, bits: int, gpus_per_node: int, context: int,
             batch: int, reserve: float, efficiency: float) -> Layout:  # fmt: skip
    """One layout's bytes and speed (see the module docstring). Raises ParallelError if it cannot split."""
    p = plan(config, tp, ep)
    whole = _meta_model(config, bits)
    rank = apply_plan(whole, p)
    weights = _bytes(rank)
    c, local = config, p.local_config
    kv_per_token = 2 * c.num_layers * local.num_kv_heads * c.key_size * 2
    kv = kv_per_token * context * batch
    experts_local = c.num_experts // ep
    expert_modules = [m for m in rank.modules() if isinstance(m, (Int8ExpertLinear, Int4ExpertLinear))]
    expert_bytes = sum(_bytes(m) for m in expert_modules)  # every layer's local experts

    tied = not any(True for _ in rank.head.parameters())  # the head reads the embedding's table
    intra, inter = (hw.link, hw.link_latency), (hw.inter_node, hw.inter_node_latency)
    tp_link = inter if tp > gpus_per_node else intra  # (tp ranks are adjacent in the mesh)
    moe_n = tp * ep if ep > 1 else tp  # with ep, the MoE's all-reduce spans every rank
    moe_link = inter if moe_n > gpus_per_node else intra

    def step(b: int) -> tuple[float, float, float, float]:
        touched = experts_local * (1 - (1 - c.num_selected_experts / c.num_experts) ** b)
        read = weights - expert_bytes + expert_bytes * touched / experts_local
        if not tied:
            read += b * c.emb_size * 2 - _bytes(rank.embed)  # the table is only looked up
        read += kv_per_token * b * context / 2  # each row's cache, half full on average
        act = b * c.emb_size * 4  # fp32 partial sums
        calls = [(act, tp, tp_link, False)] * (c.num_layers + 1) + [(act, moe_n, moe_link, False)] * c.num_layers
        calls.append((b * c.vocab_size * 4, tp, tp_link, True))  # the logits
        comm = [_collective(n_bytes, n, *link, gather) for n_bytes, n, link, gather in calls]
        return read, sum(x for x, _ in comm), read / (efficiency * hw.bandwidth), sum(t for _, t in comm)

    read, comm, t_mem, t_comm = step(batch)
    _, _, t_mem1, t_comm1 = step(1)
    total = weights + kv + reserve
    return Layout(tp, ep, bits, weights, kv, int(total), total <= hw.memory, int(read), int(comm), t_mem * 1e3,
                  t_comm * 1e3,
                  batch / (t_mem + t_comm), 1 / (t_mem1 + t_comm1))  # fmt: skip


def layouts(config: GrokConfig, hw: Hardware, gpus: int, bits: list[int], gpus_per_node: int, context: int,
            batch: int, reserve: float, efficiency: float) -> tuple[list[Layout], list[str]]:  # fmt: skip
    """Every tp x ep = gpus layout at each width in `bits`: the ones that split the model, and why the
    others do not."""
    out, refused = [], []
    for b in bits:
        for ep in [e for e in range(1, gpus + 1) if gpus % e == 0]:
            tp = gpus // ep
            try:
                out.append(estimate(config, hw, tp, ep, b, gpus_per_node, context, batch, reserve, efficiency))
            except ParallelError as e:
                if f"tp={tp} x ep={ep}: {e}" not in refused:
                    refused.append(f"tp={tp} x ep={ep}: {e}")
    return out, refused


def parse_size(text: str) -> float:
    """'80GB', '141 GB', '80GiB', '3.35TB/s', '900e9' -> a number (bytes, or bytes/s)."""
    t = text.strip().replace(" ", "").removesuffix("/s").upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "B": 1}  # fmt: skip
    unit = next((u for u in units if t.endswith(u)), "")
    number, scale = t[: len(t) - len(unit)], units.get(unit, 1)
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r}: not a size (such as 80GB, 141GiB or 3.35TB/s)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r}: must be a positive size")
    return value


def as_dict(layout: Layout) -> dict[str, object]:
    return asdict(layout)


@dataclass
class Plan:
    """`plan`'s answer: the hardware assumed, the memory reserved a GPU, the layouts shown, the ones refused."""

    hardware: Hardware
    reserve: float
    layouts: list[Layout]
    refused: list[str]


def plan_layouts(config: GrokConfig, *, gpus: int, nodes: int = 1, gpu: str = "h100", gpu_memory: str | None = None,
                 memory_bandwidth: str | None = None, interconnect: str | None = None,
                 link_bandwidth: str | None = None, inter_node_bandwidth: str | None = None, bits: int | None = None,
                 context: int = 8192, batch: int = 1, reserve: str | None = None, efficiency: float = 0.75,
                 all: bool = False) -> Plan:  # fmt: skip
    """`groklm plan`: the tp x ep layouts of `config` over `gpus` GPUs (of kind `gpu`, its figures replaced by
    any size given) and their estimated decode speed; those that do not fit only with `all`. Bad arguments
    raise `UsageError` naming the option."""
    from groklm.runtime import UsageError, check_at_least

    check_at_least(1, gpus=gpus, nodes=nodes, context=context, batch=batch)
    if gpus % nodes:
        raise UsageError(f"--gpus {gpus} do not split evenly over --nodes {nodes}")
    if not 0 < efficiency <= 1:
        raise UsageError(f"--efficiency must be in (0, 1], not {efficiency}")
    if context > config.sequence_len:
        raise UsageError(f"--context {context} exceeds the model's {config.sequence_len} tokens")
    memory, bandwidth = GPUS[gpu]
    link, latency = LINKS[interconnect or ("nvlink3" if gpu.startswith("a100") else "nvlink")]

    def size(option: str, text: str | None, default: float) -> float:
        try:
            return default if text is None else parse_size(text)
        except ValueError as e:
            raise UsageError(f"--{option} {e}") from None

    hw = Hardware(size("gpu-memory", gpu_memory, memory), size("memory-bandwidth", memory_bandwidth, bandwidth),
                  size("link-bandwidth", link_bandwidth, link), latency,
                  size("inter-node-bandwidth", inter_node_bandwidth, 50e9))  # fmt: skip
    reserved = size("reserve", reserve, 4 * 2**30)
    found, refused = layouts(config, hw, gpus, [bits] if bits else [8, 4], gpus // nodes, context, batch, reserved,
                             efficiency)  # fmt: skip
    return Plan(hw, reserved, [x for x in found if x.fits or all], refused)
