"""The completions API in full over HTTP: logprobs (top-k at each position) and echo (the
prompt's own token logprobs), max_tokens 0, token-id prompts, n, chat logprobs, /tokenize,
/detokenize, /tokenizer_info, and a 400 naming each field the server does not support. The
oracle: the model's own forward (with the adapter loaded the ordinary way), log-softmaxed."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.models import load_model, load_tokenizer

from ..train.conftest import model_dirs  # noqa: F401  (fixture)
from .test_engine import adapters_dir, llama_adapters  # noqa: F401  (fixtures)
from .test_server import serve  # noqa: F401  (fixture)

PROMPT = "alice met bob in paris"


def oracle(model_dir, adapter_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log-probabilities of the plain model with the adapter, one row."""
    model = load_model(str(model_dir), "AutoModelForCausalLM").model.eval()
    if adapter_dir is not None:
        lorakit.load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("adapter", ["a", None])
def test_echo_with_logprobs_scores_every_prompt_token_like_the_model(serve, model_dirs, adapters_dir, adapter):
    server = serve()
    ids = load_tokenizer(str(model_dirs["llama"]))(PROMPT)["input_ids"]
    body = {"model": adapter or "tiny", "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 2,
            "temperature": 0}  # fmt: skip
    # lm-eval's loglikelihood request, two adapters in one batch with a third row on the base
    answer = server.client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    lp = choice["logprobs"]
    expected = oracle(model_dirs["llama"], adapters_dir / adapter if adapter else None, ids)
    assert (
        len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    )
    for position in range(1, len(ids)):
        assert lp["token_logprobs"][position] == pytest.approx(expected[position - 1, ids[position]].item(), abs=1e-4)
        best = expected[position - 1].topk(2).values.tolist()
        assert sorted(lp["top_logprobs"][position].values(), reverse=True) == pytest.approx(best, abs=1e-4)
    # the one new token: the greedy choice after the prompt, with its logprob
    assert lp["token_logprobs"][-1] == pytest.approx(expected[-1].max().item(), abs=1e-4)
    assert choice["text"].startswith(server.engine.decode(ids)) and lp["text_offset"][0] == 0


def test_max_tokens_zero_scores_the_prompt_and_token_id_prompts_equal_text(serve, model_dirs):
    server = serve()
    ids = load_tokenizer(str(model_dirs["llama"]))(PROMPT)["input_ids"]
    texts = server.client.post("/v1/completions", json={"model": "b", "prompt": PROMPT, "max_tokens": 0, "echo": True,
                                                        "logprobs": 0}).json()  # fmt: skip
    tokens = server.client.post("/v1/completions", json={"model": "b", "prompt": [ids, ids[:3]], "max_tokens": 0,
                                                         "echo": True, "logprobs": 0}).json()  # fmt: skip
    assert texts["choices"][0]["finish_reason"] == "length" and texts["usage"]["completion_tokens"] == 0
    assert texts["choices"][0]["logprobs"]["token_logprobs"] == tokens["choices"][0]["logprobs"]["token_logprobs"]
    assert len(tokens["choices"]) == 2 and len(tokens["choices"][1]["logprobs"]["tokens"]) == 3
    assert all(top == {} for top in texts["choices"][0]["logprobs"]["top_logprobs"][1:])  # logprobs 0: none


def test_generated_token_logprobs_and_n_choices(serve, model_dirs, adapters_dir):
    server = serve()
    answer = server.client.post("/v1/completions", json={"model": "a", "prompt": [PROMPT, "bob"], "max_tokens": 4,
                                                         "logprobs": 1, "temperature": 0, "n": 2}).json()  # fmt: skip
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3] and choices[0]["text"] == choices[1]["text"]
    ids = load_tokenizer(str(model_dirs["llama"]))(PROMPT)["input_ids"]
    generated = server.engine.tokenize(choices[0]["text"], add_special_tokens=False)
    expected = oracle(model_dirs["llama"], adapters_dir / "a", ids + generated)
    got = choices[0]["logprobs"]["token_logprobs"]
    for k, token in enumerate(generated[: len(got)]):
        assert got[k] == pytest.approx(expected[len(ids) - 1 + k, token].item(), abs=1e-4)
    messages = [{"role": "user", "content": PROMPT}]
    chat = server.client.post(
        "/v1/chat/completions",
        json={
            "model": "a",
            "messages": messages,
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "temperature": 0,
        },
    )
    chat = chat.json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    assert content[0]["logprob"] == pytest.approx(max(x["logprob"] for x in content[0]["top_logprobs"]), abs=1e-6)


def test_tokenize_detokenize_and_tokenizer_info(serve, model_dirs):
    server = serve()
    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    tokens = server.client.post("/tokenize", json={"model": "tiny", "prompt": PROMPT}).json()
    assert tokens["tokens"] == tokenizer(PROMPT)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    assert server.client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == tokenizer.decode(
        tokens["tokens"])  # fmt: skip
    info = server.client.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["vocab_size"] == server.engine.vocab_size


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"logit_bias": {"5": 10}}, "logit_bias: not supported"),
        ({"best_of": 3}, "best_of: not supported"),
        ({"presence_penalty": 0.5}, "presence_penalty: not supported"),
        ({"suffix": "!"}, "suffix: not supported"),
        ({"stream": True, "logprobs": 1}, "stream: not supported together with logprobs"),
        ({"max_tokens": 0}, "max_tokens: 0 scores the prompt and needs echo"),
        ({"prompt": [[5, 10_000]]}, "outside the vocabulary"),
    ],
)
def test_unsupported_fields_are_a_400_naming_them(serve, extra, message):
    server = serve()
    answer = server.client.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2, **extra})
    assert answer.status_code == 400 and message in answer.json()["error"]["message"], answer.text


def test_an_end_of_sequence_token_is_scored_too(serve, model_dirs):
    """lm-eval drops the last logprob entry as the new token's: when the model's next token ends
    the sequence, it must still be there (else the prompt's last token would be dropped)."""
    server = serve()
    ids = load_tokenizer(str(model_dirs["llama"]))(PROMPT)["input_ids"]
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    greedy = server.client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    server.engine._text.eos = {server.engine.tokenize(greedy["tokens"][-1], add_special_tokens=False)[0]}
    ended = server.client.post("/v1/completions", json=body).json()["choices"][0]
    assert ended["finish_reason"] == "stop" and len(ended["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert ended["logprobs"]["token_logprobs"] == greedy["token_logprobs"]
