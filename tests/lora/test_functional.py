"""Layer math against the formula written out: y = W0·x + b + (α/r)·B·A·x."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.lora import LoraConv2d, LoraEmbedding, LoraLinear
from lorakit.lora import functional as LF


def _random_adapter(layer, name="default", r=4, alpha=8.0, **kw):
    layer.add_adapter(name, r, alpha, init=False, **kw)
    return layer.lora_A[name].detach(), layer.B_matrix(name).detach()


def test_linear_forward_is_the_formula():
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    A, B = _random_adapter(layer, r=3, alpha=6.0)
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_fan_in_fan_out_forward_and_delta():
    base = Conv1D(5, 6)  # GPT-2 layout: weight [in=6, out=5]
    nn.init.normal_(base.weight)
    layer = LoraLinear(base)
    assert layer.fan_in_fan_out and (layer.fan_in, layer.fan_out) == (6, 5)
    A, B = _random_adapter(layer, r=2, alpha=2.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ base.weight + base.bias + x @ A.T @ B.T)
    torch.testing.assert_close(layer.delta_weight("default"), (B @ A).T)


def test_embedding_forward_is_a_lookup_of_A():
    base = nn.Embedding(10, 4)
    layer = LoraEmbedding(base)
    A, B = _random_adapter(layer, r=2, alpha=4.0)  # A: [r, num], B: [dim, r]
    ids = torch.tensor([[1, 2, 9], [0, 0, 3]])
    expected = base.weight[ids] + 2.0 * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected)


def test_conv2d_forward_and_delta():
    base = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    layer = LoraConv2d(base)
    A, B = _random_adapter(layer, r=2, alpha=2.0)
    x = torch.randn(2, 3, 5, 5)
    delta = (layer.lora_B["default"].flatten(1) @ layer.lora_A["default"].flatten(1)).view_as(base.weight)
    expected = F.conv2d(x, base.weight + delta, base.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), delta.detach())


def test_rslora_scaling():
    assert LF.lora_scaling(16, 8) == 0.5
    assert LF.lora_scaling(16, 8, use_rslora=True) == 2.0


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_starts_at_the_base_model(init):
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoraLinear(base)
    layer.add_adapter("default", 16, 16, init=init)
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), base(x))  # B = 0
    A = layer.lora_A["default"]
    if init == "gaussian":  # the paper's A ~ N(0, 1/r): std 1/16
        assert abs(A.std().item() - 1 / 16) < 0.01
    else:  # Kaiming-uniform(a=√5): bound 1/√fan_in
        assert A.abs().max().item() <= 1 / math.sqrt(64) + 1e-6


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoraLinear(base)
    layer.add_adapter("default", 2, 2, dropout=0.5, init=False)
    x = torch.randn(4, 8)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(y, base(x) + xd @ A.T @ B.T)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ A.T @ B.T)


def test_sliced_B_expands_to_block_structure():
    r, d = 2, 3
    B = torch.arange(2 * d * r, dtype=torch.float).view(2 * d, r)  # two enabled slices
    full = LF.expand_sliced_B(B, [True, False, True], r)  # [3d, 2r]
    assert full.shape == (3 * d, 2 * r)
    torch.testing.assert_close(full[:d, :r], B[:d])
    torch.testing.assert_close(full[2 * d :, r:], B[d:])
    assert full[:d, r:].abs().sum() == 0 and full[d : 2 * d].abs().sum() == 0 and full[2 * d :, :r].abs().sum() == 0


def test_per_slice_lora_adapts_only_enabled_slices():
    base = Conv1D(3 * 4, 4)  # fused q,k,v: out = 3·4
    layer = LoraLinear(base)
    layer.add_adapter("default", 2, 4.0, init=False, slices=[True, False, True])
    A, Bq_v = layer.lora_A["default"], layer.lora_B["default"]  # A: [2r, in], B: [2d, r]
    x = torch.randn(5, 4)
    delta = layer(x) - base(x)
    assert delta[:, 4:8].abs().max() == 0  # k untouched
    torch.testing.assert_close(delta[:, :4], 2.0 * (x @ A[:2].T @ Bq_v[:4].T))
    torch.testing.assert_close(delta[:, 8:], 2.0 * (x @ A[2:].T @ Bq_v[4:].T))


def test_mixed_forward_matches_each_row_alone():
    torch.manual_seed(0)
    As = [torch.randn(r, 6) for r in (2, 4)]
    Bs = [torch.randn(5, r) for r in (2, 4)]
    At, Bt = LF.stack_adapters(As, Bs, [0.5, 2.0])
    for tokens in (7, 1):  # one token per row (decoding) takes the embedding_bag path
        x, base_out = torch.randn(3, tokens, 6), torch.randn(3, tokens, 5)
        with torch.no_grad():  # (without autograd the sum may be accumulated into its input)
            out = LF.mixed_lora_forward(x, base_out.clone(), At, Bt, torch.tensor([1, 2, 0]))
        torch.testing.assert_close(out[0], base_out[0] + 2.0 * x[0] @ As[1].T @ Bs[1].T)
        torch.testing.assert_close(out[1], base_out[1])  # slot n = no adapter
        torch.testing.assert_close(out[2], base_out[2] + 0.5 * x[2] @ As[0].T @ Bs[0].T)


def test_adapter_runs_in_the_compute_dtype():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.add_adapter("default", 2, 2, init=False)
    layer.lora_A["default"].data = layer.lora_A["default"].data.float()  # fp32 master copy
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # The oracle: the same sum with A and B cast to bf16 (the activations are never upcast).
    A, B = layer.lora_A["default"].to(torch.bfloat16), layer.lora_B["default"].to(torch.bfloat16)
    torch.testing.assert_close(y, base(x) + layer.scaling["default"] * (x @ A.T @ B.T))


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="exceeds this layer's size"):
        LoraLinear(nn.Linear(4, 3)).add_adapter("default", 8, 8)


def test_public_api_keeps_its_contract():
    """The names and parameters users depend on (PEFT's LoraConfig fields among them)."""
    import dataclasses
    import inspect

    contract = {
        "inject": ["model", "config", "adapter_name"],
        "save_adapter": ["model", "path"],
        "load_adapter": ["model", "path", "adapter_name"],
        "merge": ["model"],
        "unmerge": ["model"],
        "merge_and_unload": ["model"],
        "mixed_batch": ["model", "adapter_names"],
    }
    for name, params in contract.items():
        signature = list(inspect.signature(getattr(lorakit, name)).parameters)
        assert signature[: len(params)] == params, (name, signature)
    fields = {f.name for f in dataclasses.fields(lorakit.LoraConfig)}
    assert {
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
        "task_type",
    } <= fields
