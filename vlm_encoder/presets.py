"""Named architectures: a table over `VisionConfig`, and `create_encoder(name, **overrides)`.

Names follow timm: `vit_{size}_patch{p}_{image}` for the paper's ViT-Ti/S/B/L/H, plus the
family variants (`_clip_`, `_siglip_`, `_dinov2`) and the hybrid `vit_base_r50_s16_224`.
"""

from __future__ import annotations

from typing import Any

from .config import VisionConfig
from .encoder import VisionEncoder

# (width, depth, heads) of the paper's sizes (Ti and S from DeiT, H from ViT).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
PATCH_SIZES = (8, 14, 16, 32)
IMAGE_SIZES = (224, 256, 336, 384, 448, 518)


def _build_table() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for size, (width, depth, heads) in SIZES.items():
        base = dict(width=width, depth=depth, num_heads=heads)
        for patch in PATCH_SIZES:
            for image in IMAGE_SIZES:
                if image % patch:
                    continue
                table[f"vit_{size}_patch{patch}_{image}"] = dict(base, patch_size=patch, image_size=image)
                # OpenAI / open_clip CLIP towers: LN before the blocks, eps 1e-5, no conv bias.
                table[f"vit_{size}_patch{patch}_clip_{image}"] = dict(
                    base, patch_size=patch, image_size=image, norm_pre=True, patch_bias=False, norm_eps=1e-5,
                    act="quick_gelu", embed_dim={"base": 512, "large": 768, "huge": 1024}.get(size, width),
                )
                # SigLIP: no CLS token, attention-pool head, tanh GELU.
                table[f"vit_{size}_patch{patch}_siglip_{image}"] = dict(
                    base, patch_size=patch, image_size=image, class_token=False, pool="map", act="gelu_tanh",
                )
    for size in ("small", "base", "large"):
        width, depth, heads = SIZES[size]
        dino = dict(width=width, depth=depth, num_heads=heads, patch_size=14, image_size=518, layer_scale_init=1e-5)
        table[f"vit_{size}_patch14_dinov2"] = dino
        table[f"vit_{size}_patch14_reg4_dinov2"] = dict(dino, num_register_tokens=4)
    table["vit_giant_patch14_dinov2"] = dict(
        width=1536, depth=40, num_heads=24, patch_size=14, image_size=518, layer_scale_init=1e-5,
        mlp_type="swiglu", mlp_dim=4096,
    )
    table["vit_so400m_patch14_siglip_384"] = dict(
        width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14, image_size=384,
        class_token=False, pool="map", act="gelu_tanh", patch_remainder="drop",
    )
    # The paper's hybrid: R50 stages (3, 4, 9) at stride 16, then 1x1 patches.
    table["vit_base_r50_s16_224"] = dict(width=768, depth=12, num_heads=12, patch_size=1, image_size=224, stem_layers=(3, 4, 9))
    table["vit_base_r50_s16_384"] = dict(table["vit_base_r50_s16_224"], image_size=384)
    return table


PRESETS: dict[str, dict[str, Any]] = _build_table()


def list_presets(pattern: str = "") -> list[str]:
    """Preset names containing `pattern`, sorted."""
    return sorted(name for name in PRESETS if pattern in name)


def preset_config(name: str, **overrides: Any) -> VisionConfig:
    """The `VisionConfig` of a preset, with `overrides` applied.

    Raises:
        ValueError: Unknown name (with the closest names) or invalid overrides.
    """
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (see vlm_encoder.list_presets())")
    return VisionConfig.from_dict({**PRESETS[name], **overrides})


def create_encoder(name: str, **overrides: Any) -> VisionEncoder:
    """A randomly initialised `VisionEncoder` of a named architecture.

    Args:
        name: A preset name, e.g. `vit_base_patch16_224` (see `list_presets()`).
        **overrides: `VisionConfig` fields to change, e.g. `depth=2`, `image_size=(224, 320)`.

    Returns:
        The encoder.
    """
    return VisionEncoder(preset_config(name, **overrides))
