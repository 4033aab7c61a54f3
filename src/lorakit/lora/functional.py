"""LoRA math as small pure functions, testable against the formula without a model.

Shapes: x: [..., in], A: [r, in], B: [out, r], base_out: [..., out].
    y = base_out + scaling · dropout(x) · Aᵀ · Bᵀ        (the paper's h = W0·x + ΔW·x, ΔW = B·A)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """α/r (the paper), or α/√r (rsLoRA: keeps the update's scale stable as r grows)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """ΔW = scaling · B·A in fp32: [out, r] @ [r, in] -> [out, in].

    Computed in fp32 whatever the adapter dtype, so a merge rounds once, not twice."""
    return (B.float() @ A.float()) * scaling


def lora_forward(x: Tensor, base_out: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """base_out + scaling · x·Aᵀ·Bᵀ with the up-projection and scaling fused into one addmm.

    x: [..., in] (already through dropout), base_out: [..., out] -> [..., out]."""
    return lora_forward_h(x @ A.t(), base_out, B, scaling)  # x·Aᵀ: [..., r]


def expand_sliced_B(B: Tensor, mask: Sequence[bool], r: int) -> Tensor:
    """The per-slice LoRA of a fused projection (loralib's `enable_lora`) as one ordinary B.

    A fused weight (GPT-2 `c_attn`: q, k, v stacked on `out`) adapts only the enabled slices,
    each with its own rank-r pair. With A: [k·r, in] (k = enabled slices) and
    B: [k·d, r] (d = out / len(mask)), the equivalent full B is block-structured:
    slice s gets its own r columns, disabled slices are zero -> [out, k·r].
    """
    k, d = sum(mask), B.shape[0] // sum(mask)
    blocks = iter(torch.block_diag(*B.view(k, d, r)).split(d))  # k blocks of [d, k·r]
    return torch.cat([next(blocks) if on else B.new_zeros(d, k * r) for on in mask])


def stack_adapters(As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Stack n adapters for a gathered batched matmul, plus one all-zero slot for "no adapter".

    Ranks are zero-padded to r_max and each scaling is folded into its B, so every slot is
    used the same way. Stored transposed, as the batched matmuls read them (a gather of
    contiguous slots, no transposed copy): At: [n+1, in, r_max], Bt: [n+1, r_max, out]."""
    r_max = max(A.shape[0] for A in As)
    A_pad = [F.pad(A, (0, 0, 0, r_max - A.shape[0])) for A in As]  # [r_max, in]
    B_pad = [F.pad(B * s, (0, r_max - B.shape[1])) for B, s in zip(Bs, scalings)]  # [out, r_max]
    At = torch.stack(A_pad + [torch.zeros_like(A_pad[0])]).transpose(1, 2).contiguous()
    Bt = torch.stack(B_pad + [torch.zeros_like(B_pad[0])]).transpose(1, 2).contiguous()
    return At, Bt


def mixed_lora_forward(
    x: Tensor,
    base_out: Tensor,
    At: Tensor,
    Bt: Tensor,
    index: Tensor,
    rows_for: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Each row of the batch through its own adapter: one gathered bmm per projection.

    x: [b, ..., in], base_out: [b, ..., out], At: [n+1, in, r], Bt: [n+1, r, out], index: [b]
    (slot per row; the last slot is all-zero = base only). No Python loop over adapters: the
    cost does not grow with n. `rows_for` may memoise `bag_rows(index, k)` across layers.
    Without autograd the sum is accumulated into `base_out` (a layer's fresh output)."""
    b = x.shape[0]
    x3 = x.reshape(b, -1, x.shape[-1])  # [b, t, in]
    if x3.shape[1] == 1 and not torch.is_grad_enabled():  # decoding: one token a row
        rows_for = rows_for or bag_rows
        h = per_row_matmul(x3[:, 0], At, rows_for(index, At.shape[1]))  # [b, r]
        delta = per_row_matmul(h, Bt, rows_for(index, Bt.shape[1])).view(base_out.shape)  # [b, ..., out]
        # Without autograd, accumulate into the base layer's fresh output (no new tensor).
        return base_out.add_(delta) if base_out.is_contiguous() else base_out + delta
    h = torch.bmm(x3, At.index_select(0, index))  # [b, t, r]
    B_rows = Bt.index_select(0, index)  # [b, r, out]
    # The up-projection accumulates into the base output inside the GEMM (baddbmm): one pass
    # over the [b, t, out] output instead of writing a delta and adding it in a second pass.
    if not torch.is_grad_enabled() and base_out.is_contiguous():
        return base_out.view(b, -1, base_out.shape[-1]).baddbmm_(h, B_rows).view(base_out.shape)
    return torch.baddbmm(base_out.reshape(b, -1, base_out.shape[-1]), h, B_rows).view(base_out.shape)


def bag_rows(index: Tensor, k: int) -> Tensor:
    """[b, k]: the rows of a stacked [n, k, m] weight, viewed as [n·k, m], that row i reads."""
    return index[:, None] * k + torch.arange(k, device=index.device)


def per_row_matmul(v: Tensor, W: Tensor, rows: Tensor) -> Tensor:
    """v[i] @ W[index[i]] for every row i, without gathering a [b, k, m] copy of the W's:
    `embedding_bag` sums the k rows of W[index[i]] weighted by v[i], in one pass (half the
    time of gather + bmm when each row is a single token). v: [b, k], W: [n, k, m],
    rows = bag_rows(index, k) -> [b, m]."""
    return F.embedding_bag(rows, W.reshape(-1, W.shape[-1]), mode="sum", per_sample_weights=v)


def lora_forward_h(h: Tensor, base_out: Tensor, B: Tensor, scaling: float) -> Tensor:
    """base_out + scaling · h·Bᵀ for an already down-projected h: [..., r] (embeddings).
    Without autograd the sum is accumulated into base_out (the base layer's fresh output)."""
    out2d, h2d = base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1])
    if not torch.is_grad_enabled() and base_out.is_contiguous():
        return out2d.addmm_(h2d, B.t(), alpha=scaling).view(base_out.shape)
    return torch.addmm(out2d, h2d, B.t(), alpha=scaling).view(base_out.shape)


def combine_factors(
    terms: Sequence[tuple[Tensor, Tensor, float]], combination: str, rank: int
) -> tuple[Tensor, Tensor]:
    """Factors of Σ cᵢ·Bᵢ·Aᵢ with scaling 1, from terms (Aᵢ: [rᵢ, in], Bᵢ: [out, rᵢ], cᵢ).

    "cat": exact, rank Σrᵢ: A = [A₁; A₂; ...], B = [c₁B₁, c₂B₂, ...].
    "svd": the best rank-`rank` approximation (truncated SVD), singular values split evenly:
    A = √S·Vᵀ, B = U·√S. Computed in fp32."""
    if combination == "cat":
        return (torch.cat([A.float() for A, _, _ in terms]), torch.cat([B.float() * c for _, B, c in terms], dim=1))
    delta = sum(c * (B.float() @ A.float()) for A, B, c in terms)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root
