"""Gemma 4 vision tower to `VisionEncoder`, from transformers (`Gemma4VisionModel`, vision
`model_type` "gemma4_vision", or the tower of a whole "gemma4" checkpoint) and from timm
(`gemma4_vit.py`'s `Gemma4VitEncoder` / `Gemma4VitClassifier`). `HF_TABLE` and `TIMM_TABLE` map
the names; timm's are transformers' renamed (its own `checkpoint_filter_fn_encoder`), so one
module holds both.

The tower is the one block with options:
  * RMSNorm everywhere (`norm_type='rmsnorm'`), the sandwich of four norms per block
    (`sandwich_norm`: input, post-attention, pre-feedforward, post-feedforward), no final norm;
  * qk-norm (RMSNorm with a weight, before RoPE) and a weightless RMS norm of the values
    (`v_norm`); attention scale 1 instead of `1/sqrt(head_dim)`, folded into the query norm's
    weight (times `sqrt(head_dim)`, exact up to one rounding);
  * a GELU-tanh gated MLP (`mlp_type='gated'`: `gate_proj` / `up_proj` packed into `fc1`, gate
    first); every linear is bias-free (loaded with zero biases, which computes the same);
  * 2D RoPE over integer `(x, y)` patch positions, theta 100 (`rope='eva'`, `rope_xy`): the first
    half of each head turns with `x`, the second with `y`, each half rotating its own two
    quarters (`rope_layout='split'`, the reference's `apply_multidimensional_rope`);
  * positions from two learned tables, a column and a row table of `position_embedding_size`
    rows (`pos_embed='factorized'`): any grid up to that side, the variable resolution of its
    processor (aspect-keeping, `max_soft_tokens` x 9 patches).

Patch embedding: a bias-free Linear over flattened patches, i.e. our convolution. transformers'
processor flattens a patch `(py, px, c)` (`convert_image_to_patches`); timm flattens a raw image's
patches `(c, py, px)` (`batch_patchify(channels_last=False)`) and passes the same tensor through,
so each table reshapes `input_proj` its own reference's way. Both scale `[0, 1]` pixels by
`2 (x - 0.5)` inside the model: our processor normalises with mean = std = 0.5, the same numbers.

Clipped linears (`use_clipped_linears`, the E2B / E4B towers: every projection clamps its input
and output to bounds of its own) are `clipped_linears`: our fused `qkv` keeps the q / k / v
bounds apart, `fc1` the gate's and the value's (`layers.ClippedLinear`).

Not the tower: the pooler (`k x k` average by position, `* sqrt(width)`), the `std_bias` /
`std_scale` standardisation and the `embed_vision` projection are the connector, the `gemma_pool`
projector (`projectors.load_gemma4_projector`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import VisionConfig
from ..encoder import VisionEncoder
from ..weights import WeightsError, naming
from .hf_common import KeyTable, Transform, activation, native_image_processor, parse_config

if TYPE_CHECKING:
    from ..projectors import Projector

FAMILY = "Gemma 4 vision"
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
IGNORED_PREFIXES = ("std_bias", "std_scale")  # the connector's (`load_gemma4_projector`)
CLAMP_BUFFERS = ("input_min", "input_max", "output_min", "output_max")
SOFT_TOKENS_SIDE = 16  # our native size: 16 x 16 soft tokens (timm's default 768 px at patch 16, k 3)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor):
    """Our fused `qkv` and qk-norms, the attention scale 1 folded into the query norm (`sqrt(d)`,
    undone by our `1/sqrt(d)`; in float32, so that a bfloat16 checkpoint is rounded once, by the
    final cast, not by the product)."""
    return torch.cat([q, k, v]), q_norm.float() * q_norm.shape[0] ** 0.5, k_norm


def _with_zero_bias(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weight, weight.new_zeros(weight.shape[0])


def _gated(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _with_zero_bias(torch.cat([gate, up]))  # (2 * hidden, D), the gate first


def _patch_weight(channels_last: bool):
    """`input_proj.weight` `(D, 3 p p)` as our convolution `(D, 3, p, p)`."""

    def fold(weight: torch.Tensor) -> torch.Tensor:
        D, K = weight.shape
        p = int(round((K / 3) ** 0.5))
        if 3 * p * p != K:
            raise WeightsError(f"{FAMILY}: input_proj takes {K} values per patch, not 3 x p x p for any patch side p")
        if channels_last:  # (py, px, c): transformers' processor
            return weight.reshape(D, p, p, 3).permute(0, 3, 1, 2).contiguous()
        return weight.reshape(D, 3, p, p).contiguous()  # (c, py, px): timm

    return fold


def _bounds(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Our `(parts,)` clamp bounds from each part's four scalar buffers, in order: the parts'
    `input_min`, then their `input_max`, `output_min`, `output_max`."""
    parts = len(values) // 4
    return tuple(torch.stack([v.reshape(()) for v in values[b * parts : (b + 1) * parts]]) for b in range(4))


