"""Ray Serve adapter: N replicas of the whole server behind one HTTP address, routed by prefix
affinity through Ray Serve's own request router.

    from ray import serve
    from lightllm_plugin.adapters.ray_serve import build_app

    serve.run(build_app(num_replicas=2, server_args=["--max_total_token_num", "8192"]))

or `serve run lightllm_plugin.adapters.ray_serve:app_builder num_replicas=2`, or
`lightllm-plugin ray-serve --replicas 2 [serve's flags]`.

Two deployments:
- `LightLLMServer`: each replica owns one full server (`python -m lightllm_plugin.server`: api,
  tokenizer, router, detokenizer, with `--tp` its ranks) on a free loopback port, started in the
  replica's constructor and stopped by its shutdown hook (`__del__`), which lets the server drain
  within `graceful_shutdown_timeout_s`. The server dies with the replica even when the replica is
  SIGKILLed (PR_SET_PDEATHSIG). Its `forward` proxies one HTTP request and streams the answer back.
- `LightLLMIngress`: the HTTP entry. It proxies every path (the native routes, /v1, /metrics,
  /health) to a server replica through a DeploymentHandle, streaming included. A client that
  disconnects cancels the handle call, which closes the replica's connection to its server, which
  aborts the request there.

Routing is Ray Serve's `PrefixCacheAffinityRouter` (ray.serve.llm), configured on the server
deployment: it reads the `prompt` attribute of the request object the ingress passes (the chat
messages or the prompt, as text), sends a request to the replica whose prompts share the longest
prefix with it, and falls back to the power-of-two-choices least loaded replica when the load is
imbalanced (`imbalanced_threshold`) or nothing matches well. Requests without text (GET /v1/models,
/metrics) pass no positional argument, which the router routes as plain power of two choices.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

try:
    import httpx
    from ray import serve
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.config import RequestRouterConfig
    from ray.serve.exceptions import BackPressureError
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lightllm_plugin.adapters.ray_serve needs Ray Serve: pip install 'lightllm-plugin[ray]'") from exc

# Ray Serve's prefix-aware router. Its public name, ray.serve.llm.request_router.PrefixCacheAffinityRouter,
# is a bare subclass of this class, but importing ray.serve.llm needs vLLM or SGLang installed (its
# LLM configs import them); the class itself needs neither, so it is named where Ray defines it.
PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter"
PREFIX_ROUTER_PUBLIC = "ray.serve.llm.request_router.PrefixCacheAffinityRouter"
# Serve's default is 5 ongoing requests per replica; one server batches hundreds
DEFAULT_MAX_ONGOING_REQUESTS = 64
# Serve's own default; the server's --drain_timeout is set a little below it
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0
DRAIN_MARGIN_S = 2.0
SERVER_START_TIMEOUT_S = 600.0
RETRY_AFTER_S = "1"
REPLICA_HEADER = "x-lightllm-replica"
# headers that describe one connection, not the message: never forwarded
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                         "proxy-authorization", "proxy-authenticate", "host", "content-length"})
# set by the server that answers the client, so not copied from the replica's answer
_OWN_RESPONSE_HEADERS = frozenset({"date", "server"})
_PR_SET_PDEATHSIG = 1


@dataclass
class ProxiedRequest:
    """One HTTP request on its way from the ingress to a server replica. `prompt` is the text the
    prefix-affinity router matches on (PrefixCacheAffinityRouter reads this attribute)."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    prompt: str = ""

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def routing_text(body: bytes) -> str:
    """The text whose prefix decides the replica: a chat's messages (their roles and text, in
    order, which is how the prompt the model sees begins), a completion's prompt, LightLLM's
    `inputs`; "" for anything else."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    messages = data.get("messages")
    if isinstance(messages, list):
        return "".join(f"{m.get('role', '')}: {_text(m.get('content'))}\n" for m in messages if isinstance(m, dict))
    for key in ("prompt", "inputs"):
        value = data.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:  # token ids, or a batch: its first prompt
            first = value[0]
            return first if isinstance(first, str) else " ".join(map(str, value if isinstance(first, int) else first))
    return ""


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the server's process before exec: the kernel sends it SIGTERM (a drain, which
    ends at once since its only client, this replica, is gone) when the replica dies, SIGKILL
    included."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def server_command(port: int, server_args: list[str], drain_timeout: float) -> list[str]:
    # the replica's drain and its own port for the --tp ranks (two replicas on one node must not
    # share one) go first: the caller's flags come later and win
    return [sys.executable, "-m", "lightllm_plugin.server", "--drain_timeout", f"{drain_timeout:g}",
            "--nccl_port", str(_free_loopback_port()), *server_args, "--host", "127.0.0.1", "--port", str(port)]


class LightLLMServer:
    """One Serve replica: one full lightllm-plugin server in a child process."""

    def __init__(self, server_args: list[str], drain_timeout: float):
        self._client: httpx.AsyncClient | None = None
        self.port = _free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.drain_timeout = drain_timeout
        context = serve.get_replica_context()
        self.replica = f"{context.replica_id.unique_id}@{socket.gethostname()}:{os.getpid()}"
        self.process = subprocess.Popen(server_command(self.port, list(server_args), drain_timeout),
                                        preexec_fn=_die_with_parent)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the replica's server exited with code {code} while starting (its log is above)")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.process.kill()
        raise RuntimeError(f"the replica's server was not ready after {SERVER_START_TIMEOUT_S:g} s")

    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # made on the replica's event loop, where forward runs
            self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10.0, read=None))
        return self._client

    async def forward(self, request: ProxiedRequest | None = None, *, unrouted: ProxiedRequest | None = None):
        """Proxy one request to this replica's server: yields the head (status, headers, which
        replica), then the body's bytes as they come. Cancelled (the client went away), it closes
        the connection to the server, which aborts the request there."""
        request = request or unrouted
        upstream = self.client().build_request(request.method, request.target, headers=request.headers,
                                               content=request.body)
        response = await self.client().send(upstream, stream=True)
        try:
            headers = [(k, v) for k, v in response.headers.multi_items()
                       if k.lower() not in _HOP_BY_HOP and k.lower() not in _OWN_RESPONSE_HEADERS]
            yield {"status": response.status_code, "headers": headers, "replica": self.replica}
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    async def check_health(self) -> None:
        """Serve's health probe: a dead or unhealthy server makes Serve replace this replica."""
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"the replica's server exited with code {code}")
        response = await self.client().get("/health", timeout=5)
        if response.status_code != 200:
            raise RuntimeError(f"the replica's server answers /health with {response.status_code}")

    async def __del__(self):
        """Serve's shutdown hook (scale-down, redeploy, serve.shutdown): Serve has already waited
        for this replica's ongoing requests; the server drains whatever is left and exits."""
        if self._client is not None:
            await self._client.aclose()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, self.drain_timeout + DRAIN_MARGIN_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 5)


