"""benchmarks/serving.py's prompts must be exactly as long in tokens as it says they are."""

import pytest

# benchmarks/ is on sys.path through pyproject's pytest `pythonpath`: serving.py imports its
# sibling scripts as top-level modules, as it does when run as `python benchmarks/serving.py`
import serving


def test_model_folder_tokenizer_gives_one_token_per_word(tmp_path):
    from lightllm_plugin.models.tokenizer import load_tokenizer

    cfg = serving.write_model_folder(str(tmp_path), "tiny", "cpu", serving.torch.float32)
    tok = load_tokenizer(str(tmp_path))
    words = cfg.vocab_size - len(serving.SPECIAL_TOKENS)
    reqs = serving.make_workload(20, (1, 300), (1, 2), words, seed=3)
    for req in reqs:
        # the server tokenizes native `inputs` with special tokens on: none may be added
        assert tok.encode(serving.prompt_text(req.prompt_ids), add_special_tokens=True) == req.prompt_ids
    assert tok.eos_token_id == cfg.eos_token_id == cfg.vocab_size - 1


def test_poisson_arrivals_have_the_asked_rate():
    times = serving.arrival_times(4000, 8.0, seed=0)
    assert times == sorted(times) and times[0] == 0.0
    assert len(times) / times[-1] == pytest.approx(8.0, rel=0.05)
    assert serving.arrival_times(3, float("inf"), seed=0) == [0.0, 0.0, 0.0]
