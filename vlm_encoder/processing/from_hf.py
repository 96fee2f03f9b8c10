"""HF `preprocessor_config.json` -> `ProcessorConfig`, for the image processors of the encoders
this package loads: `CLIPImageProcessor`, `SiglipImageProcessor`, `Siglip2ImageProcessor`
(NaFlex: `resize_mode='naflex'`), `ViTImageProcessor`, `BitImageProcessor` (DINOv2) and
`Qwen2VLImageProcessor` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5: `resize_mode='smart_resize'`)
`Gemma4ImageProcessor` (`resize_mode='gemma4'`) and `Kimi_K25ImageProcessor` (`resize_mode='kimi_k25'`),
in their default (torchvision), `...Fast` and `...Pil` forms.

Strict: an unknown processor class, an unsupported size form or a field that would change the
output in a way this package does not reproduce (e.g. `do_pad`) is an error.
"""

from __future__ import annotations

from typing import Any

from .config import HALF_MEAN, HALF_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ProcessorConfig, ResizeBackend

# transformers 5 class attributes (what a dict without the field means).
_CLIP_LIKE = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "resample": 3,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "default_to_square": False,
}
HF_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP_LIKE,
    "BitImageProcessor": _CLIP_LIKE,
    "SiglipImageProcessor": {
        "size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "resample": 3,
        "image_mean": HALF_MEAN,
        "image_std": HALF_STD,
        "default_to_square": False,
    },
    # NaFlex: no fixed size; each image resized under a patch budget
    # (`get_image_size_for_max_num_patches`), bilinear.
    "Siglip2ImageProcessor": {
        "patch_size": 16,
        "max_num_patches": 256,
        "do_center_crop": False,
        "resample": 2,
        "image_mean": HALF_MEAN,
        "image_std": HALF_STD,
        "default_to_square": False,
    },
    # smart_resize: no fixed size; each image's area clamped to [shortest_edge, longest_edge]
    # pixels (older configs: top-level min_pixels / max_pixels, which win), sides multiples of
    # patch_size * merge_size; bicubic. Qwen3-VL checkpoints use this class with `size`.
    "Qwen2VLImageProcessor": {
        "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
        "patch_size": 14,
        "merge_size": 2,
        "do_center_crop": False,
        "resample": 3,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "default_to_square": False,
    },
    # Gemma 4: no fixed size; each image resized under a budget of max_soft_tokens pooled tokens
    # (`get_aspect_ratio_preserving_size`), bicubic, [0, 1] pixels (the model normalises itself).
    "Gemma4ImageProcessor": {
        "patch_size": 16,
        "max_soft_tokens": 280,
        "pooling_kernel_size": 3,
        "do_center_crop": False,
        "do_normalize": False,
        "resample": 3,
        "image_mean": (0.0, 0.0, 0.0),
        "image_std": (1.0, 1.0, 1.0),
        "default_to_square": True,
    },
    # Kimi K2.5: native size unless over max_patches or size['max_height'] patches a side, then
    # padded bottom / right to whole merge units (`navit_resize`); bicubic, mean/std 0.5.
    "Kimi_K25ImageProcessor": {
        "size": {"max_height": 512, "max_width": 512},
        "max_patches": 16384,
        "patch_size": 14,
        "merge_size": 2,
        "do_center_crop": False,
        "resample": 3,
        "image_mean": HALF_MEAN,
        "image_std": HALF_STD,
        "default_to_square": True,
    },
    "ViTImageProcessor": {
        "size": {"height": 224, "width": 224},
        "do_center_crop": False,
        "resample": 2,
        "image_mean": HALF_MEAN,
        "image_std": HALF_STD,
        "default_to_square": True,
    },
}
_COMMON_DEFAULTS = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}

# PIL resampling codes, as HF stores `resample`.
PIL_CODES: dict[int, str] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

_USED_KEYS = {
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "default_to_square", "use_square_size", "do_pad",
    "patch_size", "max_num_patches", "min_pixels", "max_pixels", "merge_size", "temporal_patch_size",
    "max_soft_tokens", "pooling_kernel_size", "max_patches",
}
# transformers' `_SUPPORTED_SOFT_TOKENS`: the budgets `Gemma4ImageProcessor` accepts.
GEMMA4_SOFT_TOKENS = (70, 140, 280, 560, 1120)
# Metadata or options that do not change the pixels of an RGB image.
_IGNORED_KEYS = {
    "image_processor_type", "feature_extractor_type", "processor_class", "auto_map", "do_convert_rgb",
    "image_seq_length", "input_data_format", "data_format", "return_tensors", "device", "disable_grouping",
}


