"""HF Kimi K2.5 vision tower (MoonViT: transformers `kimi_k25`, vision `model_type`
"kimi_k25_vision") to `VisionEncoder`.

The tower is the one block with options: LayerNorm (eps 1e-5) before attention and MLP, a plain
`fc1` / GELU (tanh) / `fc2` MLP, biases everywhere, a final LayerNorm over every token, no CLS,
and two position schemes at once:
  * a learned `(side, side, D)` table, resized per image to its grid by plain bicubic
    interpolation (half-pixel centres, not antialiased: `Kimi_K25VisionPositionEmbeddings`'s
    gather is `F.interpolate(mode="bicubic")`); its side times `patch_size` is our `image_size`,
    where the table is used as it is. The temporal sinusoid it adds is zero for an image.
  * 2D RoPE over integer `(h, w)` patch positions, frequencies `theta ** -(k / (d/4))` as
    `rope='eva'`. MoonViT orders the rotated pairs axis-interleaved, `[x f0, y f0, x f1, y f1,
    ...]` (complex pairs of adjacent channels in the released weights; transformers permutes
    them into its half layout on load, `PermuteForRope`); our table is axis-blocked
    `[x f0 .. f(d/4-1), y f0 ..]` (`rope_xy=True`, `rope_layout='interleaved'`). The converter
    permutes each head's query and key channels (rows of `wqkv` / `q_proj` / `k_proj` and
    their biases) into our pair order: the same scores, since a dot product does not depend on
    the order of its channels, and values untouched.

Tokens are row-major `(B, h*w, D)` as in the reference; layer `i` is `hidden_states[i+1]` (but
for the last block: transformers ties `hidden_states[-1]` to `last_hidden_state`, which is our
last layer with `norm=True`, the final LayerNorm applied).

Two checkpoint layouts, chosen by `model_type` (`layout`):
  * `released`: a whole `kimi_k25` checkpoint (`moonshotai/Kimi-K2.5`, and what transformers'
    `save_pretrained` writes back): the tower under `vision_tower.` with MoonViT's names
    (`encoder.blocks.{i}.wqkv` / `wo` / `norm0` / `norm1` / `mlp.fc0` / `mlp.fc1`,
    `encoder.final_layernorm`, `patch_embed.proj`, `patch_embed.pos_emb.weight`), its config's
    `vision_config` in MoonViT's field names (`vt_hidden_size`, `init_pos_emb_height`, ...).
    transformers' save writes the patch convolution back as `encoder.patch_embed.proj` (its
    load reads either); both names are read, never both at once.
  * `transformers`: a `Kimi_K25VisionModel` saved alone (`layers.{i}.attn.q_proj`, ...).

The connector (`mm_projector`: LayerNorm per patch, 2x2 merge, Linear, GELU, Linear) is a
`qwen_merger` projector: `projectors.load_kimi_k25_merger`, or `load_merger` here from a whole
checkpoint. Videos (temporal pooling of frames) are not expressed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..config import VisionConfig
from ..weights import WeightsError
from .hf_common import KeyTable, Transform, native_image_processor, square

if TYPE_CHECKING:
    from ..projectors import Projector

FAMILY = "HF Kimi K2.5 vision"
Layout = Literal["released", "transformers"]
TOWER_PREFIXES = ("vision_tower.",)  # a whole checkpoint (loading reads only these keys)
PROJECTOR_PREFIXES = ("mm_projector.", "model.mm_projector.")  # released / transformers' save
IGNORED_PREFIXES = ("rotary_emb.",)  # non-persistent buffers an older save may hold
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# MoonViT's config names (the released `vision_config`) -> transformers' `Kimi_K25VisionConfig`.
RELEASED_FIELDS = {
    "vt_hidden_size": "hidden_size",
    "vt_intermediate_size": "intermediate_size",
    "vt_num_hidden_layers": "num_hidden_layers",
    "vt_num_attention_heads": "num_attention_heads",
    "init_pos_emb_height": "pos_emb_height",
    "init_pos_emb_width": "pos_emb_width",
    "init_pos_emb_time": "pos_emb_time",
    "patch_size": "patch_size",
    "merge_kernel_size": "merge_kernel_size",
}
# Released fields whose value is the only one the remote code (and transformers) implements.
RELEASED_FIXED = {"pos_emb_type": "divided_fixed", "merge_type": "sd2_tpool", "mm_projector_type": "patchmerger",
                  "projector_hidden_act": "gelu"}


# ---------------------------------------------------------------------------- config
def vision_config_of(hf_config_or_dict: Any) -> Any:
    """A `Kimi_K25VisionConfig` for a vision config or a whole `kimi_k25` config, either in
    transformers' field names or the released MoonViT ones.

    Raises:
        ValueError: Another `model_type`, or a released variant transformers does not implement.
    """
    from transformers import Kimi_K25VisionConfig

    c = hf_config_or_dict if isinstance(hf_config_or_dict, Mapping) else hf_config_or_dict.to_dict()
    if c.get("model_type") == "kimi_k25":
        c = c.get("vision_config") or {}
        c = c if isinstance(c, Mapping) else c.to_dict()
    elif c.get("model_type") != "kimi_k25_vision":
        raise ValueError(f"{FAMILY}: expected a config with model_type 'kimi_k25' or 'kimi_k25_vision', got {c.get('model_type')!r}")
    if "vt_hidden_size" not in c:  # transformers' names
        return Kimi_K25VisionConfig.from_dict({k: v for k, v in c.items() if k != "model_type"})
    for name, value in RELEASED_FIXED.items():
        if c.get(name, value) != value:
            raise ValueError(f"{FAMILY}: {name}={c[name]!r} is not supported (only {value!r})")
    fields = {ours: c[theirs] for theirs, ours in RELEASED_FIELDS.items() if theirs in c}
    # The remote code's rotary base and activation are fixed: theta 10000, GELU (tanh).
    return Kimi_K25VisionConfig(**fields, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})


def projector_eps(hf_config_or_dict: Any) -> float:
    """The connector's LayerNorm epsilon of a whole `kimi_k25` config (either naming)."""
    c = hf_config_or_dict if isinstance(hf_config_or_dict, Mapping) else hf_config_or_dict.to_dict()
    vision = c.get("vision_config") or {}
    return float(c.get("projection_layer_norm_eps", vision.get("projector_ln_eps", 1e-5)))


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for a Kimi K2.5 vision tower.

    Args:
        hf_config_or_dict: A `Kimi_K25VisionConfig`, a whole `Kimi_K25Config`, or either's dict
            (transformers' or the released field names).

    Returns:
        The `VisionConfig` (`image_size`: the table's side in patches times the patch).

    Raises:
        ValueError: A variant the encoder does not express (activation, rope type, a table that
            is not square: the reference resamples it as `pos_emb_height` squared).
    """
    c = vision_config_of(hf_config_or_dict)
    if c.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{FAMILY}: hidden_act={c.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"{FAMILY}: rope_type={rope['rope_type']!r} is not supported (only 'axial')")
    if c.pos_emb_height != c.pos_emb_width:
        raise ValueError(
            f"{FAMILY}: a {c.pos_emb_height} x {c.pos_emb_width} position table; the reference resamples it as a square"
        )
    patch = square(c.patch_size, "patch_size", FAMILY)
    return VisionConfig(
        image_size=patch * c.pos_emb_height,
        patch_size=patch,
        width=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        act=ACTIVATIONS[c.hidden_act],
        qkv_bias=True,
        patch_bias=True,
        class_token=False,
        pos_embed="learned",
        pos_resample_mode="bicubic",
        pos_resample_antialias=False,
        rope="eva",
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_layout="interleaved",
        rope_xy=True,
        norm_eps=1e-5,  # the reference's LayerNorms are built with eps=1e-5
        final_norm=True,
        pool="none",
        patch_remainder="error",  # the processor pads to whole merge units; the tower takes patches
    )


# ---------------------------------------------------------------------------- weights
def _pair_order(head_dim: int) -> torch.Tensor:
    """Our rotary pair `j = a * d/4 + k` (axis `a`, 0 = x, frequency `k`) is MoonViT's pair
    `2k + a`: the source pair of each of ours."""
    n = head_dim // 4
    return torch.tensor([2 * k + a for a in (0, 1) for k in range(n)])


def _rotated(t: torch.Tensor, num_heads: int, layout: Layout) -> torch.Tensor:
    """A query or key projection's rows (weight `(D, D_in)` or bias `(D,)`) in our pair order.

    `released`: each head's channels are MoonViT's complex pairs `(2p, 2p+1)`; `transformers`:
    its half layout (channel `p` and `p + d/2` form pair `p`).
    """
    rows = t.shape[0]
    d = rows // num_heads
    x = t.reshape(num_heads, d, -1)
    if layout == "transformers":  # (heads, 2, d/2, ...) -> pairs (heads, d/2, 2, ...)
        x = x.reshape(num_heads, 2, d // 2, -1).transpose(1, 2)
    else:
        x = x.reshape(num_heads, d // 2, 2, -1)
    x = x[:, _pair_order(d)]  # (heads, d/2, 2, ...) in our order
    return x.reshape(t.shape).contiguous()


def key_table(num_heads: int, layout: Layout) -> KeyTable:
    """The layout's names, with the query/key permutation for `num_heads` heads."""
    turn = lambda t: _rotated(t, num_heads, layout)  # noqa: E731
    table = lambda t: t.reshape(1, -1, t.shape[-1])  # (side, side, D) -> (1, side*side, D)  # noqa: E731
    if layout == "transformers":
        return KeyTable(
            renames={
                "patch_embed.proj": "patch_embed.proj",
                "layers.{i}.norm1": "blocks.{i}.norm1",
                "layers.{i}.norm2": "blocks.{i}.norm2",
                "layers.{i}.attn.proj": "blocks.{i}.attn.proj",
                "layers.{i}.mlp.fc1": "blocks.{i}.mlp.fc1",
                "layers.{i}.mlp.fc2": "blocks.{i}.mlp.fc2",
                "final_layernorm": "norm",
            },
            transforms=(
                Transform(("pos_embed",), ("patch_embed.pos_emb.position_embeddings",), table),
                *(
                    Transform((f"blocks.{{i}}.attn.qkv.{p}",), tuple(f"layers.{{i}}.attn.{n}_proj.{p}" for n in "qkv"),
                              lambda q, k, v: torch.cat([turn(q), turn(k), v]))
                    for p in ("weight", "bias")
                ),
            ),
            ignored=("patch_embed.pos_emb.time_position_embeddings",),
        )

    def qkv(fused: torch.Tensor) -> torch.Tensor:
        q, k, v = fused.chunk(3, dim=0)  # MoonViT's `wqkv` rows: q, k, v
        return torch.cat([turn(q), turn(k), v])

    return KeyTable(
        renames={
            "encoder.blocks.{i}.norm0": "blocks.{i}.norm1",
            "encoder.blocks.{i}.norm1": "blocks.{i}.norm2",
            "encoder.blocks.{i}.wo": "blocks.{i}.attn.proj",
            "encoder.blocks.{i}.mlp.fc0": "blocks.{i}.mlp.fc1",
            "encoder.blocks.{i}.mlp.fc1": "blocks.{i}.mlp.fc2",
            "encoder.final_layernorm": "norm",
            "patch_embed.proj": "patch_embed.proj",
        },
        transforms=(
            Transform(("pos_embed",), ("patch_embed.pos_emb.weight",), table),
            *(Transform((f"blocks.{{i}}.attn.qkv.{p}",), (f"encoder.blocks.{{i}}.wqkv.{p}",), qkv) for p in ("weight", "bias")),
        ),
    )


def tower_keys(state_dict: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The tower's keys, bare: a released checkpoint's keys under `vision_tower.` (nothing else
    is read), its patch convolution under the released name (transformers' save writes
    `encoder.patch_embed.proj`); a transformers tower's keys as they are, minus buffers."""
    if layout == "transformers":
        return {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    prefix = TOWER_PREFIXES[0]
    tower = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    saved = {k for k in tower if k.startswith("encoder.patch_embed.")}
    if saved and any(k.startswith("patch_embed.proj.") for k in tower):
        raise WeightsError(f"{FAMILY} checkpoint holds the patch convolution twice: {sorted(saved)} and patch_embed.proj.*")
    return {k.removeprefix("encoder.") if k in saved else k: v for k, v in tower.items()}


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int, layout: Layout = "released"
) -> dict[str, torch.Tensor]:
    """Our state dict from a Kimi K2.5 vision tower checkpoint.

    Args:
        state_dict: A whole `kimi_k25` checkpoint's keys (`released`; only `vision_tower.*` is
            read) or a `Kimi_K25VisionModel`'s (`transformers`).
        num_heads: The tower's heads (each head's query/key channels are permuted).
        layout: `released` or `transformers` (module docstring).

    Returns:
        Tensors under `VisionEncoder` names.

    Raises:
        WeightsError: A key is missing, or a key is neither used nor on the ignored list.
    """
    return key_table(num_heads, layout).convert(tower_keys(state_dict, layout), FAMILY)


def image_processor(config: VisionConfig, data: dict[str, Any] | None = None) -> Any:
    """What our encoder takes from an image, for a Kimi K2.5 tower.

    With the checkpoint's `preprocessor_config.json` (`data`): its `Kimi_K25ImageProcessor`
    (`resize_mode='kimi_k25'`: the native size unless over its patch budget or side limit, then
    padded bottom / right with black to whole merge units; each image its own size; mean = std
    = 0.5). Without one: a resize to the native size (the table's grid; bicubic, torchvision),
    mean = std = 0.5.

    Raises:
        ValueError: Another processor class, or a `patch_size` that is not the tower's.
    """
    return native_image_processor(config, data, "kimi_k25", "Kimi_K25ImageProcessor")


# ---------------------------------------------------------------------------- connector
def merger_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The connector's keys of a whole checkpoint, bare (`mm_projector.*`; transformers' save
    writes its LayerNorm as `model.mm_projector.pre_norm`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in PROJECTOR_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            name = key[len(prefix) :]
            if name in out:
                raise WeightsError(f"{FAMILY}: the connector's {name} is under both {', '.join(PROJECTOR_PREFIXES)}")
            out[name] = value
    return out


def load_merger(source: str | os.PathLike, *, revision: str | None = None) -> Projector:
    """The connector of a whole `kimi_k25` directory or hub repo as a `qwen_merger` projector:
    `merger(encoder(pixels, norm=True).patches(-1), grid)` is what the reference's language
    model receives for an image (`get_image_features`). Only the shards holding its keys are
    read.

    Raises:
        FileNotFoundError: No config or weights (offline: what is missing from the cache).
        WeightsError: Connector keys that do not fit.
    """
    from ..loading import read_config_file, read_weights
    from ..projectors import load_kimi_k25_merger
    from ..specs.files import SourceFiles

    files = SourceFiles(os.fspath(source), revision)
    config = read_config_file(files.get("config.json"))
    vision = vision_config_of(config)
    tensors, _, _ = read_weights(files, None, lambda key: key.startswith(PROJECTOR_PREFIXES))
    return load_kimi_k25_merger(merger_keys(tensors), scale_factor=square(vision.merge_kernel_size, "merge_kernel_size", FAMILY),
                                norm_eps=projector_eps(config))
