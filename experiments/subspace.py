"""Experiment 4 (the LoRA paper's Section 7, Figures 3/4): normalized subspace similarity
between the top right-singular directions of the A matrices learned at r=8 and r=64, and
across seeds, MiniLM on SST-2 (Wq and Wv of every layer).

    phi(A1, A2, i, j) = || U1[:, :i]^T U2[:, :j] ||_F^2 / min(i, j)

with U the right-singular vectors of A ([r, d] as stored: A = U_l S U^T, directions in R^d).
It reads the adapters which_rank.py trained and kept (r=8 and r=64 on Wq,Wv, seeds 0 and 1)
and trains any that are missing. lorakit initialises A randomly (Kaiming-uniform) and a short
run moves it little, so A's subspace is largely its random start; besides phi on A (the
paper's measure) this also reports phi on the learned change dA = A - A_init (A_init rebuilt
from the seed) and the relative size ||dA|| / ||A_init||.

    python experiments/subspace.py [--quick]

Writes experiments/results/subspace.{md,json} and subspace_*.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    SST2,
    in_child,
    key_of,
    markdown_table,
    parse_args,
    pyplot,
    require_data,
    run,
    savefig,
    stopwatch,
    wall_note,
    write_results,
)


def right_singular(a: np.ndarray) -> np.ndarray:
    """[d, r]: the right-singular vectors of a [r, d] matrix, by decreasing singular value."""
    _, _, vh = np.linalg.svd(np.asarray(a, dtype=np.float64), full_matrices=False)
    return vh.T


def subspace_similarity(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """phi[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) for i <= r1, j <= r2, where
    U are the right-singular vectors of the [r, d] matrices a1, a2. Values in [0, 1]."""
    m = right_singular(a1).T @ right_singular(a2)  # [r1, r2]
    cum = np.cumsum(np.cumsum(m**2, axis=0), axis=1)  # cum[i-1, j-1] = ||M[:i, :j]||_F^2
    i = np.arange(1, m.shape[0] + 1)[:, None]
    j = np.arange(1, m.shape[1] + 1)[None, :]
    return cum / np.minimum(i, j)


def _load_a(adapter_dir: str, config: dict) -> dict:
    """{(module, layer): (A, A_init)} for one kept adapter; A_init is what lorakit's trainer
    starts from with the same seed (seed, load model, reseed, inject)."""
    import re

    from safetensors.torch import load_file

    from lorakit import lora
    from lorakit.methods import lora_config
    from lorakit.train.api import build_model, seed_everything
    from lorakit.train.config import TrainConfig

    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    cfg = TrainConfig(**config)
    seed_everything(cfg.seed)
    model, _, new_modules = build_model(cfg, ["0", "1"])
    seed_everything(cfg.seed)
    lora.inject(model, lora_config(cfg, new_modules))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    out = {}
    for name, a in weights.items():
        m = re.search(r"layer\.(\d+)\..*\.(query|value)\.lora_A", name)
        if not m:
            continue
        init_name = next(n for n in init if f"layer.{m[1]}." in n and f".{m[2]}.lora_A" in n)
        out[(m[2], int(m[1]))] = (a.float().numpy(), init[init_name].float().numpy())
    assert out, f"no lora_A weights of query/value found in {adapter_dir}"
    return out


def main() -> None:
    args = parse_args(__doc__)
    require_data(SST2)
    from which_rank import config_for

    clock = stopwatch()
    adapters = {}
    print("adapters (from which_rank.py):")
    for r in (8, 64):
        for s in (0, 1):
            config = config_for("Wq,Wv", r, s, args.quick)
            row = run(key_of("sst2", config, args.quick), keep=True, **config)
            adapters[r, s], _, _ = in_child(_load_a, row["adapter_dir"], row["config"])
    layers = sorted({layer for (_, layer) in adapters[8, 0]})
    d = adapters[8, 0]["query", 0][0].shape[1]
    pairs = {
        "r8 vs r64 (seed 0)": ((8, 0), (64, 0)),
        "r8 vs r64 (seed 1)": ((8, 1), (64, 1)),
        "r8: seed 0 vs seed 1": ((8, 0), (8, 1)),
        "r64: seed 0 vs seed 1": ((64, 0), (64, 1)),
    }
    rng = np.random.default_rng(0)
    md, data = [], {"d": d, "layers": layers, "pairs": {}}
    for label, (p, q) in pairs.items():
        for module in ("query", "value"):
            for what in ("A", "dA"):
                phis = []
                for layer in layers:
                    a1, i1 = adapters[p][module, layer]
                    a2, i2 = adapters[q][module, layer]
                    phis.append(subspace_similarity(a1, a2) if what == "A" else subspace_similarity(a1 - i1, a2 - i2))
                phi = np.mean(phis, axis=0)
                data["pairs"][f"{label} {module} {what}"] = {
                    "mean_over_layers": phi.tolist(),
                    "per_layer_phi_1_1": [float(x[0, 0]) for x in phis],
                }
                md.append(
                    [
                        label,
                        "Wq" if module == "query" else "Wv",
                        what,
                        f"{phi[0, 0]:.3f}",
                        f"{phi[min(7, phi.shape[0] - 1), min(7, phi.shape[1] - 1)]:.3f}",
                        f"{phi[-1, -1]:.3f}",
                        f"{1 / d:.3f} / {8 / d:.3f} / {max(phi.shape) / d:.3f}",
                    ]
                )
    moved = {
        f"r{r} {m}": float(
            np.mean(
                [np.linalg.norm(a - i) / np.linalg.norm(i) for (mm, _), (a, i) in adapters[r, 0].items() if mm == m]
            )
        )
        for r in (8, 64)
        for m in ("query", "value")
    }
    data["relative_change_dA_over_A_init"] = moved
    plots(adapters, layers, d, rng, args.quick)
    wall = clock()
    notes = (
        "MiniLM on SST-2, LoRA on Wq,Wv of all 6 layers (d = 384), the which_rank.py runs (80 steps, lr 2e-3). "
        "phi values are averaged over the 6 layers. Columns: phi at (i, j) = (1, 1), (8, 8) (clipped to the "
        "ranks), and (r1, r2); the last column is what two random subspaces give in expectation, "
        "max(i, j) / d, for (1, 1), (8, 8) and the full pair. 'A' is the paper's measure on the learned A; "
        "'dA' is the same on the change A - A_init. Relative change ||A - A_init|| / ||A_init|| "
        f"(seed 0): {', '.join(f'{k}: {v:.3f}' for k, v in moved.items())}. " + wall_note(wall)
    )
    write_results(
        "subspace",
        "Subspace similarity (Section 7 in small)",
        [
            (
                "Normalized subspace similarity phi, mean over layers",
                markdown_table(
                    ["pair", "matrix", "of", "phi(1,1)", "phi(8,8)", "phi(r1,r2)", "random: (1,1) / (8,8) / full"], md
                ),
            )
        ],
        data,
        notes,
        args.quick,
    )


def plots(adapters: dict, layers: list[int], d: int, rng, quick: bool) -> None:
    plt = pyplot()
    last = layers[-1]
    # Figure 3: r=8 vs r=64, i <= 8, j <= 64, for Wq and Wv; A and dA; first and last layer
    fig, axes = plt.subplots(4, 2, figsize=(13, 11), constrained_layout=True)
    for col, module in enumerate(("query", "value")):
        for row, (layer, what) in enumerate([(0, "A"), (last, "A"), (0, "dA"), (last, "dA")]):
            a1, i1 = adapters[8, 0][module, layer]
            a2, i2 = adapters[64, 0][module, layer]
            phi = subspace_similarity(a1, a2) if what == "A" else subspace_similarity(a1 - i1, a2 - i2)
            im = axes[row, col].imshow(
                phi,
                vmin=0,
                vmax=1,
                aspect="auto",
                cmap="viridis",
                extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5),
            )
            axes[row, col].set_title(
                f"{'Wq' if module == 'query' else 'Wv'}, layer {layer}, {what}: phi(A_r=8, A_r=64, i, j)", fontsize=9
            )
            axes[row, col].set_ylabel("i (r=8)")
    for ax in axes[-1]:
        ax.set_xlabel("j (r=64)")
    fig.colorbar(im, ax=axes, shrink=0.6)
    savefig(fig, "subspace_r8_vs_r64", quick)
    # Figure 4: across seeds, r=64, top 16 x 16 directions, last layer; random Gaussian baseline
    fig, axes = plt.subplots(2, 3, figsize=(13, 8), constrained_layout=True)
    for col, module in enumerate(("query", "value")):
        for row, what in enumerate(("A", "dA")):
            a1, i1 = adapters[64, 0][module, last]
            a2, i2 = adapters[64, 1][module, last]
            phi = subspace_similarity(a1, a2) if what == "A" else subspace_similarity(a1 - i1, a2 - i2)
            axes[row, col].imshow(phi[:16, :16], vmin=0, vmax=0.5, cmap="viridis", extent=(0.5, 16.5, 16.5, 0.5))
            axes[row, col].set_title(
                f"{'Wq' if module == 'query' else 'Wv'}, layer {last}, {what}: seed 0 vs 1 (r=64)", fontsize=9
            )
    phi = subspace_similarity(rng.standard_normal((64, d)), rng.standard_normal((64, d)))
    for row in range(2):
        im = axes[row, 2].imshow(phi[:16, :16], vmin=0, vmax=0.5, cmap="viridis", extent=(0.5, 16.5, 16.5, 0.5))
        axes[row, 2].set_title("random Gaussian 64 x d pair", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("j")
        ax.set_ylabel("i")
    fig.colorbar(im, ax=axes, shrink=0.6)
    savefig(fig, "subspace_seeds", quick)


if __name__ == "__main__":
    main()