def _error_response(path: str, status: int, message: str) -> Response:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}} \
        if path.startswith("/v1/") else {"error": message}
    return Response(json.dumps(body), status_code=status, media_type="application/json",
                    headers={"retry-after": RETRY_AFTER_S})


def _stream_error_event(path: str, message: str) -> bytes:
    """How a stream says its replica died mid-way: an error event, which the OpenAI SDK raises
    as an APIError, instead of an end that looks like a normal one."""
    error = {"message": message, "type": "server_error", "param": None, "code": None} \
        if path.startswith("/v1/") else message
    return f"data: {json.dumps({'error': error})}\n\n".encode()


# what a replica that died or is gone looks like to the ingress: retryable
_REPLICA_LOST = (RayActorError, BackPressureError, RayTaskError, asyncio.TimeoutError, ConnectionError)


class LightLLMIngress:
    """The HTTP entry: every path goes to a server replica, chosen by Serve's request router."""

    def __init__(self, server):
        self.server = server.options(stream=True)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        proxied = ProxiedRequest(
            request.method, request.url.path, request.url.query,
            [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP], body,
        )
        proxied.prompt = routing_text(body) if request.method == "POST" else ""
        # positional: the prefix router reads its prompt; keyword: plain power of two choices
        # (the router has nothing to match, and an empty prompt is not a prefix of anything)
        stream = (self.server.forward.remote(proxied) if proxied.prompt
                  else self.server.forward.remote(unrouted=proxied))
        try:
            head = await stream.__anext__()
        except _REPLICA_LOST as exc:
            stream.cancel()
            return _error_response(proxied.path, 503, f"no replica could take the request ({type(exc).__name__}); retry")
        except StopAsyncIteration:
            return _error_response(proxied.path, 503, "the replica ended the request without an answer; retry")
        except BaseException:
            stream.cancel()
            raise
        headers = dict(head["headers"])
        headers[REPLICA_HEADER] = head["replica"]
        event_stream = headers.get("content-type", "").startswith("text/event-stream")

        async def body_chunks():
            try:
                async for chunk in stream:
                    yield chunk
            except _REPLICA_LOST as exc:
                if event_stream:
                    yield _stream_error_event(proxied.path, f"the replica serving this stream was lost "
                                              f"({type(exc).__name__}); retry the request")
                else:
                    raise
            finally:
                stream.cancel()  # no-op once it ended; after a client disconnect it aborts the request

        return StreamingResponse(body_chunks(), status_code=head["status"], headers=headers)