def _clamps(ours: str, theirs: tuple[str, ...]) -> Transform:
    """The clamp bounds of our `ours` Linear from the reference's `theirs` clippable linears
    (present only with `use_clipped_linears`)."""
    return Transform(
        tuple(f"{ours}.{b}" for b in ("in_min", "in_max", "out_min", "out_max")),
        tuple(f"{t}.{b}" for b in CLAMP_BUFFERS for t in theirs),
        _bounds,
        optional=True,
    )


def _table(patch: str, layer: str, names: Mapping[str, str], channels_last: bool) -> KeyTable:
    """A family layout: `names` gives the reference's module of each of our block parts."""
    attn, mlp = f"{layer}.{names['attn']}", f"{layer}.mlp"
    return KeyTable(
        renames={
            f"{patch}.position_embedding_table": "pos_embed_axes",
            f"{layer}.{names['norm1']}": "blocks.{i}.norm1",
            f"{layer}.{names['post_attn_norm']}": "blocks.{i}.post_attn_norm",
            f"{layer}.{names['norm2']}": "blocks.{i}.norm2",
            f"{layer}.{names['post_mlp_norm']}": "blocks.{i}.post_mlp_norm",
        },
        transforms=(
            Transform(("patch_embed.proj.weight",), (f"{patch}.input_proj.weight",), _patch_weight(channels_last)),
            Transform(
                ("blocks.{i}.attn.qkv.weight", "blocks.{i}.attn.q_norm.weight", "blocks.{i}.attn.k_norm.weight"),
                (*(f"{attn}.{p}_proj.linear.weight" for p in "qkv"), f"{attn}.q_norm.weight", f"{attn}.k_norm.weight"),
                _attention,
            ),
            Transform(("blocks.{i}.attn.proj.weight", "blocks.{i}.attn.proj.bias"), (f"{attn}.o_proj.linear.weight",), _with_zero_bias),
            Transform(
                ("blocks.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.bias"),
                (f"{mlp}.gate_proj.linear.weight", f"{mlp}.up_proj.linear.weight"),
                _gated,
            ),
            Transform(("blocks.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.bias"), (f"{mlp}.down_proj.linear.weight",), _with_zero_bias),
            _clamps("blocks.{i}.attn.qkv", tuple(f"{attn}.{p}_proj" for p in "qkv")),
            _clamps("blocks.{i}.attn.proj", (f"{attn}.o_proj",)),
            _clamps("blocks.{i}.mlp.fc1", (f"{mlp}.gate_proj", f"{mlp}.up_proj")),
            _clamps("blocks.{i}.mlp.fc2", (f"{mlp}.down_proj",)),
        ),
    )


