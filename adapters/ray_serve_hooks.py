"""The built-in plugin "ray_serve": declares the Ray Serve adapter (adapters/ray_serve.py) and
adds the `lightllm-plugin ray-serve` command, through `register_adapters` and `register_cli`.

Deliberately light: Ray is imported only when the command runs.

    lightllm-plugin ray-serve --replicas 2 --port 8000 [any flag of `serve`]

runs (or joins, with --address or $RAY_ADDRESS) a Ray cluster, serves N replicas of the server
behind Ray Serve's HTTP proxy on --host/--port, and on SIGINT/SIGTERM deletes the application,
letting each replica drain, before it exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from lightllm_plugin.plugins import hookimpl

APP_NAME = "lightllm"
# the `serve` flags that place the Serve proxy, not a replica's server (which listens on loopback)
PROXY_FLAGS = ("--host", "--port")


def build_ray_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Ray Serve")
    group.add_argument("--replicas", type=int, default=1, help="server replicas (default 1)")
    group.add_argument("--min_replicas", type=int, default=None, help="autoscaling: fewest replicas")
    group.add_argument("--max_replicas", type=int, default=None,
                       help="autoscaling on ongoing requests up to this many replicas (replaces --replicas)")
    group.add_argument("--target_ongoing_requests", type=float, default=32.0,
                       help="autoscaling: ongoing requests per replica Serve aims at (default 32)")
    group.add_argument("--num_cpus_per_replica", type=float, default=1.0)
    group.add_argument("--num_gpus_per_replica", type=float, default=None,
                       help="default: --tp when the cluster has GPUs, else 0")
    group.add_argument("--max_ongoing_requests", type=int, default=64,
                       help="requests Serve sends one replica at a time (default 64)")
    group.add_argument("--graceful_shutdown_timeout_s", type=float, default=20.0,
                       help="how long a stopping replica may drain (its server's --drain_timeout is set below it)")
    group.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    return parser


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(the Ray flags, `serve`'s flags for the proxy (--host/--port), `serve`'s flags for the replicas)."""
    ray_args, rest = build_ray_parser().parse_known_args(argv)
    proxy, replica = [], []
    i = 0
    while i < len(rest):
        flag = rest[i].split("=", 1)[0]
        target = proxy if flag in PROXY_FLAGS else replica
        takes_next = flag in PROXY_FLAGS and "=" not in rest[i]
        target.extend(rest[i:i + 1 + takes_next])
        i += 1 + takes_next
    return ray_args, proxy, replica


def ray_serve_main(argv: list[str]) -> int:
    from lightllm_plugin.cli import build_serve_parser, config_from_args

    prog = "lightllm-plugin ray-serve"
    parser = argparse.ArgumentParser(prog=prog, parents=[build_ray_parser(), build_serve_parser()],
                                     conflict_handler="resolve",
                                     description="Serve N replicas of the server on Ray Serve, prefix-aware routed.")
    args = parser.parse_args(argv)  # every flag checked here, before a cluster starts
    config = config_from_args(args, parser)
    ray_args, _, replica_args = split_argv(argv)
    try:
        import ray
        from ray import serve

        from lightllm_plugin.adapters.ray_serve import build_app
    except ImportError as exc:
        print(f"lightllm-plugin: error: {exc}", file=sys.stderr)
        return 1
    ray.init(address=ray_args.address)
    gpus = ray_args.num_gpus_per_replica
    if gpus is None:
        gpus = config.tp if ray.cluster_resources().get("GPU", 0) > 0 else 0
    autoscaling = None
    if ray_args.max_replicas is not None:
        autoscaling = {"min_replicas": ray_args.min_replicas or 1, "max_replicas": ray_args.max_replicas,
                       "target_ongoing_requests": ray_args.target_ongoing_requests}
    app = build_app(
        num_replicas=ray_args.replicas, autoscaling_config=autoscaling, server_args=replica_args,
        ray_actor_options={"num_cpus": ray_args.num_cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=ray_args.max_ongoing_requests,
        graceful_shutdown_timeout_s=ray_args.graceful_shutdown_timeout_s,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        print(f"lightllm-plugin: Ray Serve is serving on http://{config.host}:{config.port} "
              f"({'autoscaled' if autoscaling else ray_args.replicas} replica(s))", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)  # each replica drains within graceful_shutdown_timeout_s
        serve.shutdown()
        ray.shutdown()
    return 0


@hookimpl(tryfirst=True)
def register_adapters(register) -> None:
    register(
        "ray_serve",
        "lightllm_plugin.adapters.ray_serve",
        extra="ray",
        summary="N replicas on Ray Serve with prefix-aware routing (build_app, `lightllm-plugin ray-serve`)",
    )


@hookimpl(tryfirst=True)
def register_cli(cli) -> None:
    cli.add_command("ray-serve", ray_serve_main, "serve N replicas on Ray Serve, prefix-aware routed")
