"""Tiny random-weight pooling models saved as folders, and Hugging Face's answers for them.

Each kind is one of the supported families with a score head (`*ForSequenceClassification`:
one label is a reward model, more a classifier) or an embedding model (a decoder with a
sentence-transformers `modules.json` naming last-token or mean pooling). The folders carry the
default model's tokenizer, so servers can take text.

A pytest plugin (tests/conftest.py lists it): `pooling_servers` is ONE embedding server (last-token
pooling, Matryoshka dimensions 16 and 32) and ONE reward server, started side by side the first
time a test asks and shared by the session (the pooling routes' and the LangChain/LazyLLM
embeddings' tests). Tests on them leave them as they found them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

# torch and transformers load inside the functions: every test session loads this plugin

SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
# kind -> (transformers family, num_labels; 0: an embedding model, and its pooling)
KINDS = {
    "llama_reward": ("Llama", 1, None),
    "qwen2_classifier": ("Qwen2", 3, None),
    "qwen3_reward": ("Qwen3", 1, None),
    "mistral_classifier": ("Mistral", 4, None),
    "qwen3_embed_last": ("Qwen3", 0, "lasttoken"),
    "llama_embed_mean": ("Llama", 0, "mean_tokens"),
}


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The default model's tokenizer, read from its GGUF file once per test process."""
    from lightllm_plugin.models.tokenizer import load_tokenizer

    return load_tokenizer(None)


def build_pooling_folder(folder: Path, kind: str, vocab_size: int | None = None, matryoshka: list[int] | None = None) -> str:
    """`kind`'s folder at `folder`. vocab_size None: the default model's tokenizer is saved with
    it (and sets the vocabulary); else no tokenizer (token-id inputs only)."""
    import torch
    import transformers

    family, num_labels, pooling = KINDS[kind]
    folder = Path(folder)
    tokenizer = None
    if vocab_size is None:
        tokenizer = default_tokenizer()
        tokenizer.save_pretrained(folder)
        vocab_size = len(tokenizer)
    extra = {"head_dim": 24} if family == "Qwen3" else {}
    if family == "Mistral":
        extra["sliding_window"] = None
    config = getattr(transformers, f"{family}Config")(vocab_size=vocab_size, **SHAPE, **extra)
    torch.manual_seed(0)
    if num_labels:
        config.num_labels = num_labels
        model = getattr(transformers, f"{family}ForSequenceClassification")(config)
    else:
        # as sentence-transformers saves a decoder: the bare model, weights without "model."
        model = getattr(transformers, f"{family}Model")(config)
    with torch.no_grad():  # random init leaves norms at 1: perturb them so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(torch.float32).save_pretrained(folder)
    if not num_labels:
        config_path = folder / "config.json"
        saved = json.loads(config_path.read_text())
        saved["architectures"] = [f"{family}ForCausalLM"]
        if matryoshka:
            saved["matryoshka_dimensions"] = matryoshka
        config_path.write_text(json.dumps(saved, indent=2))
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        modes = {f"pooling_mode_{m}": m == pooling for m in ("cls_token", "mean_tokens", "max_tokens", "lasttoken")}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))
    return str(folder)


class HFReference:
    """Hugging Face transformers' own answer for a folder, one prompt at a time: the class
    logits of AutoModelForSequenceClassification, or AutoModel's last hidden state pooled as the
    folder says and L2-normalized."""

    def __init__(self, folder: str, kind: str):
        import torch
        import transformers

        self.kind = kind
        _, self.num_labels, self.pooling = KINDS[kind]
        auto = transformers.AutoModelForSequenceClassification if self.num_labels else transformers.AutoModel
        self.model = auto.from_pretrained(folder, dtype=torch.float32).eval()

    def __call__(self, ids: list[int]):
        import torch

        with torch.no_grad():
            batch = torch.tensor([ids])
            if self.num_labels:
                return self.model(batch).logits[0]
            hidden = self.model(batch).last_hidden_state[0]  # [T, hidden]
            pooled = hidden.mean(0) if self.pooling == "mean_tokens" else hidden[-1]
            return torch.nn.functional.normalize(pooled, dim=-1)


def rel_err(ours, ref) -> float:
    import torch

    ours = torch.as_tensor(ours, dtype=torch.float32)
    return ((ours - ref).norm() / ref.norm()).item()


SERVER_FLAGS = ["--batch_max_tokens", "64", "--max_batch_embeddings", "16"]


@pytest.fixture(scope="session")
def pooling_servers(tmp_path_factory):
    """{"embed": server, "reward": server}, each with `.folder`; SIGTERM must stop each cleanly."""
    from support.live_server import ServerProcess, check_clean_stop

    started = {}
    try:
        for name, kind, matryoshka in (("embed", "qwen3_embed_last", [16, 32]), ("reward", "llama_reward", None)):
            folder = build_pooling_folder(tmp_path_factory.mktemp(kind), kind, matryoshka=matryoshka)
            started[name] = ServerProcess("--model_dir", folder, *SERVER_FLAGS)
            started[name].folder = folder
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            if server.proc.poll() is None:
                check_clean_stop(server)
            else:
                server.reap()
