"""LoRA on a quantised frozen base that a user loaded with transformers' BitsAndBytesConfig
(QLoRA's NF4, and int8): the wrapped layer computes the dequantised W·x plus the low-rank
term, the adapter round-trips with PEFT on the same quantised base, training moves only A and
B, and an in-place merge is refused with the reason."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers as tf

import lorakit
from tests.conftest import train_losses

SCHEMES = {
    "nf4": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),  # fmt: skip
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA wide enough for bitsandbytes' 64-value blocks."""
    directory = tmp_path_factory.mktemp("quant-base")
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def quantized(base_dir, scheme: str) -> torch.nn.Module:
    config = tf.BitsAndBytesConfig(**SCHEMES[scheme])
    return tf.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, dtype=torch.float32)


def dequantized_weight(layer) -> torch.Tensor:
    """The oracle's W: bitsandbytes' own dequantisation of the stored blocks, [out, in] fp32."""
    weight = layer.weight
    if weight.dtype == torch.uint8:  # NF4: 4-bit codes, absmax per 64 values (double-quantised)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * weight.SCB.float()[:, None] / 127  # int8: a scale per row


def randomize(model, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for name in layer.adapter_names:
                layer.lora_A[name].normal_(std=0.2)
                layer.lora_B[name].normal_(std=0.2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_wrapped_layer_is_dequantised_W_plus_the_low_rank_term(base_dir, scheme):
    model = quantized(base_dir, scheme)
    q_proj = model.model.layers[0].self_attn.q_proj
    W = dequantized_weight(q_proj)  # before any forward: bnb may repack the blocks in place
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8))
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quantized and (layer.fan_in, layer.fan_out) == (64, 64)
    first_row = lorakit.dry_run(model, lorakit.LoraConfig(r=4)).splitlines()[0]
    assert "self_attn.q_proj" in first_row and f"64x64 {layer.weight.dtype}" in first_row  # not the packed shape
    assert layer.lora_A["default"].dtype == torch.float32  # fp32 adapter on a 4/8-bit base
    x = torch.randn(3, 5, 64, requires_grad=True)  # autograd: bnb's plain path
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = x @ W.T + layer.scaling["default"] * (x @ A.T @ B.T)
    tol = dict(rtol=0, atol=2e-5) if scheme == "nf4" else dict(rtol=0, atol=0.05)  # int8 runs in fp16 there
    torch.testing.assert_close(layer(x), expected, **tol)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapters_round_trip_with_peft_on_the_same_quantised_base(base_dir, scheme, tmp_path):
    ids = torch.tensor([[5, 9, 3, 17, 42, 8], [1, 2, 3, 4, 5, 6]])
    # lorakit -> PEFT
    ours = lorakit.inject(quantized(base_dir, scheme), lorakit.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    randomize(ours)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(quantized(base_dir, scheme), tmp_path / "ours")
    # train mode (no dropout here): in eval mode bitsandbytes would first repack PEFT's NF4 blocks,
    # rounding their scales to bf16
    theirs.train(), ours.train()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # PEFT -> lorakit
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    made = peft.get_peft_model(quantized(base_dir, scheme), config)
    made.save_pretrained(tmp_path / "theirs")
    loaded = lorakit.load_adapter(quantized(base_dir, scheme), tmp_path / "theirs")
    loaded.train(), made.train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, made(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_on_a_quantised_base_moves_only_the_adapter_and_the_loss_falls(base_dir, scheme):
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    model = lorakit.inject(quantized(base_dir, scheme), config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = (torch.arange(16) + torch.tensor([[0], [9], [23], [40]])) % 64  # next token: this one + 1
    losses = train_losses(model, ids, steps=20, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_merging_into_a_quantised_base_is_refused_and_changes_nothing(base_dir):
    model = lorakit.inject(quantized(base_dir, "nf4"), lorakit.LoraConfig(r=4))
    randomize(model)
    ids = torch.tensor([[5, 9, 3, 17]])
    model.train()  # bnb's plain path, the same before and after
    before = model(input_ids=ids).logits.detach()
    with pytest.raises(lorakit.MergeError, match="quantised weight .* Keep the adapter unmerged"):
        lorakit.merge(model)
    with pytest.raises(lorakit.MergeError, match="quantised weight"):
        lorakit.merge_and_unload(model)
    assert all(not layer.merged_adapters for _, layer in lorakit.lora_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), before)
    lorakit.unmerge(model)  # nothing merged: a no-op, not an error


def test_mixed_batches_on_an_nf4_base_equal_one_adapter_at_a_time(base_dir):
    model = quantized(base_dir, "nf4")
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2 if name == "a" else 4), adapter_name=name)
    randomize(model)
    model.train()  # (no dropout in this config) bnb's plain path
    ids = torch.tensor([[5, 9, 3, 17], [1, 2, 3, 4], [7, 7, 8, 9]])
    names = ["b", None, "a"]
    with lorakit.mixed_batch(model, names):
        mixed = model(input_ids=ids).logits.detach()
    for row, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = model(input_ids=ids[row : row + 1]).logits.detach()
        else:
            lorakit.set_adapter(model, name)
            alone = model(input_ids=ids[row : row + 1]).logits.detach()
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-4, atol=1e-5)


