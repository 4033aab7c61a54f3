"""PiSSA and OLoRA: A and B taken from the base weight itself, which keeps only the rest.

    PiSSA (Meng et al. 2024)   W = U·S·Vᵀ; B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ: the principal
                               singular directions train, the residual W - s·B·A stays frozen.
                               "pissa_niter_N": a randomised SVD with N subspace iterations.
    OLoRA (Büyükakyüz 2024)    W = Q·R; B = Q_r, A = R_r (an orthonormal B).

Either way W_res + s·B·A = W at the start, so the model computes what it did. Trained, the
adapter belongs to W_res, which no other runtime has; `as_plain_lora` turns it into a plain
LoRA adapter for the untouched W (PEFT's conversion, rank doubled):

    W_res + s·B·A = W + s·(B·A - B0·A0) = W + s·[B, -B0]·[A; A0]

Pure functions on [out, in] matrices; layers.py applies them to a layer.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

NITER = re.compile(r"pissa_niter_(\d+)")


def is_weight_init(init: object) -> bool:
    """Whether `init_lora_weights` takes A and B from the base weight (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in ("pissa", "olora") or NITER.fullmatch(init) is not None)


def principal_factors(W: Tensor, r: int, scaling: float, init: str) -> tuple[Tensor, Tensor]:
    """(A: [r, in], B: [out, r]) in fp32 from W: [out, in], as PEFT computes them."""
    W = W.float()
    if init == "olora":
        Q, R = torch.linalg.qr(W)  # Q: [out, k], R: [k, in]
        return R[:r].contiguous(), Q[:, :r].contiguous()
    niter = NITER.fullmatch(init)
    if niter:
        U, S, V = torch.svd_lowrank(W, q=r, niter=int(niter.group(1)))  # U: [out, r], V: [in, r]
        Vh = V.t()
    else:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[:r] / scaling).sqrt()
    return (root[:, None] * Vh[:r]).contiguous(), (U[:, :r] * root).contiguous()


def as_plain_lora(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """The plain factors for the original base: A' = [A; A0]: [2r, in], B' = [B, -B0]: [out, 2r]."""
    return torch.cat([A, A0.to(A.dtype)]), torch.cat([B, -B0.to(B.dtype)], dim=1)
