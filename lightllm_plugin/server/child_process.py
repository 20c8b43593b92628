"""What every pipeline child process does the same way: tie its life to the parent's,
name itself, log in one format."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

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


def load_image_inputs_for(config):
    """The model's image preprocessing (it takes no images when it is a text-only model)."""
    from lightllm_plugin.images import ImageInputs
    from lightllm_plugin.models.tokenizer import resolve_model_path

    _, path = resolve_model_path(config.model_dir)
    return ImageInputs.for_model(path, config.limit_mm_per_prompt, config.max_image_pixels, config.allowed_media_domains,
                       config.max_body_size)


def load_tokenizer_for(config):
    """The model's tokenizer, without loading the model."""
    from lightllm_plugin.models.tokenizer import load_tokenizer, resolve_model_path

    _, path = resolve_model_path(config.model_dir)
    return load_tokenizer(path, config.tokenizer_mode, config.trust_remote_code)
