"""Vision-language latency and encoder throughput: time to first token of one image + text request,
and images/s of the vision tower at a batch, against the matmul ceiling and Hugging Face
transformers, all measured in this run.

    python benchmarks/vision.py                                           # Qwen2.5-VL-7B shape, bf16, CUDA
    python benchmarks/vision.py --shape tiny --device cpu --image-size 112 --batch 2 --repeats 1   # smoke run

Random weights (seed 0) are built on the device as transformers' Qwen2_5_VLForConditionalGeneration
and handed to the engine in memory (`InMemoryCheckpoint`, the same tensors). Images are random
RGB of --image-size pixels a side, encoded as PNG and run through the same path a request takes:
Pillow decode, the Qwen2-VL image processor, placeholder expansion (lightllm_plugin/images.py),
then EngineCore: the vision step, then the prefill of --text-tokens text tokens + the image's.

Reported, side by side:
- TTFT: preprocessing (decode + processor) and the engine's add_request -> first token (vision
  step + prefill + sampling), each request with a new image (no embedding or prefix cache hit);
  HF: the same prefilled inputs through generate(max_new_tokens=1);
- encoder: --batch images of the same size through our vision tower in one call, images/s;
  the ceiling: the bf16 8192^3 matmul rate over the tower's FLOPs per image (2 x block and merger
  parameters per patch, plus attention 4 x patches x span x width per block: the whole image in
  the full-attention blocks, a window in the others); HF's tower on the same batch.
"""

from __future__ import annotations

import argparse
import base64
import io
import shlex
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from embedding import matmul_flops, sync

TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
SHAPES = {
    "qwen2.5-vl-7b": (TEXT_7B, VISION_7B),
    "tiny": (dict(vocab_size=1024, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
             dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, window_size=56,
                  fullatt_block_indexes=[1])),
}


