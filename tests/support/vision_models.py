"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and LLaVA folders (weights, the image processor, a tokenizer
with the models' special tokens and a chat template that places images), tiny PNG images, and
Hugging Face's own answers for them."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

# the special tokens of Qwen2-VL's tokenizer; the ids follow the byte-level vocabulary
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template, in short: an image part renders as the vision tokens around one pad
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA's: an image part is the <image> token
LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
LLAVA_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
CORPUS = ["What is in this picture? Describe the image.", "A red square, a blue circle and two cats.",
          "user assistant system Compare the two images in detail."] * 4
KINDS = ("qwen2_vl", "qwen2_5_vl")
IMAGE_GAIN = 30.0
ALL_KINDS = KINDS + ("llava",)


def build_tokenizer(special_tokens=SPECIAL_TOKENS, template=CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=special_tokens[3:])
    fast.chat_template = template
    return fast


def build_llava_folder(folder: Path) -> str:
    """A saved LLaVA (CLIP tower of 28x28-pixel images in 14-pixel patches: 4 image tokens, a
    projector, a Llama language model) with its CLIP image processor and tokenizer."""
    import torch
    import transformers

    folder = Path(folder)
    tokenizer = build_tokenizer(LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=112,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                eos_token_id=eos, bos_token_id=None)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                                      image_seq_length=4)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.model.multi_modal_projector.linear_2.weight.mul_(IMAGE_GAIN)
    model.to(torch.float32).save_pretrained(folder)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
                                       ).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return str(folder)


def build_folder(folder: Path, kind: str) -> str:
    return build_llava_folder(folder) if kind == "llava" else build_vl_folder(folder, kind)


def build_vl_folder(folder: Path, kind: str) -> str:
    """A saved `kind` model (float32, random weights, norms perturbed) with its image processor
    and tokenizer; images of 56x56 pixels give 4 image tokens."""
    import torch
    import transformers

    folder = Path(folder)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                eos_token_id=ids["<|im_end|>"], bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model_class = transformers.Qwen2VLForConditionalGeneration
    else:
        # windows of 2x2 merge groups (56 pixels) with full attention in the last block
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                      window_size=56, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
        # image embeddings as large as the text's would leave the answer nearly blind to the
        # image: scaled up, another image gives other tokens
        model.model.visual.merger.mlp[2].weight.mul_(IMAGE_GAIN)
    model.to(torch.float32).save_pretrained(folder)
    processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    processor.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|im_end|>"]}))
    return str(folder)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A random RGB image encoded as PNG."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class HFVisionReference:
    """transformers' own model for a folder: its vision tower's output and greedy `generate`,
    with inputs built by the folder's image processor and tokenizer (each image's one pad token
    repeated to its token count, as Qwen2-VL's processor does)."""

    def __init__(self, folder: str):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # 16 tokens whatever they are (ignore_eos)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.llava = self.model.config.model_type == "llava"
        processor = transformers.CLIPImageProcessorPil if self.llava else transformers.Qwen2VLImageProcessorPil
        self.processor = processor.from_pretrained(folder)
        self.image_token = self.model.config.image_token_id

    def pixels(self, images: list[bytes]):
        from PIL import Image

        decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        out = self.processor(images=decoded, return_tensors="pt")
        if self.llava:  # one fixed-size image each: (1, rows, columns) of patches
            p = self.model.config.vision_config.patch_size
            pixels = out["pixel_values"]
            grid = self.torch.tensor([[1, pixels.shape[2] // p, pixels.shape[3] // p]] * len(images))
            return pixels, grid
        return out["pixel_values"], out["image_grid_thw"]

    def vision(self, images: list[bytes]):
        pixels, grid = self.pixels(images)
        with self.torch.no_grad():
            if self.llava:
                features = self.model.model.get_image_features(
                    pixel_values=pixels, vision_feature_layer=self.model.config.vision_feature_layer,
                    vision_feature_select_strategy=self.model.config.vision_feature_select_strategy).pooler_output
                return self.torch.cat(list(features))
            return self.model.model.visual(pixels, grid_thw=grid).pooler_output

    def generate(self, messages: list[dict], images: list[bytes], max_new_tokens: int = 16) -> list[int]:
        torch = self.torch
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        kwargs = {}
        if images:
            pixels, grid = self.pixels(images)
            merge = 1 if self.llava else self.model.config.vision_config.spatial_merge_size
            counts = iter((grid.prod(-1) // merge**2).tolist())
            ids = [t for i in ids for t in ([i] * next(counts) if i == self.image_token else [i])]
            kwargs = dict(pixel_values=pixels) if self.llava else dict(pixel_values=pixels, image_grid_thw=grid)
        input_ids = torch.tensor([ids])
        if not self.llava:
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token).int()
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        return out[0, len(ids):].tolist()
