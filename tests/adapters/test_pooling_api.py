"""The pooling routes against real servers of tiny random models, checked with transformers.

One server serves an embedding folder (last-token pooling, Matryoshka dimensions 16 and 32),
one a reward model (Llama with a one-label score head): support.pooling_models' session servers. The real `openai` SDK's
`embeddings.create` (float and base64), LightLLM's /get_score, vLLM's /pooling, /classify,
/score and /v1/rerank; bad input is a 4xx naming the field; a route of the other kind of model
is a 400 saying what the served model does; afterwards every KV slot is free.
"""

import base64
import concurrent.futures
import math
import struct

import httpx
import openai
import pytest
import torch
from support.live_server import metric, slots_drain
from support.pooling_models import HFReference, rel_err

pytestmark = pytest.mark.slow  # the session's two pooling servers take ~15 s to start

TEXTS = ["The capital of France is Paris.", "Cats sleep most of the day.", "A", "Rain is expected tomorrow " * 12,
         "Photosynthesis turns light into chemical energy.", "Paris is in France."]


@pytest.fixture(scope="module")
def embed_server(pooling_servers):
    return pooling_servers["embed"]


@pytest.fixture(scope="module")
def reward_server(pooling_servers):
    return pooling_servers["reward"]


@pytest.fixture(scope="module")
def tokenizer(embed_server):
    from lightllm_plugin.models.tokenizer import load_tokenizer

    return load_tokenizer(embed_server.folder)


