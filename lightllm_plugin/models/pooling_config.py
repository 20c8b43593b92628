"""Which task a checkpoint serves, and how its vectors are pooled (pure python, no torch).

- `*ForSequenceClassification`: a `score` head over the last token's hidden state, as Hugging
  Face pools it; `num_labels` 1 is a reward model, more a classifier.
- An embedding model: the last hidden state pooled at the last token (Qwen3-Embedding), or the
  mean over the prompt where the folder's sentence-transformers files (`modules.json` and its
  Pooling module's `config.json`) say so; the vector is L2-normalized (vLLM's default).
- `--task embed` on any folder pools its last hidden state the same way.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lightllm_plugin.pooling_params import POOLING_TASKS, TASKS, PoolerInfo

CLASSIFIER_SUFFIX = "ForSequenceClassification"
_ST_POOLING = "sentence_transformers.models.Pooling"


def num_labels_of(hf_config: dict[str, Any]) -> int:
    id2label = hf_config.get("id2label")
    if id2label:
        return len(id2label)
    return int(hf_config.get("num_labels", 2))


def labels_of(hf_config: dict[str, Any]) -> list[str]:
    id2label = hf_config.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels_of(hf_config))]


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sentence_transformers_pooling(model_dir: str | None) -> str | None:
    """"last" or "mean" when the folder is a sentence-transformers model, else None."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.exists(modules_path):
        return None
    pooling = "last"
    for module in _read_json(modules_path):
        if module.get("type") != _ST_POOLING:
            continue
        config_path = os.path.join(model_dir, module.get("path", ""), "config.json")
        if os.path.exists(config_path):
            cfg = _read_json(config_path)
            if cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif cfg.get("pooling_mode_lasttoken"):
                pooling = "last"
            else:
                modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
                raise ValueError(f"unsupported sentence-transformers pooling {modes}: mean or last token only")
    return pooling


def resolve_task(hf_config: dict[str, Any], model_dir: str | None, task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    archs = hf_config.get("architectures") or []
    classifier = any(a.endswith(CLASSIFIER_SUFFIX) for a in archs)
    if task == "auto":
        if classifier:
            return "reward" if num_labels_of(hf_config) == 1 else "classify"
        return "embed" if sentence_transformers_pooling(model_dir) else "generate"
    if task == "generate" and classifier:
        raise ValueError(f"{archs[0]} has a score head and no language-model head: serve it with --task "
                         f"{'reward' if num_labels_of(hf_config) == 1 else 'classify'}")
    if task in ("reward", "classify") and not classifier:
        raise ValueError(f"--task {task} needs a *{CLASSIFIER_SUFFIX} checkpoint (a score head); "
                         f"{archs or hf_config.get('model_type')} has none (--task embed pools its hidden states)")
    if task == "reward" and num_labels_of(hf_config) != 1:
        raise ValueError(f"--task reward needs num_labels 1, the checkpoint has {num_labels_of(hf_config)} "
                         f"(--task classify)")
    if task == "score" and classifier and num_labels_of(hf_config) != 1:
        raise ValueError(f"--task score with a score head needs num_labels 1, the checkpoint has "
                         f"{num_labels_of(hf_config)}")
    return task


def resolve_pooler(hf_config: dict[str, Any], model_dir: str | None, task: str) -> PoolerInfo | None:
    """None for a generation model; otherwise what the engine returns for each prompt."""
    task = resolve_task(hf_config, model_dir, task)
    if task not in POOLING_TASKS:
        return None
    archs = hf_config.get("architectures") or []
    classifier = any(a.endswith(CLASSIFIER_SUFFIX) for a in archs)
    if task == "embed" or (task == "score" and not classifier):
        matryoshka = hf_config.get("matryoshka_dimensions")
        return PoolerInfo(
            task=task, head="embed", pooling=sentence_transformers_pooling(model_dir) or "last", normalize=True,
            dimensions=int(hf_config["hidden_size"]),
            matryoshka_dimensions=sorted(int(d) for d in matryoshka) if matryoshka else None,
            is_matryoshka=bool(hf_config.get("is_matryoshka", False)),
        )
    return PoolerInfo(task=task, head="classify", pooling="last", normalize=False,
                      dimensions=num_labels_of(hf_config), labels=labels_of(hf_config))