def test_inject_gives_nf4_layers_the_dequantise_then_matmul_forward_and_its_gradient(base_dir):
    """On CPU an injected NF4 layer computes x @ dequantise(W).T, and its input gradient
    grad @ dequantise(W), against bitsandbytes' own plain layer and the math written out."""
    model = quantized(base_dir, "nf4")
    plain = model.model.layers[0].mlp.down_proj  # not a LoRA target: its own forward
    reference = copy.deepcopy(plain)
    W = dequantized_weight(plain)
    lorakit.inject(model, lorakit.LoraConfig(r=4))
    assert type(plain).__name__ == "NF4Linear" and isinstance(plain, bnb.nn.Linear4bit)
    assert plain.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 5, 128, requires_grad=True)
    grad = torch.randn(3, 5, 64)
    outputs, grads = [], []
    for layer in (plain, reference):
        out = layer(x)
        outputs.append(out)
        grads.append(torch.autograd.grad(out, x, grad)[0])
    torch.testing.assert_close(outputs[0], x @ W.T, rtol=0, atol=2e-5)
    torch.testing.assert_close(grads[0], grad @ W, rtol=0, atol=2e-5)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=2e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_nf4_weight_dequantised_into_a_buffer_is_bitsandbytes_own_dequantisation(dtype):
    """The forward writes W into a reusable buffer through bitsandbytes' native CPU kernel: the
    very values of `dequantize_4bit`, at both compute dtypes and when the buffer's dtype
    differs from the one the blocks were quantised from."""
    from lorakit.quantize import nf4_linear_class

    torch.manual_seed(0)
    layer = nf4_linear_class()(192, 96, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 192, dtype=dtype) * 0.02, requires_grad=False, blocksize=64,
                                     compress_statistics=True, quant_type="nf4", module=layer)  # fmt: skip
    layer = layer.to("cpu")
    expected = bnb.functional.dequantize_4bit(layer.weight, layer.weight.quant_state)
    for out_dtype in (dtype, torch.float32 if dtype == torch.bfloat16 else torch.bfloat16):
        buffer = torch.full((96, 192), float("nan"), dtype=out_dtype)
        written = layer.dense(out_dtype, out=buffer)
        assert written.data_ptr() == buffer.data_ptr()
        assert torch.equal(buffer, expected.to(out_dtype))


def test_quantised_layers_of_one_size_share_a_buffer_and_still_compute_their_own_weights(base_dir):
    """Every NF4 layer of a size dequantises into one scratch buffer, in the forward and again in
    the backward: two such layers in a row give the outputs and input gradients of their own
    dequantised weights (the math written out), and each thread has its own buffer."""
    import threading

    from lorakit.quantize.matmul import scratch

    model = lorakit.inject(quantized(base_dir, "nf4"), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    first, second = model.model.layers[0].self_attn.o_proj, model.model.layers[1].self_attn.o_proj
    W1, W2 = dequantized_weight(first), dequantized_weight(second)
    assert not torch.equal(W1, W2)
    x = torch.randn(3, 64, requires_grad=True)
    out = second(first(x))
    grad = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(out, x @ W1.T @ W2.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, torch.ones(3, 64) @ W2 @ W1, rtol=0, atol=1e-5)
    here = scratch((64, 64), torch.float32, torch.device("cpu"))
    assert here.data_ptr() == scratch((32, 128), torch.float32, torch.device("cpu")).data_ptr()  # same size
    there = []
    thread = threading.Thread(target=lambda: there.append(scratch((64, 64), torch.float32, torch.device("cpu"))))
    thread.start()
    thread.join()
    assert there[0].data_ptr() != here.data_ptr()


def test_an_eval_pass_leaves_an_nf4_layer_as_it_was(base_dir):
    """bitsandbytes repacks an NF4 weight for its CPU inference kernel on a no-grad eval pass
    (lossily, and for a kernel without backward); lorakit's layer keeps weights, outputs and
    input gradients as they were."""
    model = lorakit.inject(quantized(base_dir, "nf4"), lorakit.LoraConfig(r=4))
    layer = model.model.layers[0].mlp.down_proj
    weights = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 128, requires_grad=True)
    before = torch.autograd.grad(layer(x).sum(), x)[0]
    model.eval()
    with torch.no_grad():
        decoded = layer(x[:1].detach())  # one row, as when generating
    model.train()
    after = torch.autograd.grad(layer(x).sum(), x)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(decoded, layer(x[:1]).detach(), rtol=0, atol=0)
    assert all(torch.equal(value, weights[key]) for key, value in layer.state_dict().items())


def test_dora_on_an_nf4_base_equals_peft_dora_on_it(base_dir, tmp_path):
    """DoRA's norm of a quantised W0 (taken through the base layer's own kernel, never a dense
    copy) gives PEFT's outputs (which dequantise W0) on the same blocks. (PEFT's DoRA on an int8
    base fails on CPU in bitsandbytes' int8 state, so int8 has no oracle here.)"""
    ids = torch.tensor([[5, 9, 3, 17, 42, 8], [1, 2, 3, 4, 5, 6]])
    config = lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=True, task_type="CAUSAL_LM")
    ours = lorakit.inject(quantized(base_dir, "nf4"), config)
    randomize(ours)
    lorakit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(quantized(base_dir, "nf4"), tmp_path)
    theirs.train(), ours.train()  # bnb's plain path (see above)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        with lorakit.disable_adapters(ours):
            assert not torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-2)
