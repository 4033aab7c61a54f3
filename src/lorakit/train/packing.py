"""Attention for padding-free batches (`batching.pack`): a micro-batch's examples laid end to
end in one row, so no layer spends time on padding, with the same gradients as the padded batch.

Every linear layer (most of a step) then runs on N real tokens instead of B x W. Attention
must not cross examples: `packed_attention` (registered with transformers as
`lorakit_packed_<kernel>`) scatters q, k, v back to (B, H, W, D), runs causal attention
there and gathers the N rows back. Right padding under a causal mask never reaches a real
token, so no padding mask is needed (which also lets SDPA take its `is_causal` kernel).
Positions restart at 0 per example, so RoPE / learned positions match the padded batch.

A model opts in only after a probe shows that its logits on a packed row equal its logits
on the examples one by one (`packing_support`); anything else (no kwargs pass-through, a
prefix method, sliding windows, an older transformers) trains padded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import IGNORE, Encoded, pack

PACKED = "lorakit_packed_"  # + the kernel run on the re-padded q, k, v: "sdpa" or "eager"


# -- attention -----------------------------------------------------------------------------
class _PaddingIndex:
    """Where each packed token sits in the (B, W) padded layout: row * W + column. Computed
    once per batch (every layer gets the same `cu_seq_lens` tensor) and reused."""

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._value: tuple[torch.Tensor, int, int] = (torch.empty(0), 0, 0)

    def __call__(self, cu: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int, int]:
        if cu is not self._key:
            lengths = cu.diff().long()
            rows, width = len(lengths), int(lengths.max())
            starts = cu[:-1].long().repeat_interleave(lengths)
            token = torch.arange(int(cu[-1]), device=cu.device)
            row = torch.arange(rows, device=cu.device).repeat_interleave(lengths)
            self._key, self._value = cu, ((row * width + token - starts).to(device), rows, width)
        return self._value


_padding_index = _PaddingIndex()


def _repad(x: torch.Tensor, index: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(1, H, N, D) packed -> (rows, H, width, D), zeros after each example."""
    tokens = x[0].transpose(0, 1)  # (N, H, D)
    padded = tokens.new_zeros(rows * width, *tokens.shape[1:]).index_copy(0, index, tokens)
    return padded.view(rows, width, *tokens.shape[1:]).transpose(1, 2)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, groups: int, dropout: float = 0.0
) -> torch.Tensor:
    """Plain causal softmax attention, (B, H, T, D) q and (B, H/groups, T, D) k, v ->
    (B, T, H, D). Matmuls and a softmax: on CPU in bf16 forward + backward run faster than
    SDPA's fused kernel (measured on SmolLM2 in benchmarks/e2e.py)."""
    if groups > 1:  # grouped-query attention
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    length = q.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, T, T)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:  # attention dropout (training)
        weights = F.dropout(weights, dropout)
    return torch.matmul(weights, v).transpose(1, 2)


def _model_sdpa(module: nn.Module, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, *args, **kwargs)


def _model_eager(module: nn.Module, *args, **kwargs):
    # each modeling file has its own eager function (softcapping, sinks, ... as that model needs)
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


UNPACKED: dict[str, Callable] = {"sdpa": _model_sdpa, "eager": _model_eager}  # the model's own kernels


def _sdpa(module: nn.Module, q, k, v, scaling: float, groups: int, dropout: float) -> torch.Tensor:
    return _model_sdpa(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)[0]


def _eager(module: nn.Module, q, k, v, scaling: float, groups: int, dropout: float) -> torch.Tensor:
    return causal_attention(q, k, v, scaling, groups, dropout)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"sdpa": _sdpa, "eager": _eager}


def packed_attention(kernel: str) -> Callable:
    """A transformers attention function: packed rows (with `cu_seq_lens_q`) go through
    `kernel` on re-padded q, k, v; anything else (generation, padded evaluation) goes to the
    model's own `kernel` implementation, so the model keeps working outside training."""
    run = KERNELS[kernel]

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or query.shape[0] != 1:
            return UNPACKED[kernel](
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        index, rows, width = _padding_index(cu, query.device)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        groups = query.shape[1] // key.shape[1]
        out = run(module, *(_repad(x, index, rows, width) for x in (query, key, value)), scaling, groups, dropout)
        # out: (rows, width, H, D) -> back to the packed (1, N, H, D) the model expects
        return out.reshape(rows * width, *out.shape[2:]).index_select(0, index).unsqueeze(0), None

    return attention


def _register(kernel: str) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask, sdpa_mask

    name = PACKED + kernel
    AttentionInterface.register(name, packed_attention(kernel))
    AttentionMaskInterface.register(name, eager_mask if kernel == "eager" else sdpa_mask)
    return name


# -- opting a model in ---------------------------------------------------------------------
def packing_support(model: nn.Module, max_length: int | None = None) -> str | None:
    """None if `model` trains correctly on packed rows of examples up to `max_length` tokens,
    else why not. Runs a probe (three tiny forwards) and leaves the model as it found it."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None or not hasattr(model, "get_input_embeddings"):
        return "not a transformers model (or one wrapped, e.g. by a prefix method)"
    kernel = current.removeprefix(PACKED)
    if kernel not in KERNELS:
        return f"attention kernel {current!r} has no packed variant (sdpa, eager)"
    window = getattr(config, "sliding_window", None)
    if window and (max_length is None or window < max_length):  # a window that never binds is harmless
        return f"sliding-window attention (window {window} < --max-length {max_length})"
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention logits"
    try:
        name = _register(kernel)
    except ImportError:
        return "this transformers version has no attention registry"
    try:
        matches = _probe(model, name, kernel)
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        return f"a packed forward failed ({type(e).__name__}: {e})"
    return None if matches else "packed logits differ from one-by-one logits"


def use_packed_attention(model: nn.Module, on: bool) -> None:
    """Switch `model` between its plain attention kernel and the packed variant of it."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    kernel = current.removeprefix(PACKED)
    _set_attention(model, _register(kernel) if on else kernel)


def _set_attention(model: nn.Module, name: str) -> None:
    # set_attn_implementation validates names against the registry (transformers >= 4.56);
    # the config field is what the attention layers read, on every version.
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


@torch.no_grad()
def _probe(model: nn.Module, packed_name: str, kernel: str) -> bool:
    """Two short examples: logits on the packed row == logits of each alone (plain kernel)."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    examples = [Encoded(torch.randint(vocab, (n,), generator=generator).tolist(), [IGNORE] * n) for n in (5, 3)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        alone = torch.cat([model(input_ids=torch.tensor([e.input_ids], device=device)).logits[0] for e in examples])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in pack(examples).items()}
        del batch["labels"]
        _set_attention(model, packed_name)
        packed = model(**batch).logits[0]
    finally:
        _set_attention(model, kernel)
        model.train(was_training)
    if packed.shape != alone.shape:
        return False
    # A packing bug mixes examples: errors of the logits' own size. Round-off is far smaller:
    # 1e-3 of the largest logit in fp32, a few bf16 ulps (2**-8 each) for a base held in bf16.
    scale = alone.abs().max().clamp_min(1.0)
    tolerance = 1e-3 if model.get_input_embeddings().weight.dtype == torch.float32 else 2e-2
    return bool(((packed - alone).abs().max() / scale) < tolerance)