def png(size: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tower_flops(vision_cfg, grid: tuple[int, int, int]) -> float:
    t, h, w = grid
    patches = t * h * w
    width, merge = vision_cfg.hidden_size, vision_cfg.spatial_merge_size
    block = 4 * width * width + 3 * width * vision_cfg.intermediate_size  # qkv + proj, gate/up/down
    window = (vision_cfg.window_size // vision_cfg.patch_size) ** 2
    attention = 0
    for i in range(vision_cfg.depth):
        span = h * w if i in vision_cfg.fullatt_block_indexes else min(window, h * w)
        attention += 4 * patches * span * width
    group = width * merge * merge
    merger = (group * group + group * vision_cfg.out_hidden_size) * patches // (merge * merge)
    patch_embed = vision_cfg.in_channels * vision_cfg.temporal_patch_size * vision_cfg.patch_size**2 * width * patches
    return 2 * (block * vision_cfg.depth * patches + merger + patch_embed) + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-vl-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images in the encoder measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--placement", type=int, default=0, metavar="STREAMS",
                        help="also measure where the encoder should run, beside STREAMS decoding text requests")
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))

    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.images import ImageInputs
    from lightllm_plugin.models.loader import InMemoryCheckpoint
    from lightllm_plugin.sampling_params import SamplingParams

    text, vision = SHAPES[args.shape]
    image_token = text["vocab_size"] - 1
    hf_cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                                           video_token_id=image_token - 1, vision_start_token_id=image_token - 2,
                                           vision_end_token_id=image_token - 3)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    mm = matmul_flops(args.device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype).eval()
    prompt_room = args.text_tokens + (args.image_size // 14 + 2) ** 2 // 4 + 64
    decode_room = _PLACEMENT_TOKENS if args.placement else 8  # the placement streams decode this long
    cfg = EngineConfig(device=args.device, data_type="bfloat16" if args.device == "cuda" else "float32",
                       max_req_total_len=prompt_room + decode_room, max_req_input_len=prompt_room,
                       batch_max_tokens=prompt_room + 8,
                       max_total_token_num=4 * (prompt_room + 8) + args.placement * (prompt_room + decode_room))
    config = hf_cfg.to_dict()
    config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    core = EngineCore(cfg, progress=False, with_tokenizer=False,
                      checkpoint=InMemoryCheckpoint(config, hf.state_dict().items()))
    processor = transformers.Qwen2VLImageProcessorPil(max_pixels=max(args.image_size**2 * 2, 56 * 56))
    inputs = ImageInputs(processor, image_token, hf_cfg.vision_config.spatial_merge_size, limit=1,
                         max_pixels=args.image_size**2 * 4, allowed_domains=None, max_bytes=1 << 30)
    print(f"built {args.shape} on {args.device} in {time.perf_counter() - t0:.1f} s; {core.total_slots} KV slots")

    gen = torch.Generator().manual_seed(1)
    text_ids = torch.randint(10, image_token - 10, (args.text_tokens,), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=1)

    def one_request(seed: int):
        """(preprocessing s, engine TTFT s, prompt ids, images) of a request with a new image."""
        source = "data:image/png;base64," + base64.b64encode(png(args.image_size, seed)).decode()
        start = time.perf_counter()  # from the request's data URL: base64, PNG decode, processor
        ids, images = inputs.prepare([image_token] + text_ids, [source], "inputs")
        prep = time.perf_counter() - start
        sync(args.device)
        start = time.perf_counter()
        req = core.new_request_id()
        core.add_request(req, ids, params, images)
        while core.has_unfinished():
            core.step()
        sync(args.device)
        return prep, time.perf_counter() - start, ids, images

    one_request(1000)  # warm-up
    runs = [one_request(1001 + i) for i in range(args.repeats)]
    prep_s = statistics.median(r[0] for r in runs)
    ttft_s = statistics.median(r[1] for r in runs)
    ids, images = runs[-1][2], runs[-1][3]
    grid = tuple(images[0].grid)
    core.flush_cache()
    assert core.free_slots.num_free == core.total_slots, "KV slots leaked"
    print(f"request: 1 image {args.image_size}x{args.image_size} -> grid {grid}, {images[0].num_tokens} image tokens "
          f"+ {args.text_tokens} text tokens")
    print(f"TTFT ours: preprocessing {prep_s * 1e3:.1f} ms + engine {ttft_s * 1e3:.1f} ms "
          f"= {(prep_s + ttft_s) * 1e3:.1f} ms (median of {args.repeats})")

    # the encoder at a batch: the same grid for every image (same size)
    pixel_list = [torch.from_numpy(np.frombuffer(images[0].pixels, dtype=np.float32).reshape(-1, images[0].patch_dim).copy())
                  ] * args.batch
    grids = [grid] * args.batch

    def ours_encoder() -> float:
        sync(args.device)
        start = time.perf_counter()
        core.runner.encode_images(pixel_list, grids)
        sync(args.device)
        return time.perf_counter() - start

    ours_encoder()
    enc_s = min(ours_encoder() for _ in range(args.repeats))
    per_image = tower_flops(hf_cfg.vision_config, grid)
    ceiling = mm / per_image
    print(f"encoder ceiling: bf16 8192^3 matmul {mm / 1e12:.0f} TFLOP/s / {per_image / 1e12:.2f} TFLOP per image "
          f"-> {ceiling:.1f} images/s")
    ours_ips = args.batch / enc_s
    print(f"encoder ours: batch {args.batch} in {enc_s * 1e3:.1f} ms = {ours_ips:.1f} images/s "
          f"= {ours_ips / ceiling:.1%} of the ceiling")

    if args.placement:
        placement(core, inputs, image_token, text_ids, images[0], grid, hf_cfg, dtype, args)
    if args.skip_hf:
        return
    pixels = torch.cat(pixel_list).to(args.device, dtype)
    grid_t = torch.tensor(grids, device=args.device)

    @torch.inference_mode()
    def hf_encoder() -> float:
        sync(args.device)
        start = time.perf_counter()
        hf.model.visual(pixels, grid_thw=grid_t)
        sync(args.device)
        return time.perf_counter() - start

    hf_encoder()
    hf_enc_s = min(hf_encoder() for _ in range(args.repeats))
    hf_ips = args.batch / hf_enc_s
    print(f"encoder HF:   batch {args.batch} in {hf_enc_s * 1e3:.1f} ms = {hf_ips:.1f} images/s "
          f"= {hf_ips / ceiling:.1%} of the ceiling (transformers {transformers.__version__})")
    print(f"encoder ours / HF: {ours_ips / hf_ips:.2f}x")

    input_ids = torch.tensor([ids], device=args.device)

    @torch.inference_mode()
    def hf_ttft() -> float:
        sync(args.device)
        start = time.perf_counter()
        hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_list[0].to(
            args.device, dtype), image_grid_thw=grid_t[:1], mm_token_type_ids=(input_ids == image_token).int(),
            max_new_tokens=1, do_sample=False)
        sync(args.device)
        return time.perf_counter() - start

    hf_ttft()
    hf_s = statistics.median(hf_ttft() for _ in range(args.repeats))
    print(f"TTFT HF: {hf_s * 1e3:.1f} ms (generate, max_new_tokens=1, preprocessed inputs); "
          f"ours engine / HF: {hf_s / ttft_s:.2f}x faster")


_PLACEMENT_TOKENS = 1024


def _encoder_process(vision: dict, text_hidden: int, pixels: torch.Tensor, grid, repeats: int, device: str,
                     to_parent, from_parent) -> None:
    """A separate visual process on the same GPU (as LightLLM runs it): our tower with random
    weights; encodes the image `repeats` times back to back, then hands the last embeddings over
    through shared host memory. Puts (per-encode seconds, handover seconds, embeddings)."""
    from lightllm_plugin.models.vision_qwen2 import VisionConfig, VisionTower

    torch.manual_seed(0)
    cfg = VisionConfig.from_hf_dict(vision, "qwen2_5_vl", text_hidden)
    with torch.device(device):
        tower = VisionTower(cfg, torch.bfloat16 if device == "cuda" else torch.float32)
        for p in tower.parameters():
            torch.nn.init.normal_(p, std=0.02)
    pixels = pixels.to(device)
    tower(pixels, [grid])  # warm-up before the parent starts timing
    sync(device)
    to_parent.put("ready")
    assert from_parent.get() == "go"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = tower(pixels, [grid])
        sync(device)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    shared = out.cpu().share_memory_()
    to_parent.put((times, time.perf_counter() - start, shared))
    from_parent.get()  # alive until the parent has mapped the shared memory