HF_TABLE = _table(
    "patch_embedder",
    "encoder.layers.{i}",
    dict(attn="self_attn", norm1="input_layernorm", post_attn_norm="post_attention_layernorm",
         norm2="pre_feedforward_layernorm", post_mlp_norm="post_feedforward_layernorm"),
    channels_last=True,
)
TIMM_TABLE = _table(
    "patch_embed",
    "blocks.{i}",
    dict(attn="attn", norm1="norm1", post_attn_norm="norm2", norm2="norm3", post_mlp_norm="norm4"),
    channels_last=False,
)


# ---------------------------------------------------------------------------- transformers
def vision_config_of(hf_config_or_dict: Any) -> Any:
    """The `Gemma4VisionConfig` of a vision config, or of a whole `gemma4` config."""
    from transformers import Gemma4Config, Gemma4VisionConfig

    c = parse_config(hf_config_or_dict, {"gemma4_vision": Gemma4VisionConfig, "gemma4": Gemma4Config}, FAMILY)
    if c.model_type == "gemma4":
        if c.vision_config is None:
            raise ValueError(f"{FAMILY}: this gemma4 config has no vision_config (a text-only checkpoint)")
        return c.vision_config
    return c


def _fields(*, patch: int, width: int, depth: int, heads: int, head_dim: int, kv_heads: int, mlp_dim: int,
            act: str, eps: float, theta: float, table: int, pooling: int, clipped: bool) -> dict[str, Any]:
    """The `VisionConfig` of a Gemma 4 tower, after refusing what the block does not express."""
    if kv_heads != heads:
        raise ValueError(f"{FAMILY}: num_key_value_heads={kv_heads} differs from num_attention_heads={heads} (grouped attention)")
    if head_dim * heads != width:
        raise ValueError(f"{FAMILY}: head_dim={head_dim} x {heads} heads is not the width {width}")
    side = min(pooling * SOFT_TOKENS_SIDE, table - table % pooling)  # patches a side, at most the tables
    return dict(
        image_size=patch * side, patch_size=patch, in_channels=3, width=width, depth=depth, num_heads=heads,
        mlp_dim=mlp_dim, mlp_type="gated", act=act, qkv_bias=False, patch_bias=False, class_token=False,
        pos_embed="factorized", pos_table_size=table, rope="eva", rope_theta=theta, rope_layout="split", rope_xy=True,
        qk_norm=True, v_norm=True, sandwich_norm=True, norm_type="rmsnorm", norm_eps=eps, final_norm=False, pool="none",
        clipped_linears=clipped,
    )


def config_from_hf(hf_config_or_dict: Any) -> VisionConfig:
    """Our config for a transformers Gemma 4 vision tower.

    Args:
        hf_config_or_dict: A `Gemma4VisionConfig`, a whole `Gemma4Config`, or either's dict.

    Returns:
        The `VisionConfig`; `image_size` is 16 x 16 soft tokens' worth (768 px at patch 16), the
        tower takes any grid up to `position_embedding_size` patches a side.

    Raises:
        ValueError: A variant the encoder does not express (grouped attention, another RoPE type
            or activation).
    """
    c = vision_config_of(hf_config_or_dict)
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"{FAMILY}: rope_type={rope.get('rope_type')!r} is not supported; supported: axial")
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    return VisionConfig(**_fields(
        patch=c.patch_size, width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        head_dim=head_dim, kv_heads=c.num_key_value_heads, mlp_dim=c.intermediate_size,
        act=activation(c.hidden_activation, FAMILY), eps=c.rms_norm_eps, theta=float(rope.get("rope_theta", 100.0)),
        table=c.position_embedding_size, pooling=c.pooling_kernel_size, clipped=c.use_clipped_linears,
    ))


