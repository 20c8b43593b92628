"""Our GGUF header reader and torch dequantization against the `gguf` package's own
GGUFReader and numpy dequantize, on a small file written by gguf's GGUFWriter with every kind
of metadata value and the tensor types the default model holds. (The default model's own file
is checked end to end by test_gguf.py: its weights and logits against transformers', which
reads the file with gguf's reader.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from lightllm_plugin.models.gguf import _as_tensor
from lightllm_plugin.models.gguf_file import GGUFFile


def _same_as_reference(path: str) -> None:
    reference = gguf.GGUFReader(path)
    ours = GGUFFile(path)
    keys = [k for k in reference.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        expected, got = reference.fields[key].contents(), ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert got == expected, key
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.tensor_type == theirs.tensor_type and mine.shape.tolist() == theirs.shape.tolist(), mine.name
        assert mine.data.dtype == theirs.data.dtype and np.array_equal(mine.data, theirs.data), mine.name


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "mixed.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.rope.freq_base", 500000.0)
    writer.add_float64("test.f64", 0.1)
    writer.add_bool("test.flag", True)
    writer.add_int64("test.i64", -(2**40))
    writer.add_string("test.name", "naïve ☃")
    writer.add_array("test.ints", [3, 1, 4, 1, 5])
    writer.add_array("test.words", ["a", "bb", "ccc"])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 64), dtype=np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    for kind, block_bytes, scale_bytes in ((gguf.GGMLQuantizationType.Q4_1, 20, 4),
                                           (gguf.GGMLQuantizationType.Q8_0, 34, 2)):
        # random blocks (gguf cannot quantize to Q4_1) whose leading f16 scales are finite
        blocks = rng.integers(0, 256, (4 * 8, block_bytes), dtype=np.uint8)
        blocks[:, :scale_bytes] = rng.standard_normal((4 * 8, scale_bytes // 2)).astype(np.float16).view(np.uint8)
        raw = blocks.reshape(4, 8 * block_bytes)
        writer.add_tensor(kind.name, raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_value_and_tensor_type_equals_gguf_readers(written):
    _same_as_reference(written)


def test_dequantized_tensors_equal_gguf_numpy_code_bit_for_bit(written):
    for t in GGUFFile(written).tensors:
        expected = np.asarray(t.data, dtype=np.float32) if t.tensor_type.name in ("F32", "F16") else \
            dequantize(t.data, t.tensor_type)
        got = _as_tensor(t, tuple(expected.shape), torch.float32)
        assert torch.equal(got, torch.from_numpy(np.array(expected))), t.name


def test_a_file_that_is_not_gguf_or_is_cut_short_is_refused(written, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(bad))
    data = open(written, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="runs past the end"):
        GGUFFile(str(cut))