def hf_class_name(data: dict[str, Any]) -> tuple[str, str | None]:
    """The base processor class (`CLIPImageProcessor`, ...) and the backend its name implies.

    Raises:
        ValueError: No class field, or a class this package does not reproduce.
    """
    raw = data.get("image_processor_type") or data.get("feature_extractor_type")
    if not raw:
        raise ValueError(
            "preprocessor config has no image_processor_type (or feature_extractor_type); "
            f"add one of {sorted(HF_CLASS_DEFAULTS)} to say which processor it describes"
        )
    name, backend = str(raw), None
    if name.endswith("FeatureExtractor"):
        name = name[: -len("FeatureExtractor")] + "ImageProcessor"
    if name.endswith("Fast"):
        name, backend = name[:-4], "torchvision"
    elif name.endswith("Pil"):
        name, backend = name[:-3], "pil"
    if name not in HF_CLASS_DEFAULTS:
        raise ValueError(f"image processor {raw!r} is not supported; supported: {sorted(HF_CLASS_DEFAULTS)}")
    return name, backend


def _size(value: Any, default_to_square: bool) -> tuple[str, tuple[int, int]]:
    """HF `size` as `(resize_mode, (h, w))`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ("exact", (value, value)) if default_to_square else ("shortest_edge", (value, value))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return "exact", (value[0], value[1])
    if isinstance(value, dict):
        keys = {k for k, v in value.items() if v is not None}
        if keys == {"shortest_edge"}:
            edge = value["shortest_edge"]
            return "shortest_edge", (edge, edge)
        if keys == {"height", "width"}:
            return "exact", (value["height"], value["width"])
    raise ValueError(
        f"HF size {value!r} is not supported; allowed: {{'shortest_edge': S}}, {{'height': H, 'width': W}}, an int"
    )


def _crop_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, dict) and {k for k, v in value.items() if v is not None} == {"height", "width"}:
        return (value["height"], value["width"])
    raise ValueError(f"HF crop_size {value!r} is not supported; allowed: {{'height': H, 'width': W}} or an int")


def _smart_resize_fields(merged: dict[str, Any]) -> dict[str, int]:
    """`Qwen2VLImageProcessor`'s area bounds and side multiple: `size`'s `shortest_edge` /
    `longest_edge` (pixels, not sides), replaced by top-level `min_pixels` / `max_pixels`
    when given (as its `__init__` does), and `factor = patch_size * merge_size`."""
    size = merged["size"]
    size = dict(size) if isinstance(size, dict) else {}
    if merged.get("min_pixels") is not None:
        size["shortest_edge"] = merged["min_pixels"]
    if merged.get("max_pixels") is not None:
        size["longest_edge"] = merged["max_pixels"]
    if not size.get("shortest_edge") or not size.get("longest_edge"):
        raise ValueError(
            f"Qwen2VLImageProcessor size {merged['size']!r} needs 'shortest_edge' and 'longest_edge' "
            "(min / max pixels), or top-level min_pixels / max_pixels"
        )
    return {"min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"]),
            "factor": int(merged["patch_size"]) * int(merged["merge_size"])}


def _gemma4_fields(merged: dict[str, Any]) -> dict[str, int]:
    """`Gemma4ImageProcessor`'s patch budget: `max_soft_tokens` pooled tokens of
    `pooling_kernel_size**2` patches each (one of transformers' supported budgets)."""
    tokens, kernel = merged["max_soft_tokens"], int(merged["pooling_kernel_size"])
    if tokens not in GEMMA4_SOFT_TOKENS:
        raise ValueError(f"Gemma4ImageProcessor max_soft_tokens={tokens!r} is not one of {GEMMA4_SOFT_TOKENS} "
                         "(transformers refuses it too)")
    return {"patch_size": int(merged["patch_size"]), "max_patches": int(tokens) * kernel**2,
            "pooling_kernel_size": kernel}


def _kimi_k25_fields(merged: dict[str, Any]) -> dict[str, int]:
    """`Kimi_K25ImageProcessor`'s `navit_resize` bounds: `max_patches`, the side limit in patches
    (`size['max_height']`, equal to `max_width` as transformers requires), the pad multiple
    `patch_size * merge_size`."""
    size = merged["size"]
    if not (isinstance(size, dict) and size.get("max_height") and size.get("max_height") == size.get("max_width")):
        raise ValueError(f"Kimi_K25ImageProcessor size {size!r} needs 'max_height' and 'max_width' (patches), equal")
    return {"patch_size": int(merged["patch_size"]), "max_patches": int(merged["max_patches"]),
            "factor": int(merged["patch_size"]) * int(merged["merge_size"]), "max_side": int(size["max_height"])}


def config_from_hf(data: dict[str, Any], backend: ResizeBackend | None = None) -> ProcessorConfig:
    """A `ProcessorConfig` reproducing the HF image processor described by `data`.

    Args:
        data: The `preprocessor_config.json` dict.
        backend: `torchvision` or `pil`. Default: from the class name (`...Pil` -> `pil`,
            `...Fast` -> `torchvision`), else `torchvision`, which is what transformers 5's
            `CLIPImageProcessor(...)` and `AutoImageProcessor` use. Pass `pil` to reproduce
            transformers 4's (slow) processors, which most checkpoints were evaluated with.

    Raises:
        ValueError: Unknown class or keys, unsupported size forms or options.
    """
    if not isinstance(data, dict):
        raise TypeError(f"from_hf_config takes the preprocessor_config.json dict, got {type(data).__name__}")
    name, named_backend = hf_class_name(data)
    unknown = {k for k in data if not k.startswith("_")} - _USED_KEYS - _IGNORED_KEYS
    if unknown:
        raise ValueError(
            f"preprocessor config has fields this package does not reproduce: {sorted(unknown)}; "
            f"understood: {sorted(_USED_KEYS | _IGNORED_KEYS)}"
        )
    merged = {**_COMMON_DEFAULTS, **HF_CLASS_DEFAULTS[name], **{k: v for k, v in data.items() if v is not None}}
    if merged.get("do_pad"):
        raise ValueError("preprocessor config has do_pad=True (batch padding), which is not supported")
    if merged.get("use_square_size"):  # CLIP's Kosmos-2 compatibility flag
        edge = merged["size"]["shortest_edge"] if isinstance(merged["size"], dict) else merged["size"]
        merged["size"] = {"height": edge, "width": edge}

    sizing: dict[str, Any] = {}  # `size` (the fixed modes) or the NaFlex patch budget
    if name == "Siglip2ImageProcessor":
        resize_mode = "naflex" if merged["do_resize"] else "none"
        if merged["do_resize"]:
            sizing = {"patch_size": int(merged["patch_size"]), "max_patches": int(merged["max_num_patches"])}
    elif name == "Qwen2VLImageProcessor":
        resize_mode = "smart_resize" if merged["do_resize"] else "none"
        if merged["do_resize"]:
            sizing = _smart_resize_fields(merged)
    elif name == "Gemma4ImageProcessor":
        resize_mode = "gemma4" if merged["do_resize"] else "none"
        if merged["do_resize"]:
            sizing = _gemma4_fields(merged)
    elif name == "Kimi_K25ImageProcessor":
        resize_mode = "kimi_k25" if merged["do_resize"] else "none"
        if merged["do_resize"]:
            sizing = _kimi_k25_fields(merged)
    elif {"patch_size", "max_num_patches", "min_pixels", "max_pixels", "merge_size", "temporal_patch_size",
          "max_soft_tokens", "pooling_kernel_size", "max_patches"} & set(data):
        raise ValueError("patch_size / max_num_patches / min_pixels / max_pixels / merge_size / max_soft_tokens / "
                         "pooling_kernel_size belong to a NaFlex (Siglip2ImageProcessor), Qwen "
                         "(Qwen2VLImageProcessor), Gemma 4 (Gemma4ImageProcessor) or Kimi K2.5 "
                         f"(Kimi_K25ImageProcessor) processor, not {name}")
    else:
        resize_mode, size = _size(merged["size"], bool(merged["default_to_square"]))
        sizing = {"size": size}
        if not merged["do_resize"]:
            resize_mode = "none"
    resample = merged["resample"]
    if resample not in PIL_CODES or isinstance(resample, bool):
        raise ValueError(f"HF resample={resample!r} is not supported; allowed PIL codes: {PIL_CODES}")
    crop_size = None
    if merged["do_center_crop"]:
        if "crop_size" not in merged:
            raise ValueError(f"do_center_crop=True needs crop_size for {name}")
        crop_size = _crop_size(merged["crop_size"])
    normalize = bool(merged["do_normalize"])
    return ProcessorConfig(
        resize_mode=resize_mode,
        crop_size=crop_size,
        crop_rounding="floor",
        interpolation=PIL_CODES[resample],
        backend=backend or named_backend or "torchvision",
        rescale_factor=merged["rescale_factor"] if merged["do_rescale"] else 1.0,
        mean=merged["image_mean"] if normalize else None,
        std=merged["image_std"] if normalize else None,
        background=(255, 255, 255),
        pad_fill=(0, 0, 0),
        **sizing,
    )
