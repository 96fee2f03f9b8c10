"""Fuzzing the inputs users hand us: bytes as image files, arrays and tensors of any shape and
dtype as images, any Unicode as captions.

Allowed outcomes: a correct result, or the documented errors (`ImageLoadError`, `ValueError`,
`TypeError`) with a message. Never another exception, never NaN pixels, never a caption
without its end token.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vlm_encoder.processing import ImageProcessor
from vlm_encoder.processing.config import ProcessorConfig
from vlm_encoder.processing.loading import ImageLoadError, load_image
from vlm_encoder.text.tokenizer import ClipTokenizer

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
PROCESSORS = {
    "exact": ImageProcessor(ProcessorConfig(resize_mode="exact", size=(16, 16))),
    "shortest_edge_crop": ImageProcessor(
        ProcessorConfig(resize_mode="shortest_edge", size=(16, 16), crop_size=(16, 16))
    ),
}
DOCUMENTED = (ImageLoadError, ValueError, TypeError)


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 10, len(mode) if mode != "P" else 1), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, mode if mode != "P" else "L")
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# Valid files of each common format, as seeds: mutations of them reach deep into the decoders.
SEEDS = [
    encoded("PNG"),
    encoded("PNG", "RGBA"),
    encoded("PNG", "P"),
    encoded("JPEG"),
    encoded("GIF", "P"),
    encoded("BMP"),
    encoded("TIFF"),
    encoded("WEBP"),
    encoded("PPM"),
    encoded("ICO"),
]


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=64))
    return bytes(data)


def check_message(err: BaseException) -> None:
    assert isinstance(err, DOCUMENTED), f"undocumented error {type(err).__name__}: {err}"
    assert str(err).strip(), f"{type(err).__name__} without a message"


def check_pixels(pixels: torch.Tensor, batch: int = 1) -> None:
    assert pixels.dtype == torch.float32
    assert pixels.shape == (batch, 3, 16, 16), pixels.shape
    assert torch.isfinite(pixels).all()


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), mutated_files()))
def test_bytes_as_image_files(data):
    try:
        image = load_image(data)
    except Exception as err:  # noqa: BLE001 - checked to be documented
        check_message(err)
        assert isinstance(err, ImageLoadError), f"load_image raised {type(err).__name__}: {err}"
        return
    for processor in PROCESSORS.values():
        try:
            check_pixels(processor(image))
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - checked to be documented
            check_message(err)


def test_seed_files_all_decode():
    """The seeds are valid, so a mutation test that only ever sees errors would be caught."""
    for seed in SEEDS:
        check_pixels(PROCESSORS["exact"](load_image(seed)))


NUMPY_DTYPES = [
    np.uint8,
    np.uint16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint32,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)


@st.composite
def numpy_images(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    if dtype.kind == "f" and draw(st.booleans()):
        # Mostly in-range floats, so the success path is exercised too.
        elements = st.floats(0, 1, width=dtype.itemsize * 8)
    else:
        elements = None
    return draw(hnp.arrays(dtype, draw(SHAPES), elements=elements))


def _run_processor(image) -> None:
    for processor in PROCESSORS.values():
        try:
            check_pixels(processor(image))
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - checked to be documented
            check_message(err)


@FUZZ
@given(array=numpy_images())
def test_numpy_arrays_of_any_shape_and_dtype(array):
    _run_processor(array)


TORCH_DTYPES = [
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.bool,
    torch.complex64,
]
if hasattr(torch, "uint16"):
    TORCH_DTYPES.append(torch.uint16)


@st.composite
def torch_images(draw) -> torch.Tensor:
    shape = draw(SHAPES)
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    kind = draw(st.sampled_from(["unit", "wide", "special"]))
    values = torch.rand(
        shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))), dtype=torch.float64
    )
    if kind == "wide":
        values = values * 70000 - 1000
    elif kind == "special" and values.numel():
        flat = values.view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0])
        )
    if dtype.is_floating_point or dtype.is_complex:
        return values.to(dtype)
    return values.nan_to_num(0).clamp(-(2**15), 2**15).to(dtype)


@FUZZ
@given(tensor=torch_images())
def test_torch_tensors_of_any_shape_and_dtype(tensor):
    _run_processor(tensor)


@FUZZ
@given(batch=st.lists(st.one_of(numpy_images(), torch_images()), min_size=0, max_size=3))
def test_lists_of_mixed_inputs(batch):
    for processor in PROCESSORS.values():
        try:
            check_pixels(processor(batch), batch=len(batch))
        except AssertionError:
            raise
        except Exception as err:  # noqa: BLE001 - checked to be documented
            check_message(err)


@pytest.mark.parametrize("bad", [None, 3, 2.5, b"\x89PNG", ["a", None], {"image": 1}, object()])
def test_other_python_objects_are_type_or_value_errors(bad):
    for processor in PROCESSORS.values():
        with pytest.raises(DOCUMENTED) as err:
            processor(bad)
        check_message(err.value)


# ------------------------------------------------------------------------------ captions
TOKENIZERS = {length: ClipTokenizer(context_length=length) for length in (2, 3, 8, 77)}
SPECIALS = st.sampled_from(
    ["<start_of_text>", "<end_of_text>", "<|endoftext|>", "\x00", "\ufeff", "\u202e", "\U0001f600"]
)
CAPTIONS = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.lists(st.one_of(SPECIALS, st.text(max_size=8)), max_size=12).map("".join),
)


def check_tokens(tokenizer: ClipTokenizer, captions: list[str]) -> None:
    out = tokenizer(captions)
    L = tokenizer.context_length
    assert out.input_ids.shape == out.attention_mask.shape == (len(captions), L)
    assert out.input_ids.dtype == torch.long
    for ids, mask in zip(out.input_ids.tolist(), out.attention_mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (L - n), mask
        assert 2 <= n <= L
        assert ids[0] == tokenizer.sot_token_id
        assert ids[n - 1] == tokenizer.eot_token_id, ids
        assert ids[: n - 1].count(tokenizer.eot_token_id) == 0
        assert tokenizer.sot_token_id not in ids[1:n]
        assert all(i == tokenizer.pad_token_id for i in ids[n:])
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


@FUZZ
@given(captions=st.lists(CAPTIONS, min_size=1, max_size=4), length=st.sampled_from(sorted(TOKENIZERS)))
def test_any_unicode_caption_gives_fixed_length_ids_with_the_end_token(captions, length):
    check_tokens(TOKENIZERS[length], captions)


def test_surrogates_and_long_captions():
    tokenizer = TOKENIZERS[8]
    check_tokens(tokenizer, ["a" * 100_000, "word " * 5000, "\ud800 lone surrogate", "", " \t\n"])


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", None], [b"bytes"]])
def test_non_text_captions_are_type_errors(bad):
    with pytest.raises(TypeError, match="str"):
        TOKENIZERS[8](bad)
