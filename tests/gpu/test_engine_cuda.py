"""The engine on CUDA: same code path as CPU with the Triton kernels in place of the references,
checked against HF transformers on the GPU, plus KV-pool profiling and load-time memory."""

import gc

import pytest
import torch
import transformers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from lightllm_plugin.config import EngineConfig  # noqa: E402
from lightllm_plugin.engine.memory import kv_bytes_per_token  # noqa: E402
from lightllm_plugin.engine.runner import ModelRunner  # noqa: E402
from lightllm_plugin.models.loader import load_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    )
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _runner(model_dir, **kw):
    cfg = EngineConfig(model_dir=model_dir, device="cuda", max_req_total_len=1024, max_req_input_len=512, **kw)
    return cfg, ModelRunner(cfg, "hf", model_dir, progress=False)


def test_greedy_matches_hf_on_gpu(model_dir):
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.sampling_params import SamplingParams

    cfg = EngineConfig(model_dir=model_dir, device="cuda", data_type="float32", max_total_token_num=8192,
                       max_req_total_len=1024, max_req_input_len=512)
    engine = EngineCore(cfg, progress=False, with_tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (1, 17, 100, 333)]
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(i, p, params)
    got: dict[int, list[int]] = {}
    for _ in range(100):
        if not engine.has_unfinished():
            break
        for ev in engine.step():
            got.setdefault(ev.req_id, []).append(ev.token_id)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long, device="cuda"))[0, len(p):]
        assert got[i] == ref.tolist()
    assert engine.used_slots == 0


def test_profiled_pool_fits_free_memory(model_dir):
    gc.collect()
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    # a request cap high enough that free memory, not the cap, sizes the pool
    cfg, runner = _runner(model_dir, mem_fraction=0.5, running_max_req_size=8192)
    slots = runner.size_kv_pool()
    mc = runner.model_cfg
    pool_bytes = slots * kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, runner.dtype)
    assert runner.kv_pool.numel() * runner.kv_pool.element_size() >= pool_bytes
    assert slots < cfg.running_max_req_size * cfg.max_req_total_len
    # half of what was free after the weights and the warm-up, so a little under half of free_before
    assert 0.4 * free_before <= pool_bytes <= 0.5 * free_before
    print(f"profiled slots={slots} pool={pool_bytes / 2**30:.2f} GiB free_before={free_before / 2**30:.2f} GiB")


def test_loading_keeps_one_copy_of_the_weights(model_dir):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, mc = load_model("hf", model_dir, torch.bfloat16, torch.device("cuda"), 1024, progress=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() - base
    # transient extra: at most one layer's q/k/v or gate/up pieces waiting to be fused, plus rope tables
    layer = (mc.hidden_size * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim + 2 * mc.hidden_size * mc.intermediate_size) * 2
    assert peak <= weights + 2 * layer + 16 * 2**20, (peak, weights)


def _drive(engine, arrivals, max_steps=400):
    """Step the engine, adding each (step, req_id, prompt, max_new_tokens) at its step."""
    from lightllm_plugin.sampling_params import SamplingParams

    got: dict[int, list[int]] = {}
    pending = sorted(arrivals)
    for step in range(max_steps):
        while pending and pending[0][0] <= step:
            _, rid, prompt, n = pending.pop(0)
            engine.add_request(rid, prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
        if not pending and not engine.has_unfinished():
            return got
        for ev in engine.step():
            got.setdefault(ev.req_id, []).append(ev.token_id)
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_equals_eager_decode(model_dir, dtype):
    """Odd running batches (3, 5, 33) padded up to captured sizes, requests of different lengths
    joining mid-decode and finishing at different steps: the same tokens as eager steps."""
    from lightllm_plugin.engine.core import EngineCore

    g = torch.Generator().manual_seed(7)
    arrivals = []
    for i in range(33):
        # 3 at once, 2 more at step 4, the other 28 at step 9; lengths 1..300, outputs 5..40
        step = 0 if i < 3 else 4 if i < 5 else 9
        prompt = torch.randint(0, 4096, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g).tolist()
        arrivals.append((step, i, prompt, int(torch.randint(5, 41, (1,), generator=g))))
    results = {}
    for eager in (True, False):
        cfg = EngineConfig(model_dir=model_dir, device="cuda", data_type=dtype, max_total_token_num=16384,
                           max_req_total_len=1024, max_req_input_len=512, running_max_req_size=64,
                           enforce_eager=eager)
        engine = EngineCore(cfg, progress=False, with_tokenizer=False)
        assert (engine.runner.decode_graphs is None) == eager
        results[eager] = _drive(engine, arrivals)
        assert engine.used_slots == 0
        if not eager:
            assert engine.runner.decode_graphs.replays > 20
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    assert results[False] == results[True]