def _tower(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's keys, bare: a whole model's `model.vision_tower.` keys, or the tower's own."""
    prefix = next((p for p in TOWER_PREFIXES if any(k.startswith(p) for k in state_dict)), None)
    if prefix is not None:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers Gemma 4 vision tower checkpoint.

    Args:
        state_dict: `Gemma4VisionModel` keys, bare or under `model.vision_tower.` /
            `vision_tower.` (then only the keys under it are read); `std_bias` / `std_scale` are
            left to the connector.

    Raises:
        WeightsError: A missing or unknown key.
    """
    return HF_TABLE.convert(_tower(state_dict), FAMILY)


# ---------------------------------------------------------------------------- timm
def is_gemma4(name: str) -> bool:
    """Whether timm builds `name` (`.tag` allowed) with `gemma4_vit.py` (timm's registry's answer)."""
    import timm.models

    return timm.models.is_model_in_modules(name.split(".")[0], ["gemma4_vit"])


def _timm_encoder(model: nn.Module) -> nn.Module:
    """The `Gemma4VitEncoder` of a timm model (a classifier holds it as `encoder`)."""
    return getattr(model, "encoder", model)


def config_from_timm(model: nn.Module) -> VisionConfig:
    """Our config for a timm `Gemma4VitEncoder` or `Gemma4VitClassifier` instance."""
    enc = _timm_encoder(model)
    block = enc.blocks[0]
    act = block.mlp.act
    if not (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        raise ValueError(f"{FAMILY} (timm): the MLP gate {act} is not supported; supported: GELU(approximate='tanh')")
    ph, pw = enc.patch_size
    if ph != pw:
        raise ValueError(f"{FAMILY} (timm): only square patches are supported, got {enc.patch_size}")
    return VisionConfig(**_fields(
        patch=ph, width=enc.embed_dim, depth=len(enc.blocks), heads=block.attn.num_heads, head_dim=block.attn.head_dim,
        kv_heads=block.attn.num_kv_heads, mlp_dim=block.mlp.gate_proj.linear.out_features, act="gelu_tanh",
        eps=block.norm1.eps, theta=float(enc.rotary_emb.rope_theta), table=enc.patch_embed.position_embedding_size,
        pooling=enc.pooling_kernel_size, clipped=enc.use_clipped_linears,
    ))


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from a timm Gemma 4 encoder's (bare) or classifier's (`encoder.`) weights;
    the classifier's `norm` / `head` and the encoder's `std_bias` / `std_scale` are left out.

    Raises:
        WeightsError: A missing or unknown key.
    """
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    tower = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    return TIMM_TABLE.convert(tower, f"{FAMILY} (timm)")


def load_timm_gemma4(name: str, checkpoint: str | None = None, **timm_kwargs: Any) -> VisionEncoder:
    """Load a timm Gemma 4 vision model (`gemma4_vit_*`, `gemma4_vit_*_enc`) as a `VisionEncoder`.

    Args:
        name: A timm model name built by `gemma4_vit.py`.
        checkpoint: A weight file in timm's state-dict format; `None` uses timm's pretrained
            weights (from the Hugging Face cache; offline they must be there).
        **timm_kwargs: Passed to `timm.create_model`.

    Returns:
        The encoder in eval mode; `image_processor` is timm's eval transform with mean = std =
        0.5 (timm passes `[0, 1]` pixels and scales them inside the model).

    Raises:
        WeightsNotCached: `checkpoint=None` and timm cannot get the weights.
        WeightsError: The checkpoint does not fit.
    """
    from .timm_vit import create_timm_model, encoder_holding, timm_processor

    model, state_dict, source = create_timm_model(name, checkpoint, timm_kwargs, meta=False)
    with naming(source):
        config = config_from_timm(model)
        weights = convert_timm_state_dict(model.state_dict() if state_dict is None else state_dict)
        encoder = encoder_holding(config, weights, copy=state_dict is None, source=source)
    encoder.image_processor = timm_processor(model, mean=(0.5,) * 3, std=(0.5,) * 3)
    return encoder


def image_processor(config: VisionConfig, data: dict[str, Any] | None = None) -> Any:
    """What our encoder takes from an image, for a transformers Gemma 4 tower.

    With the checkpoint's `preprocessor_config.json` (`data`): its `Gemma4ImageProcessor`
    (`resize_mode='gemma4'`: aspect kept, sides multiples of `patch_size * pooling_kernel_size`,
    at most `max_soft_tokens * pooling_kernel_size**2` patches; each image its own size) with
    the model's own `2 (x - 0.5)` folded into the normalisation: transformers' pixels `x`
    (`[0, 1]`, or `(x - m) / s` where it normalises) become `(x - (m + s / 2)) / (s / 2)`.
    Without one: a resize to the native size (bicubic, torchvision), mean = std = 0.5.

    Raises:
        ValueError: Another processor class, or a `patch_size` that is not the tower's.
    """
    from ..processing import ImageProcessor

    processor = native_image_processor(config, data, "gemma4", "Gemma4ImageProcessor")
    if data is None:
        return processor
    hf = processor.config
    mean, std = (hf.mean, hf.std) if hf.mean is not None else ((0.0,) * 3, (1.0,) * 3)
    return ImageProcessor(hf.replace(mean=tuple(m + s / 2 for m, s in zip(mean, std)), std=tuple(s / 2 for s in std)))


# The connector of a whole checkpoint (the `gemma_pool` projector; weights alone: projectors.gemma_pool).
GEMMA3_PROJECTOR = ("model.multi_modal_projector.", "multi_modal_projector.")
GEMMA4_EMBEDDER = ("model.embed_vision.", "embed_vision.")
GEMMA4_STANDARDIZE = tuple(f"{p}{n}" for p in ("model.vision_tower.", "vision_tower.") for n in ("std_bias", "std_scale"))


def load_gemma_projector(source: str | os.PathLike, *, revision: str | None = None) -> Projector:
    """The connector of a whole Gemma 3 or Gemma 4 checkpoint (a directory or hub repo id): its
    `config.json` says which and gives the geometry; only the shards holding the connector's
    keys are read.

    Raises:
        ValueError: A `model_type` other than `gemma3` / `gemma4`.
        FileNotFoundError: Missing files (a hub id not cached offline says so).
        WeightsError: The connector's keys are not exactly the reference's.
    """
    from ..loading import CONFIG_FILE, read_config_file, read_weights
    from ..projectors.gemma_pool import load_gemma3_projector, load_gemma4_projector
    from ..specs.files import SourceFiles

    files = SourceFiles(os.fspath(source), revision)
    config = read_config_file(files.get(CONFIG_FILE))
    model_type = config.get("model_type")
    if model_type == "gemma3":
        from transformers import Gemma3Config

        c = Gemma3Config.from_dict(config)
        prefixes = GEMMA3_PROJECTOR
    elif model_type == "gemma4":
        from transformers import Gemma4Config

        c = Gemma4Config.from_dict(config)
        prefixes = GEMMA4_EMBEDDER + GEMMA4_STANDARDIZE
    else:
        raise ValueError(f"{files.source}: model_type={model_type!r} is not a Gemma VLM; expected 'gemma3' or 'gemma4'")
    tensors, _, _ = read_weights(files, None, lambda key: key.startswith(prefixes))
    with naming(str(files.source)):
        state = {_unprefixed(k, prefixes): v for k, v in tensors.items()}
        vision = c.vision_config
        if model_type == "gemma3":
            side = vision.image_size // vision.patch_size
            return load_gemma3_projector(state, side // int(round(c.mm_tokens_per_image**0.5)), vision.layer_norm_eps)
        return load_gemma4_projector(state, vision.pooling_kernel_size, vision.rms_norm_eps)


def _unprefixed(key: str, prefixes: tuple[str, ...]) -> str:
    """`key` without the model prefix: the connector's own name (`std_*` lose the tower's too)."""
    prefix = next(p for p in prefixes if key.startswith(p))
    return key.rsplit(".", 1)[-1] if prefix in GEMMA4_STANDARDIZE else key[len(prefix) :]
