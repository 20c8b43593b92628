"""What every pipeline child process does the same way: tie its life to the parent's,
name itself, and open its ZMQ sockets."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading

import zmq
from tqdm import tqdm

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def bootstrap(role: str, parent_pid: int) -> None:
    """Call first thing in a child: it must never outlive the launcher."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # SIGKILL rather than SIGTERM: a child busy loading a model would not act on a handler
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # the kernel's 15-byte process name, so `ps`, psutil and tests can tell the children apart
        libc.prctl(_PR_SET_NAME, f"lightllm:{role}"[:15].encode(), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the loops' parent_alive() checks still stop us
    # the parent may have died before prctl took effect
    if not parent_alive(parent_pid):
        os._exit(1)
    # Ctrl+C reaches the whole process group; the launcher alone decides the shutdown order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the launcher stops us with SIGTERM. Exit at once: the kernel closes our sockets and the
    # launcher removes the run dir, while an interpreter shutdown that tears down torch and
    # transformers takes seconds of CPU the other processes are also shutting down on.
    signal.signal(signal.SIGTERM, _exit_now)
    # tqdm guards its bars with a multiprocessing lock, a named semaphore that leaks (and
    # makes the resource tracker complain) whenever a child is killed; a thread lock will do
    tqdm.set_lock(threading.RLock())
    # our own info lines, but not those of every library (torch logs cache stats at exit)
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s:     [{role}] %(message)s", stream=sys.stderr)
    logging.getLogger("lightllm_plugin").setLevel(logging.INFO)


def _exit_now(signum, frame) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


@contextlib.contextmanager
def zmq_context():
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def open_socket(ctx: zmq.Context, kind: int, address: str, *, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    # unbounded queues: a full queue would block a sender, and two processes that both
    # send to each other (router <-> detokenizer) could then deadlock
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    if bind:
        sock.bind(address)
    else:
        sock.connect(address)
    return sock


# the largest message a pipeline socket accepts; a legitimate one is a few prompts' token ids
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_log = logging.getLogger("lightllm_plugin.server.sockets")


def decode_or_drop(decoder, frame: bytes, where: str, max_bytes: int = MAX_MESSAGE_BYTES):
    """The message a frame holds, or None after a log line when it is too large, not msgpack,
    or not one of the structs this socket takes. Nothing is ever unpickled: a pickle payload
    is just undecodable bytes here, and one bad frame must not take the process down."""
    if len(frame) > max_bytes:
        _log.warning("dropped a %d-byte message on the %s socket (limit %d)", len(frame), where, max_bytes)
        return None
    try:
        return decoder.decode(frame)
    except Exception as exc:  # msgspec.DecodeError / ValidationError, or anything odd in a hostile frame
        _log.warning("dropped an unexpected message on the %s socket (%d bytes): %s", where, len(frame), exc)
        return None


def load_tokenizer_for(config):
    """The model's tokenizer, without loading the model."""
    from lightllm_plugin.models.tokenizer import load_tokenizer, resolve_model_path

    _, path = resolve_model_path(config.model_dir)
    return load_tokenizer(path, config.tokenizer_mode, config.trust_remote_code)
