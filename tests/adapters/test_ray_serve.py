"""Two replicas of the default model on a local Ray cluster, behind Ray Serve: the real ray, openai
and lazyllm packages, on CPU, loopback only.

One cluster and one application serve the whole module (starting them is most of its time); the
last test SIGKILLs a replica's actor and checks the application heals. Each answer names the replica
that served it (its `x-lightllm-replica` header: replica id @ host : actor pid), which is how the
tests find each replica's own server and read its counters directly.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import time
import uuid

import pytest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'lightllm-plugin[ray]')")
import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
from ray import serve  # noqa: E402
from support.live_server import BASE_FLAGS, free_port  # noqa: E402
from support.prometheus_scrape import parse, scrape  # noqa: E402

from lightllm_plugin.adapters.ray_serve import REPLICA_HEADER, build_app  # noqa: E402

pytestmark = pytest.mark.slow

REPLICAS = 2
CALL_TIMEOUT_S = 120
HEAL_TIMEOUT_S = 180


class RayApp:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.servers: set[int] = set()  # pids of every replica server seen

    def replica_pid(self, header: str) -> int:
        return int(header.rsplit(":", 1)[1])

    def server_of(self, header: str) -> tuple[psutil.Process, str]:
        """The server process a replica owns, and its loopback URL."""
        return self.server_of_pid(self.replica_pid(header))

    def server_of_pid(self, replica_pid: int) -> tuple[psutil.Process, str]:
        (server,) = [p for p in psutil.Process(replica_pid).children()
                     if "lightllm_plugin.server" in " ".join(p.cmdline())]
        argv = server.cmdline()
        port = argv[len(argv) - 1 - argv[::-1].index("--port") + 1]
        self.servers.add(server.pid)
        return server, f"http://127.0.0.1:{port}"

    def replica_pids(self) -> list[int]:
        """The server deployment's replica actors (Ray titles their processes after the deployment)."""
        pids = []
        for p in psutil.process_iter(["cmdline"]):
            if "ServeReplica:lightllm:LightLLMServer" in " ".join(p.info["cmdline"] or ()):
                pids.append(p.pid)
        return pids


@pytest.fixture(scope="module")
def app():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    state = RayApp()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": state.port})
        serve.run(build_app(
            num_replicas=REPLICAS, server_args=BASE_FLAGS,
            ray_actor_options={"num_cpus": 0.25},  # fractional: 2 replicas and the ingress on 2 cores
            max_ongoing_requests=32, graceful_shutdown_timeout_s=10,
            health_check_period_s=1, health_check_timeout_s=10, graceful_shutdown_wait_loop_s=0.2,
        ), name="lightllm", route_prefix="/")
        yield state
        serve.shutdown()  # each replica's shutdown hook stops its server
    finally:
        ray.shutdown()
    left = [p for p in (psutil.Process(pid) for pid in state.servers if psutil.pid_exists(pid)) if p.is_running()]
    _, alive = psutil.wait_procs(left, timeout=20)
    assert not alive, f"replica servers {[p.pid for p in alive]} outlived the application"


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app.url + "/v1", api_key="none", max_retries=0, timeout=CALL_TIMEOUT_S)


@pytest.fixture(scope="module")
def model(app):
    return httpx.get(app.url + "/v1/models", timeout=CALL_TIMEOUT_S).json()["data"][0]["id"]


def test_openai_sdk_chat_stream_and_completions_through_the_ingress(client, model):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=question, max_tokens=16, temperature=0)
    answer = raw.parse().choices[0].message.content
    assert "Paris" in answer and raw.headers[REPLICA_HEADER]
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=question, max_tokens=16, temperature=0, stream=True) if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == answer  # greedy: the stream says the same
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 4


def test_distinct_prompts_spread_over_both_replicas(app, client, model):
    topics = ["volcanoes", "the violin", "Roman roads", "tax law", "penguins", "compilers"]
    served = set()
    for topic in topics:
        raw = client.completions.with_raw_response.create(model=model, prompt=f"{topic.title()} are", max_tokens=2)
        served.add(raw.headers[REPLICA_HEADER])
    assert len(served) == REPLICAS, served


def test_lazyllm_deploy_with_url_at_the_ingress(app, tmp_path):
    import lazyllm
    from lazyllm import deploy

    import lightllm_plugin.adapters.lazyllm  # noqa: F401  (points deploy.lightllm at this engine)
    from lightllm_plugin.models.default_model import DEFAULT_MODEL_NAME, default_model_path

    # a local model folder, as LazyLLM users name one (a bare name would send LazyLLM to a model hub)
    folder = tmp_path / DEFAULT_MODEL_NAME
    folder.mkdir()
    (folder / os.path.basename(default_model_path())).symlink_to(default_model_path())
    module = lazyllm.TrainableModule(str(folder)).deploy_method(deploy.lightllm, url=app.url + "/generate")
    module.start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        assert "Paris" in pool.submit(module, "What is the capital of France?").result(timeout=CALL_TIMEOUT_S)
    finally:
        pool.shutdown(wait=False)


