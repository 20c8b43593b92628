"""Images through the real server (one tiny Qwen2.5-VL server for the module): the official
`openai` SDK with data URLs, LightLLM's native multimodal_params, LangChain's ChatLightLLM with
image blocks, URLs fetched only from allowed hosts (a loopback HTTP server), and the bad-input
battery. The reference is the offline API on the same folder with the prefix cache off, and for
the cache's own test a second server with the cache off."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage
from support.live_server import metric, slots_drain
from support.vision_models import build_tokenizer, build_vl_folder, data_url, png_bytes

from lightllm_plugin import LLM, SamplingParams
from lightllm_plugin.adapters.langchain import ChatLightLLM


def solid_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


pytestmark = pytest.mark.slow  # the module's server takes over 10 s to start on 2 cores


RED, BLUE, GREEN = png_bytes(56, 56, seed=11), png_bytes(112, 84, seed=12), png_bytes(56, 56, seed=13)
LARGE = solid_png(128, 128)  # 16384 pixels: over the server's --max_image_pixels, yet a small file
MAX_BODY = 65536
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


def ask(*parts, text: str = "What is in this picture?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class _ImageHost:
    """A loopback HTTP server that stands in for an allowed media domain and counts its requests."""

    def __init__(self, files: dict[str, bytes]):
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host.requests += 1
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.requests = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory) -> str:
    return build_vl_folder(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def vl(vl_folder, launch_server):
    folder = vl_folder
    server = launch_server("--model_dir", folder, "--data_type", "float32", "--allowed_media_domains", "127.0.0.1",
                           "--max_image_pixels", "10000", "--limit_mm_per_prompt", "2",
                           "--max_body_size", str(MAX_BODY))
    offline = LLM(folder, max_total_token_num=2048, max_req_total_len=512, max_req_input_len=256, progress=False,
                  disable_dynamic_prompt_cache=True)
    host = _ImageHost({"/red.png": RED, "/blue.png": BLUE})
    yield server, offline, host, os.path.basename(folder)
    host.close()
    offline.close()


def offline_text(offline: LLM, messages: list[dict], max_tokens: int = 12) -> str:
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens)
    return offline.chat(messages, params, use_tqdm=False)[0].outputs[0].text


def chat_text(server, model: str, messages: list[dict], max_tokens: int = 12) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def test_openai_sdk_data_url_images_match_offline(vl):
    server, offline, _, model = vl
    one = ask(image_part(RED))
    # two images, the second in a later turn
    turns = [{"role": "user", "content": [image_part(BLUE), {"type": "text", "text": "Describe"}]},
             {"role": "assistant", "content": "A red square"},
             {"role": "user", "content": [{"type": "text", "text": "and this?"}, image_part(RED)]}]
    for messages in (one, turns):
        expected = offline_text(offline, messages)
        assert expected  # a real answer, not an immediate end
        assert chat_text(server, model, messages) == expected


def test_different_images_same_text_never_share_cached_kv(vl, vl_folder, launch_server):
    server, _, _, model = vl
    uncached = launch_server("--model_dir", vl_folder, "--data_type", "float32", "--disable_dynamic_prompt_cache")
    httpx.post(server.url + "/flush_cache", timeout=10)
    hits = metric(server, "lightllm_prefix_cache_hits_total")
    # RED and GREEN have the same size: the same placeholder tokens, only the image differs, and
    # it changes the answer, so KV of one reused for the other would show
    expected = {png: chat_text(uncached, model, ask(image_part(png))) for png in (RED, GREEN)}
    assert expected[RED] != expected[GREEN]
    for png in (RED, GREEN, RED, GREEN):
        assert chat_text(server, model, ask(image_part(png))) == expected[png]
    # the repeated requests read their whole prompts but the last token from the cache
    assert metric(server, "lightllm_prefix_cache_hits_total") > hits
    assert metric(uncached, "lightllm_prefix_cache_hits_total") == 0


def test_native_generate_multimodal_params(vl):
    server, offline, _, _ = vl
    tokenizer = build_tokenizer()
    messages = ask({"type": "image"}, {"type": "image"}, text="Compare")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count(PLACEHOLDER) == 2
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    expected = offline.chat(ask(image_part(RED), image_part(BLUE), text="Compare"), params, use_tqdm=False)[0]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "ignore_eos": True, "return_details": True},
            "multimodal_params": {"images": [{"type": "base64", "data": base64.b64encode(RED).decode()},
                                             {"type": "url", "data": data_url(BLUE)}]}}
    reply = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert [t["id"] for t in reply.json()["tokens"]] == expected.outputs[0].token_ids
    assert reply.json()["prompt_tokens"] == len(expected.prompt_token_ids)


def test_urls_are_fetched_from_allowed_hosts_only(vl):
    server, offline, host, model = vl
    url = f"http://127.0.0.1:{host.port}/blue.png"
    before = host.requests
    reply = chat_text(server, model, ask({"type": "image_url", "image_url": {"url": url}}))
    assert reply == offline_text(offline, ask(image_part(BLUE)))
    assert host.requests == before + 1
    # the same loopback server under a name that is not allowed: refused, never contacted
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="not in --allowed_media_domains"):
        client.chat.completions.create(model=model, max_tokens=4, messages=ask(
            {"type": "image_url", "image_url": {"url": f"http://localhost:{host.port}/blue.png"}}))
    assert host.requests == before + 1


def test_langchain_chat_model_takes_image_blocks(vl):
    server, offline, _, _ = vl
    chat = ChatLightLLM(base_url=server.url + "/v1", temperature=0, max_tokens=12)
    b64 = base64.b64encode(RED).decode()
    standard = HumanMessage(content=[{"type": "image", "base64": b64, "mime_type": "image/png"},
                                     {"type": "text", "text": "What is in this picture?"}])
    openai_shape = HumanMessage(content=[image_part(RED), {"type": "text", "text": "What is in this picture?"}])
    expected = offline_text(offline, ask(image_part(RED)))
    assert chat.invoke([standard]).content == expected
    assert chat.invoke([openai_shape]).content == expected


def test_bad_images_are_refused_and_leak_nothing(vl, default_server):
    server, _, host, model = vl
    truncated = data_url(RED)[:-7]  # no longer valid base64
    half_png = data_url(RED[: len(RED) // 2])  # valid base64 of half a PNG
    cases = {
        "not an image": (ask({"type": "image_url", "image_url": {"url": data_url(b"GIF89a? no, plain text")}}),
                         400, "not an image"),
        "too many pixels": (ask(image_part(LARGE)), 400, "max_image_pixels"),
        "too many images": (ask(image_part(RED), image_part(RED), image_part(RED)), 400, "limit_mm_per_prompt"),
        "host not allowed": (ask({"type": "image_url", "image_url": {"url": f"http://localhost:{host.port}/red.png"}}),
                             400, "allowed_media_domains"),
        "truncated base64": (ask({"type": "image_url", "image_url": {"url": truncated}}), 400, "base64"),
        "truncated image": (ask({"type": "image_url", "image_url": {"url": half_png}}), 400, "not a complete image"),
        "not a URL": (ask({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}), 400, "http(s) URL"),
        "over the body limit": (ask(image_part(os.urandom(MAX_BODY))), 413, ""),
    }
    before = host.requests
    for name, (messages, status, words) in cases.items():
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                           json={"model": model, "messages": messages, "max_tokens": 4})
        assert reply.status_code == status, (name, reply.text)
        assert words in reply.text, (name, reply.text)
    assert host.requests == before  # no refused URL was fetched
    native = httpx.post(server.url + "/generate", timeout=30, json={
        "inputs": "no placeholder", "multimodal_params": {"images": [{"type": "png", "data": "x"}]}})
    assert native.status_code == 400 and "multimodal_params.images[0].type" in native.text
    # a text-only model refuses images, whatever the route
    served = httpx.get(default_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    text_only = httpx.post(default_server.url + "/v1/chat/completions", timeout=30,
                           json={"model": served, "messages": ask(image_part(RED)), "max_tokens": 4})
    assert text_only.status_code == 400 and "text-only" in text_only.text
    native = httpx.post(default_server.url + "/generate", timeout=30, json={
        "inputs": "Hi", "multimodal_params": {"images": [{"type": "base64", "data": base64.b64encode(RED).decode()}]}})
    assert native.status_code == 400 and "text-only" in native.text
    for s in (server, default_server):
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        assert slots_drain(s)  # unused cache entries count as free
    httpx.post(server.url + "/flush_cache", timeout=10)
    assert metric(server, "lightllm_kv_slots_cached") == 0
