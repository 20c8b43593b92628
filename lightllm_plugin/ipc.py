"""ZMQ socket helpers shared by the engine side (tensor-parallel step plans) and the server's
processes: how a socket is opened, and how a frame is decoded or dropped."""

from __future__ import annotations

import contextlib
import logging

import zmq


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
_log = logging.getLogger("lightllm_plugin.ipc")


def drain(sock: zmq.Socket, decoder, where: str):
    """Every message queued on `sock` now, decoded (undecodable frames dropped), without waiting."""
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        msg = decode_or_drop(decoder, frame, where)
        if msg is not None:
            yield msg


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