def _conversation_turns(chat, conversations: list[str], turns: int) -> list[list[tuple[str, object]]]:
    """The conversations side by side, each turn resending its history. Returns, per
    conversation, (replica header, usage) of each turn."""
    def converse(opening: str) -> list[tuple[str, object]]:
        history, results = [{"role": "user", "content": opening}], []
        for turn in range(turns):
            header, reply, usage = chat(history)
            results.append((header, usage))
            history += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Go on ({turn + 1})."}]
        return results

    with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:
        return [f.result(timeout=CALL_TIMEOUT_S) for f in [pool.submit(converse, c) for c in conversations]]


CONVERSATIONS = ["Tell me about the moons of Jupiter.", "How do bees make honey?",
                 "Explain how a bicycle gear works.", "What is a prime number?"]
TURNS = 2


def _hit_rate(results) -> float:
    usages = [u for conversation in results for _, u in conversation]
    return sum(u.prompt_tokens_details.cached_tokens for u in usages) / sum(u.prompt_tokens for u in usages)


def _settled(url: str, name: str, expected: float, timeout: float = 10.0) -> dict:
    """A scrape once `name` reads `expected` (the engine's figures reach the api a moment after
    the answer), or the last one."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if m[name] == expected or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_conversations_stay_on_their_replica_and_keep_one_replicas_hit_rate(app, client, model, default_server):
    def via_ray(history):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=history, max_tokens=8,
                                                               temperature=0)
        reply = raw.parse()
        return raw.headers[REPLICA_HEADER], reply.choices[0].message.content, reply.usage

    replicas = app.replica_pids()
    assert len(replicas) == REPLICAS
    urls = {pid: app.server_of_pid(pid)[1] for pid in replicas}
    before = {pid: scrape(url) for pid, url in urls.items()}
    results = _conversation_turns(via_ray, CONVERSATIONS, TURNS)
    for conversation in results:
        landed = [header for header, _ in conversation]
        assert len(set(landed)) == 1, f"a conversation moved between replicas: {landed}"
    # each replica's own counters grew by exactly the prompt and cached tokens of the turns it served
    for pid, url in urls.items():
        served_here = [u for conversation in results for h, u in conversation if app.replica_pid(h) == pid]
        after = _settled(url, "vllm:prefix_cache_queries_total",
                         before[pid]["vllm:prefix_cache_queries_total"] + sum(u.prompt_tokens for u in served_here))
        assert after["vllm:prefix_cache_queries_total"] - before[pid]["vllm:prefix_cache_queries_total"] == sum(
            u.prompt_tokens for u in served_here)
        assert after["vllm:prefix_cache_hits_total"] - before[pid]["vllm:prefix_cache_hits_total"] == sum(
            u.prompt_tokens_details.cached_tokens for u in served_here)
    two_replicas = _hit_rate(results)

    single = openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0, timeout=CALL_TIMEOUT_S)

    def via_one_server(history):
        reply = single.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
        return "one", reply.choices[0].message.content, reply.usage

    one_replica = _hit_rate(_conversation_turns(via_one_server, CONVERSATIONS, TURNS))
    print(f"prefix-cache hit rate: 2 replicas {two_replicas:.3f}, one server {one_replica:.3f}")
    assert two_replicas > 0.3
    assert abs(two_replicas - one_replica) <= 0.10, (two_replicas, one_replica)


def test_metrics_through_each_replica_equal_its_servers_own(app):
    seen = {}
    for _ in range(40):  # bounded: the router picks one of two at random each time
        r = httpx.get(app.url + "/metrics", timeout=CALL_TIMEOUT_S)
        header = r.headers[REPLICA_HEADER]
        if header not in seen:
            seen[header] = parse(r.text)
        if len(seen) == REPLICAS:
            break
    assert len(seen) == REPLICAS
    for header, through_ray in seen.items():
        direct = scrape(app.server_of(header)[1])
        assert direct["model_name"] == through_ray["model_name"]
        for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                     "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_sum",
                     "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
            assert direct[name] == through_ray[name], name
    assert httpx.get(app.url + "/health", timeout=CALL_TIMEOUT_S).status_code == 200


def test_a_client_that_disconnects_aborts_its_request_in_the_replica(app):
    body = {"inputs": "Write a very long story about a lighthouse.",
            "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    with httpx.stream("POST", app.url + "/generate_stream", json=body, timeout=CALL_TIMEOUT_S) as r:
        url = app.server_of(r.headers[REPLICA_HEADER])[1]
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        aborted = scrape(url).get('lightllm_requests_finished_total{finish_reason=abort}', 0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = scrape(url)
        if m.get('lightllm_requests_finished_total{finish_reason=abort}', 0) == aborted + 1 \
                and m["vllm:num_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert m.get('lightllm_requests_finished_total{finish_reason=abort}', 0) == aborted + 1
    assert m["vllm:num_requests_running"] == 0


def _one_request(client, model, index: int, started: queue.Queue) -> tuple[str, str | None]:
    """('ok' or the retryable error it ended with, the replica that took it). Fresh text: the
    router spreads these over both replicas."""
    messages = [{"role": "user", "content": f"{uuid.uuid4().hex}: list some fruits, number {index}."}]
    replica = None
    try:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=24,
                                                               stream=bool(index % 2))
        replica = raw.headers[REPLICA_HEADER]
        started.put(replica)
        if index % 2:
            text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            text = raw.parse().choices[0].message.content
        return ("ok" if text else "empty"), replica
    except openai.APIStatusError as exc:
        return f"status {exc.status_code}", replica
    except openai.APIConnectionError:
        return "connection", replica
    except openai.APIError:  # the error event a stream ends with when its replica is lost
        return "stream error", replica


def test_sigkill_of_a_replica_mid_load_fails_cleanly_and_the_app_heals(app, client, model):
    # the SDK as users run it: it retries a 503 (after its Retry-After), which the router sends to
    # a live replica
    retrying = client.with_options(max_retries=3)
    started: queue.Queue = queue.Queue()
    pool = concurrent.futures.ThreadPoolExecutor(12)
    futures = [pool.submit(_one_request, retrying, model, i, started) for i in range(12)]
    victim = started.get(timeout=CALL_TIMEOUT_S)  # a replica with a request under way
    victim_server, _ = app.server_of(victim)
    os.kill(app.replica_pid(victim), signal.SIGKILL)
    results = [f.result(timeout=CALL_TIMEOUT_S) for f in futures]  # none hangs
    pool.shutdown()
    outcomes = [outcome for outcome, _ in results]
    print(f"outcomes during the replica's SIGKILL: {sorted(results, key=str)}")
    assert set(outcomes) <= {"ok", "status 503", "connection", "stream error"}, results
    assert "ok" in outcomes
    victim_server.wait(20)  # the server went with its replica

    # Serve starts a replacement; afterwards both replicas serve through the ingress
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while time.monotonic() < deadline and _running_replicas() < REPLICAS:
        time.sleep(0.5)
    served: set[str] = set()
    for _ in range(40):  # text-less requests are routed by power of two choices
        served.add(httpx.get(app.url + "/v1/models", timeout=CALL_TIMEOUT_S).headers[REPLICA_HEADER])
        if len(served) == REPLICAS:
            break
    assert victim not in served and len(served) == REPLICAS, served
    # and the new one generates (fresh text goes to the replica holding the least)
    raw = client.completions.with_raw_response.create(model=model, prompt=f"{uuid.uuid4().hex} is", max_tokens=2)
    assert raw.parse().usage.completion_tokens == 2 and raw.headers[REPLICA_HEADER] in served


def _running_replicas() -> int:
    status = serve.status().applications["lightllm"].deployments["LightLLMServer"]
    return status.replica_states.get("RUNNING", 0) if status.status == "HEALTHY" else 0


def test_the_ray_serve_command_splits_its_flags_from_the_proxys_and_the_replicas():
    from lightllm_plugin.adapters.ray_serve_hooks import split_argv

    ray_args, proxy, replica = split_argv(["--replicas", "3", "--port", "9000", "--host=0.0.0.0", "--tp", "2",
                                           "--max_total_token_num", "8192", "--disable_dynamic_prompt_cache"])
    assert ray_args.replicas == 3 and ray_args.max_replicas is None
    assert proxy == ["--port", "9000", "--host=0.0.0.0"]
    assert replica == ["--tp", "2", "--max_total_token_num", "8192", "--disable_dynamic_prompt_cache"]


def test_serve_run_targets_build_applications():
    """`serve run lightllm_plugin.adapters.ray_serve:app` and `...:app_builder key=value` resolve
    to Serve applications through Serve's own import helper."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    assert isinstance(import_attr("lightllm_plugin.adapters.ray_serve:app"), Application)
    builder = import_attr("lightllm_plugin.adapters.ray_serve:app_builder")
    built = call_user_app_builder_with_args_if_necessary(builder, {"num_replicas": "2", "max_replicas": "4"})
    assert isinstance(built, Application)