@pytest.fixture(scope="module")
def embed_ref(embed_server):
    return HFReference(embed_server.folder, "qwen3_embed_last")


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def test_openai_sdk_embeddings_float_and_base64(embed_server, embed_ref, tokenizer):
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    ids = [tokenizer.encode(t) for t in TEXTS]
    wants = [embed_ref(p) for p in ids]
    floats = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    for d, want in zip(floats.data, wants):
        assert len(d.embedding) == 64 and rel_err(d.embedding, want) < 1e-4
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(map(len, ids))
    # the SDK asks for base64 unless told otherwise, and decodes it itself
    decoded = client.embeddings.create(model=model, input=TEXTS[0])
    assert rel_err(decoded.data[0].embedding, wants[0]) < 1e-4
    raw = httpx.post(embed_server.url + "/v1/embeddings", timeout=60,
                     json={"model": model, "input": TEXTS[1], "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert rel_err(struct.unpack(f"<{len(packed) // 4}f", packed), wants[1]) < 1e-4
    # token ids, one list or several
    by_ids = client.embeddings.create(model=model, input=[ids[3], ids[4]], encoding_format="float")
    assert all(rel_err(d.embedding, w) < 1e-4 for d, w in zip(by_ids.data, wants[3:5]))
    # Matryoshka: the first 16 values, normalized again
    short = client.embeddings.create(model=model, input=TEXTS[0], dimensions=16, encoding_format="float")
    assert rel_err(short.data[0].embedding, torch.nn.functional.normalize(wants[0][:16], dim=-1)) < 1e-4


@pytest.mark.parametrize("body, status, param, words", [
    ({"input": []}, 400, "input", "empty list"),
    ({"input": ""}, 400, "input", "empty string"),
    ({"input": ["a", ""]}, 400, "input", "input[1] must not be an empty string"),
    ({"input": ["x"] * 17}, 400, "input", "max_batch_embeddings=16"),
    ({"input": "word " * 400}, 400, "input", "max_req_input_len=256"),
    ({"input": "a", "dimensions": 20}, 400, "dimensions", "Matryoshka dimensions [16, 32]"),
    ({"input": "a", "dimensions": 100}, 400, "dimensions", "between 1 and the model's 64"),
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format", "float or base64"),
    ({"input": [[1, 2], [10**9]]}, 400, "input", "outside the vocabulary"),
])
def test_bad_embedding_requests_name_the_field(embed_server, body, status, param, words):
    model = httpx.get(embed_server.url + "/v1/models").json()["data"][0]["id"]
    r = post(embed_server, "/v1/embeddings", {"model": model, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] in (param, None)
    if param != "input" or "vocabulary" not in words:
        assert error["param"] == param


def test_pooling_score_and_rerank(embed_server, embed_ref, tokenizer):
    wants = [embed_ref(tokenizer.encode(t)) for t in TEXTS]
    pooled = post(embed_server, "/pooling", {"input": TEXTS[:2]}).json()
    assert [d["object"] for d in pooled["data"]] == ["pooling"] * 2
    assert rel_err(pooled["data"][1]["data"], wants[1]) < 1e-4
    scored = post(embed_server, "/score", {"text_1": TEXTS[0], "text_2": TEXTS[1:]}).json()
    expected = [torch.dot(wants[0], w).item() for w in wants[1:]]
    for d, want in zip(scored["data"], expected):
        assert math.isclose(d["score"], want, rel_tol=1e-4, abs_tol=1e-6)
    pairwise = post(embed_server, "/score", {"text_1": TEXTS[:2], "text_2": TEXTS[2:4]}).json()
    assert math.isclose(pairwise["data"][1]["score"], torch.dot(wants[1], wants[3]).item(), rel_tol=1e-4, abs_tol=1e-6)
    reranked = post(embed_server, "/v1/rerank", {"query": TEXTS[0], "documents": TEXTS[1:], "top_n": 3}).json()
    order = sorted(range(len(expected)), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in reranked["results"]] == order
    assert [r["document"]["text"] for r in reranked["results"]] == [TEXTS[1:][i] for i in order]
    scores = [r["relevance_score"] for r in reranked["results"]]
    assert scores == sorted(scores, reverse=True)
    assert post(embed_server, "/v1/rerank", {"query": "q", "documents": []}).status_code == 400


def test_routes_of_the_other_kind_of_model_say_what_the_server_does(embed_server, reward_server):
    for path, body in [("/generate", {"inputs": "hi"}), ("/v1/completions", {"model": "x", "prompt": "hi"})]:
        r = post(embed_server, path, body)
        assert r.status_code in (400, 404) and ("embedding model" in r.text or "does not exist" in r.text), r.text
    r = post(embed_server, "/generate", {"inputs": "hi"})
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]
    r = post(embed_server, "/classify", {"input": "hi"})
    assert r.status_code == 400 and "serves an embedding model (--task embed)" in r.json()["error"]
    r = post(reward_server, "/v1/embeddings", {"model": reward_server.folder.rstrip("/").split("/")[-1], "input": "hi"})
    assert r.status_code == 400 and "reward model" in r.json()["error"]["message"], r.text
    r = post(reward_server, "/v1/chat/completions", {"model": reward_server.folder.rstrip("/").split("/")[-1],
                                                     "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "/get_score" in r.json()["error"]["message"], r.text


def test_reward_server_scores_concurrent_requests_like_hf(reward_server, tokenizer):
    ref = HFReference(reward_server.folder, "llama_reward")
    texts = [f"{t} " * (1 + i % 5) for i, t in enumerate(TEXTS * 2)]  # 12 prompts, 2 to ~300 tokens
    texts = [t if len(tokenizer.encode(t)) <= 256 else TEXTS[0] for t in texts]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda t: post(reward_server, "/get_score", {"chat": t, "parameters": {}}), texts))
    for text, r in zip(texts, answers):
        body = r.json()
        ids = tokenizer.encode(text)
        assert body["prompt_tokens"] == len(ids) and body["finish_reason"] == "stop"
        assert math.isclose(body["score"], ref(ids)[0].item(), rel_tol=1e-4, abs_tol=1e-6)
    classified = post(reward_server, "/classify", {"input": TEXTS[:2]}).json()
    for d, text in zip(classified["data"], TEXTS):
        assert d["num_classes"] == 1
        assert math.isclose(d["probs"][0], torch.sigmoid(ref(tokenizer.encode(text)))[0].item(), rel_tol=1e-4)
    # a cross-encoder: the pair encoded together, sigmoid of the one logit
    scored = post(reward_server, "/score", {"text_1": TEXTS[0], "text_2": TEXTS[1:4]}).json()
    expected = [torch.sigmoid(ref(tokenizer(TEXTS[0], text_pair=t)["input_ids"]))[0].item() for t in TEXTS[1:4]]
    for d, want in zip(scored["data"], expected):
        assert math.isclose(d["score"], want, rel_tol=1e-4)
    reranked = post(reward_server, "/rerank", {"query": TEXTS[0], "documents": TEXTS[1:4]}).json()
    assert [r["index"] for r in reranked["results"]] == sorted(range(3), key=lambda i: -expected[i])
    assert post(reward_server, "/get_score", {"chat": ""}).status_code == 400
    assert post(reward_server, "/get_score", {"chat": "word " * 400}).status_code == 400


def test_a_generation_server_refuses_pooling_routes(default_server):
    model = httpx.get(default_server.url + "/v1/models").json()["data"][0]["id"]
    r = post(default_server, "/v1/embeddings", {"model": model, "input": "hi"})
    assert r.status_code == 400 and "generation model" in r.json()["error"]["message"], r.text
    r = post(default_server, "/get_score", {"chat": "hi"})
    assert r.status_code == 400 and "--task generate" in r.json()["error"]


def test_every_slot_is_free_afterwards(embed_server, reward_server):
    for server in (embed_server, reward_server):
        assert httpx.post(server.url + "/flush_cache", timeout=30).json()["success"]
        assert slots_drain(server)
        assert metric(server, "lightllm_kv_slots_cached") == 0