def _prefix_router() -> str:
    """The router's import path: where Ray defines it, else (a Ray that moved it) its public name."""
    import importlib.util

    module = PREFIX_ROUTER.rsplit(".", 1)[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return PREFIX_ROUTER if found else PREFIX_ROUTER_PUBLIC


def build_app(
    model: str | None = None,
    num_replicas: int | None = 1,
    autoscaling_config: dict | None = None,
    server_args: list[str] | tuple[str, ...] = (),
    *,
    ray_actor_options: dict | None = None,
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    graceful_shutdown_timeout_s: float = DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
    request_router_kwargs: dict | None = None,
    ingress_actor_options: dict | None = None,
    **deployment_options: Any,
):
    """A Ray Serve application: `num_replicas` servers of `model` (None: the default model)
    behind one ingress; pass it to `serve.run`.

    - `server_args`: the `serve` command's flags for every replica's server (`--tp 2`, ...).
    - `autoscaling_config`: Serve's, e.g. {"min_replicas": 1, "max_replicas": 4,
      "target_ongoing_requests": 32}; replaces `num_replicas`.
    - `ray_actor_options`: each replica's resources, e.g. {"num_gpus": 1} (default {"num_cpus": 1});
      with `--tp N` in server_args give it N GPUs.
    - `graceful_shutdown_timeout_s`: how long Serve lets a stopping replica drain before it kills
      it; the server's --drain_timeout is set just below (a --drain_timeout in server_args wins).
    - `request_router_kwargs`: PrefixCacheAffinityRouter's (imbalanced_threshold: queue-length
      difference beyond which the least loaded replica wins over the prefix; match_rate_threshold).
    - `deployment_options`: any other `serve.deployment` option of the server deployment
      (health_check_period_s, max_queued_requests, ...).
    """
    args = list(server_args)
    if model is not None:
        args = ["--model_dir", model, *args]
    drain_timeout = max(0.0, graceful_shutdown_timeout_s - DRAIN_MARGIN_S)
    router = RequestRouterConfig(
        request_router_class=_prefix_router(),
        request_router_kwargs={"imbalanced_threshold": 8, **(request_router_kwargs or {})},
    )
    scale = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": num_replicas}
    server = serve.deployment(LightLLMServer, name="LightLLMServer").options(
        ray_actor_options=ray_actor_options if ray_actor_options is not None else {"num_cpus": 1},
        max_ongoing_requests=max_ongoing_requests,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
        request_router_config=router,
        **scale,
        **deployment_options,
    )
    # the ingress only forwards: it may take many more requests than one replica
    ingress = serve.deployment(LightLLMIngress, name="LightLLMIngress").options(
        ray_actor_options=ingress_actor_options if ingress_actor_options is not None else {"num_cpus": 0.1},
        max_ongoing_requests=max_ongoing_requests * 16,
    )
    return ingress.bind(server.bind(args, drain_timeout))


def app_builder(args: dict[str, str]):
    """For `serve run lightllm_plugin.adapters.ray_serve:app_builder key=value ...`: model,
    num_replicas, server_args (one string, split as a shell would), num_cpus, num_gpus,
    min_replicas + max_replicas + target_ongoing_requests (autoscaling)."""
    import shlex

    actor = {}
    if "num_cpus" in args:
        actor["num_cpus"] = float(args["num_cpus"])
    if "num_gpus" in args:
        actor["num_gpus"] = float(args["num_gpus"])
    autoscaling = None
    if "max_replicas" in args:
        autoscaling = {"min_replicas": int(args.get("min_replicas", 1)), "max_replicas": int(args["max_replicas"]),
                       "target_ongoing_requests": float(args.get("target_ongoing_requests", 32))}
    return build_app(
        model=args.get("model"),
        num_replicas=int(args.get("num_replicas", 1)),
        autoscaling_config=autoscaling,
        server_args=shlex.split(args.get("server_args", "")),
        ray_actor_options=actor or None,
    )


def __getattr__(name: str):
    # `serve run lightllm_plugin.adapters.ray_serve:app`: one replica of the default model
    if name == "app":
        return build_app()
    raise AttributeError(name)