def placement(core, inputs, image_token: int, text_ids: list[int], image, grid, hf_cfg, dtype, args) -> None:
    """In the router's process (ours) or a separate visual process? `args.placement` text
    streams decode; then (a) a request with a new image joins them (its vision step runs inside
    one engine step), (b) a second process runs the same tower on the same GPU while the streams
    decode. Printed: the streams' step times in each case, and what the handover costs."""
    import torch.multiprocessing as mp

    from lightllm_plugin.sampling_params import SamplingParams

    def timed_step() -> float:
        sync(args.device)
        start = time.perf_counter()
        core.step()
        sync(args.device)
        return time.perf_counter() - start

    long = SamplingParams(temperature=0, max_new_tokens=_PLACEMENT_TOKENS - 8, ignore_eos=True)
    streams = [core.new_request_id() for _ in range(args.placement)]
    for i, req in enumerate(streams):
        core.add_request(req, [10 + i] + text_ids, long)
    for _ in range(8):  # every stream past its prefill, graphs warm
        timed_step()
    alone = statistics.median(timed_step() for _ in range(30))

    # (a) in the router's process: the image request's vision step + prefill run in one step
    source = "data:image/png;base64," + base64.b64encode(png(args.image_size, 5000)).decode()
    ids, images = inputs.prepare([image_token] + text_ids, [source], "inputs")
    req = core.new_request_id()
    core.add_request(req, ids, SamplingParams(temperature=0, max_new_tokens=1), images)
    steps = [timed_step() for _ in range(4)]
    # the same image after other text: its embeddings come from the image cache, so this step
    # is the prefill alone, which the router runs wherever the encoder is
    encoded = core.images_encoded
    ids, images = inputs.prepare([image_token - 20, image_token] + text_ids, [source], "inputs")
    core.add_request(core.new_request_id(), ids, SamplingParams(temperature=0, max_new_tokens=1), images)
    prefill_steps = [timed_step() for _ in range(4)]
    assert core.images_encoded == encoded, "the image cache missed"
    stall = max(steps) - max(prefill_steps)

    # (b) a separate process encodes on the same GPU while the streams decode
    pixels = torch.from_numpy(np.frombuffer(image.pixels, dtype=np.float32).reshape(-1, image.patch_dim).copy())
    ctx = mp.get_context("spawn")
    queue, to_child = ctx.Queue(), ctx.Queue()
    repeats = 20
    child = ctx.Process(target=_encoder_process, args=(hf_cfg.vision_config.to_dict(), hf_cfg.text_config.hidden_size,
                                                       pixels, tuple(grid), repeats, args.device, queue, to_child))
    child.start()
    assert queue.get(timeout=600) == "ready"
    to_child.put("go")
    during = []
    deadline = time.monotonic() + 120
    while queue.empty() and time.monotonic() < deadline and core.has_unfinished():
        during.append(timed_step())
    times, handover_out, shared = queue.get(timeout=60)
    to_child.put("done")
    child.join(60)
    sync(args.device)
    start = time.perf_counter()
    shared.to(args.device, non_blocking=False)
    sync(args.device)
    handover = handover_out + time.perf_counter() - start
    for req in streams:
        core.abort(req)
    while core.has_unfinished():
        core.step()
    core.flush_cache()
    fastest = min(times)

    contended = statistics.median(during) if during else float("nan")
    encode = statistics.median(times)
    print(f"placement, {args.placement} decoding streams: a decode step alone {alone * 1e3:.2f} ms")
    print(f"  in the router's process: the step with one image's vision step + prefill took "
          f"{max(steps) * 1e3:.1f} ms, with its prefill alone (cached embeddings) {max(prefill_steps) * 1e3:.1f} ms: "
          f"the encoder makes the streams wait {stall * 1e3:.1f} ms once per image")
    print(f"  separate process on the same GPU: while it encodes (median {encode * 1e3:.1f} ms per image, "
          f"fastest {fastest * 1e3:.1f}), a decode step takes {contended * 1e3:.2f} ms "
          f"({contended / alone:.2f}x alone, {len(during)} steps over {sum(times) * 1e3:.0f} ms of encoding): "
          f"the streams lose {encode * (1 - alone / contended) * 1e3:.1f} ms of decode per image; "
          f"handing one image's {shared.shape[0]} x {shared.shape[1]} embeddings over through shared host memory: "
          f"{handover * 1e3:.1f} ms more on the image request's TTFT")


if __name__ == "__main__":
    main()
