"""Converter for timm `VisionTransformer` models (CLIP, SigLIP, DINOv2, AugReg, hybrid R50).

timm's parameter names are already close to ours; the differences handled here are:
  - `pos_embed` may carry rows for the prefix tokens (`no_embed_class=False`): those rows are
    folded into `cls_token` / `register_tokens`, our table covers the patches only;
  - `reg_token` -> `register_tokens`, `fc_norm` -> `pooled_norm`, `head` -> `proj`;
  - the hybrid's `patch_embed.backbone.*` (timm `ResNetV2`) -> our `stem.*`.

The architecture is read from a timm model instance (`config_from_timm`); anything our
`VisionEncoder` cannot express exactly (qk-norm, scaled norms, other block types, max
pooling, ...) is refused with a message naming it, never approximated.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import VisionConfig
from ..encoder import VisionEncoder
from ..weights import WeightsError, build_and_load, load_state_dict_strict, naming, read_state_dict, strip_prefixes

if TYPE_CHECKING:
    from ..processing import ImageProcessor

_POOLS = {"token": "cls", "avg": "gap", "map": "map", "": "none"}


class UnsupportedTimmModel(ValueError):
    """A timm model uses a feature `VisionEncoder` cannot express."""


def _refuse(name: str, what: str) -> None:
    raise UnsupportedTimmModel(f"timm model {name}: {what} is not supported by VisionEncoder")


def _activation(module: nn.Module, name: str) -> str:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, GELU):
        return "gelu"
    if isinstance(module, GELUTanh):
        return "gelu_tanh"
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    _refuse(name, f"MLP activation {type(module).__name__} (allowed: GELU, GELU-tanh, QuickGELU)")
    raise AssertionError  # unreachable


def _layer_norm_eps(module: nn.Module, where: str, name: str) -> float:
    from timm.layers import LayerNorm as TimmLayerNorm  # same function as nn.LayerNorm

    if type(module) not in (nn.LayerNorm, TimmLayerNorm):
        _refuse(name, f"{where} of type {type(module).__name__} (only LayerNorm)")
    if module.weight is None or module.bias is None:
        _refuse(name, f"{where} without affine weight and bias")
    return float(module.eps)


def _mlp_spec(mlp: nn.Module, name: str) -> tuple[str, int, str]:
    """(mlp_type, hidden width, activation) of a block MLP."""
    from timm.layers import GluMlp, Mlp

    if type(mlp) is Mlp:
        if not isinstance(mlp.norm, nn.Identity):
            _refuse(name, "a norm inside the MLP (scale_mlp_norm)")
        if not isinstance(mlp.fc1, nn.Linear) or mlp.fc1.bias is None or mlp.fc2.bias is None:
            _refuse(name, "an MLP without biases or with convolutional layers")
        return "mlp", mlp.fc1.out_features, _activation(mlp.act, name)
    if type(mlp) is GluMlp:
        if not isinstance(mlp.act, nn.SiLU) or mlp.gate_last or not isinstance(mlp.norm, nn.Identity):
            _refuse(name, "a gated MLP other than packed SwiGLU (SiLU on the first half)")
        if mlp.fc1.bias is None or mlp.fc2.bias is None:
            _refuse(name, "a SwiGLU MLP without biases")
        return "swiglu", mlp.fc2.in_features, "gelu"
    _refuse(name, f"MLP type {type(mlp).__name__} (allowed: Mlp, SwiGLUPacked)")
    raise AssertionError  # unreachable


def _block_spec(block: nn.Module, width: int, name: str) -> dict[str, Any]:
    from timm.layers import Attention, LayerScale
    from timm.models.vision_transformer import Block

    if type(block) is not Block:
        _refuse(name, f"block type {type(block).__name__} (only the pre-norm Block)")
    attn = block.attn
    if type(attn) is not Attention:
        _refuse(name, f"attention type {type(attn).__name__} (e.g. rope or differential attention)")
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        _refuse(name, "qk_norm")
    if not isinstance(attn.norm, nn.Identity):
        _refuse(name, "scale_attn_norm")
    if getattr(attn, "gate", None) is not None:
        _refuse(name, "gated attention")
    if attn.attn_dim != width or attn.proj.out_features != width:
        _refuse(name, f"attention width {attn.attn_dim} != embed_dim {width}")
    if attn.proj.bias is None:
        _refuse(name, "attention output projection without bias (proj_bias=False)")
    layer_scale = []
    for ls in (block.ls1, block.ls2):
        if isinstance(ls, LayerScale):
            value = ls.gamma.detach().flatten()[0]
            # The initial value only matters for fresh training: loaded weights replace it.
            layer_scale.append(1e-5 if value.is_meta else float(value))
        elif isinstance(ls, nn.Identity):
            layer_scale.append(None)
        else:
            _refuse(name, f"layer scale of type {type(ls).__name__}")
    if (layer_scale[0] is None) != (layer_scale[1] is None):
        _refuse(name, "LayerScale on only one of the two residual branches")
    mlp_type, mlp_dim, act = _mlp_spec(block.mlp, name)
    eps = {_layer_norm_eps(block.norm1, "norm1", name), _layer_norm_eps(block.norm2, "norm2", name)}
    return dict(
        num_heads=attn.num_heads,
        qkv_bias=attn.qkv.bias is not None,
        layer_scale=layer_scale[0] is not None,
        layer_scale_init=layer_scale[0],
        mlp_type=mlp_type,
        mlp_dim=mlp_dim,
        act=act,
        eps=eps,
    )


def _stem_spec(embed: nn.Module, name: str) -> tuple[tuple[int, ...], int]:
    """Stage depths and root width of a hybrid's timm `ResNetV2` backbone (checked against ours)."""
    from timm.layers import StdConv2dSame
    from timm.models.resnetv2 import ResNetV2

    from ..layers import ResNetStem

    backbone = embed.backbone
    if type(backbone) is not ResNetV2:
        _refuse(name, f"hybrid backbone {type(backbone).__name__} (only ResNetV2)")
    if not isinstance(backbone.norm, nn.Identity):
        _refuse(name, "a pre-activation ResNetV2 backbone (preact=True)")
    if not isinstance(backbone.stem.conv, StdConv2dSame):
        _refuse(name, "a ResNetV2 stem without TF-same weight-standardised convolutions")
    layers = tuple(len(stage.blocks) for stage in backbone.stages)
    width = backbone.stem.conv.out_channels
    for module_name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d) and (not isinstance(module, StdConv2dSame) or module.eps != 1e-8):
            _refuse(name, f"backbone conv {module_name} that is not StdConv2dSame(eps=1e-8)")
        if isinstance(module, nn.GroupNorm) and (module.num_groups != 32 or module.eps != 1e-5):
            _refuse(name, f"backbone norm {module_name} that is not GroupNorm(32, eps=1e-5)")
    ours = ResNetStem(backbone.stem.conv.in_channels, layers, width).state_dict()
    theirs = {_stem_key(k): v for k, v in backbone.state_dict().items()}
    mismatch = sorted(set(ours) ^ set(theirs)) + sorted(
        k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape
    )
    if mismatch:
        _refuse(name, f"a ResNetV2 backbone whose layout differs from ResNetStem ({', '.join(mismatch[:8])})")
    return layers, width


def _stem_key(key: str) -> str:
    """timm ResNetV2 key (without `patch_embed.backbone.`) -> our ResNetStem key."""
    if key.startswith("stem."):
        return key[len("stem.") :]
    match = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if match:
        return f"stages.{match[1]}.{match[2]}.{match[3]}"
    return "?" + key  # never matches ours, so it is reported


def config_from_timm(model: nn.Module) -> VisionConfig:
    """Read the `VisionConfig` of a timm `VisionTransformer` instance.

    Args:
        model: A `timm.models.vision_transformer.VisionTransformer` (as built by
            `timm.create_model`), plain or hybrid (`HybridEmbed` over `ResNetV2`).

    Returns:
        The equivalent configuration. `embed_dim` is the classifier head's width when the
        model has a head (`proj` then holds the head, with bias).

    Raises:
        UnsupportedTimmModel: The model uses something `VisionEncoder` does not express
            (another model class or block type, qk-norm, max pooling, ...).
    """
    from timm.layers import AttentionPoolLatent, HybridEmbed, PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    name = repr(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__))
    if type(model) is not VisionTransformer:
        _refuse(name, f"model class {type(model).__name__} (only timm VisionTransformer)")
    width = model.embed_dim
    embed = model.patch_embed
    stem_layers: tuple[int, ...] = ()
    stem_width = 64
    if type(embed) is HybridEmbed:
        stem_layers, stem_width = _stem_spec(embed, name)
        in_channels = embed.in_chans
        if not isinstance(embed.proj, nn.Conv2d):
            _refuse(name, "a hybrid embedding without a projection")
    elif type(embed) is PatchEmbed:
        in_channels = embed.proj.in_channels
        if not isinstance(embed.norm, nn.Identity):
            _refuse(name, "a norm inside the patch embedding")
    else:
        _refuse(name, f"patch embedding {type(embed).__name__}")
    if embed.dynamic_img_pad:
        _refuse(name, "dynamic_img_pad")
    patch = tuple(embed.patch_size)
    if patch[0] != patch[1]:
        _refuse(name, f"non-square patches {patch}")

    blocks = [_block_spec(b, width, name) for b in model.blocks]
    first = blocks[0]
    for i, spec in enumerate(blocks[1:], start=1):
        differing = [k for k in spec if k not in ("eps", "layer_scale_init") and spec[k] != first[k]]
        if differing:
            _refuse(name, f"blocks that differ from block 0 in {differing} (block {i})")
    eps = set().union(*(b["eps"] for b in blocks))
    for where in ("norm_pre", "norm", "fc_norm"):
        module = getattr(model, where)
        if not isinstance(module, nn.Identity):
            eps.add(_layer_norm_eps(module, where, name))

    pool = model.global_pool
    if pool not in _POOLS:
        _refuse(name, f"global_pool={pool!r} (allowed: 'token', 'avg', 'map', '')")
    map_mlp_dim = None
    if pool == "map":
        head = model.attn_pool
        if type(head) is not AttentionPoolLatent:
            _refuse(name, f"attention pool {type(head).__name__}")
        if (
            head.latent_len != 1
            or head.pos_embed is not None
            or not isinstance(head.q, nn.Linear)
            or head.q.bias is None
            or head.kv.bias is None
            or not isinstance(head.q_norm, nn.Identity)
            or head.mlp is None
            or head.pool != "token"
            or head.num_heads != first["num_heads"]
            or head.latent_dim != width
        ):
            _refuse(name, "a MAP head other than one latent query with q/kv projections, LayerNorm and MLP")
        if _activation(head.mlp.act, name) != first["act"]:
            _refuse(name, "a MAP head whose MLP activation differs from the blocks'")
        eps.add(_layer_norm_eps(head.norm, "attn_pool.norm", name))
        map_mlp_dim = head.mlp.fc1.out_features
        if model.num_prefix_tokens and not model.pool_include_prefix:
            _refuse(name, "MAP pooling that skips the CLS/register tokens")
    elif pool == "avg" and model.pool_include_prefix and model.num_prefix_tokens:
        _refuse(name, "average pooling that includes the prefix tokens")
    if len(eps) != 1:
        _refuse(name, f"LayerNorms with different epsilons {sorted(eps)}")

    if isinstance(model.head, nn.Linear):
        embed_dim, proj_bias = model.head.out_features, model.head.bias is not None
    elif isinstance(model.head, nn.Identity):
        embed_dim, proj_bias = None, False
    else:
        _refuse(name, f"classifier head {type(model.head).__name__}")

    return VisionConfig(
        image_size=tuple(embed.img_size),
        patch_size=patch[0],
        in_channels=in_channels,
        width=width,
        depth=len(blocks),
        num_heads=first["num_heads"],
        mlp_dim=first["mlp_dim"],
        mlp_type=first["mlp_type"],
        act=first["act"],
        qkv_bias=first["qkv_bias"],
        patch_bias=embed.proj.bias is not None,
        class_token=model.cls_token is not None,
        num_register_tokens=model.num_reg_tokens,
        pos_embed="learned" if model.pos_embed is not None else "none",
        norm_pre=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not isinstance(model.norm, nn.Identity),
        pooled_norm=not isinstance(model.fc_norm, nn.Identity),
        norm_eps=eps.pop(),
        layer_scale_init=first["layer_scale_init"],
        pool=_POOLS[pool],
        map_mlp_dim=map_mlp_dim,
        embed_dim=embed_dim,
        proj_bias=proj_bias,
        stem_layers=stem_layers,
        stem_width=stem_width,
        # timm's PatchEmbed convolution floors the grid (`img_size // patch_size`: 27 x 27 for
        # vit_so400m_patch14_siglip_384) and sizes the position table by it.
        patch_remainder="drop",
    )


_RENAMES = (
    ("patch_embed.proj.", "patch_embed.proj."),
    ("norm_pre.", "norm_pre."),
    ("blocks.", "blocks."),
    ("norm.", "norm."),
    ("fc_norm.", "pooled_norm."),
    ("attn_pool.", "attn_pool."),
    ("head.", "proj."),
)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: VisionConfig) -> dict[str, torch.Tensor]:
    """Map a timm `VisionTransformer` state dict to `VisionEncoder` names.

    Args:
        state_dict: The timm model's `state_dict()` (or a timm checkpoint file's content).
        config: The target configuration (from `config_from_timm`); it says how many
            prefix tokens the position table may carry.

    Returns:
        A state dict for `VisionEncoder(config)`.

    Raises:
        WeightsError: Keys we do not know (listed), or a position table whose length fits
            neither the patches alone nor the patches plus the prefix tokens.
    """
    state_dict = strip_prefixes(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in ("cls_token", "pos_embed"):
            out[key] = value
        elif key == "reg_token":
            out["register_tokens"] = value
        elif key.startswith("patch_embed.backbone."):
            out["stem." + _stem_key(key[len("patch_embed.backbone.") :])] = value
        else:
            for old, new in _RENAMES:
                if key.startswith(old):
                    out[new + key[len(old) :]] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        raise WeightsError(f"timm state dict has keys the ViT converter does not know: {', '.join(sorted(unknown))}")
    if "pos_embed" in out:
        _fold_prefix_positions(out, config)
    return out


def _fold_prefix_positions(out: dict[str, torch.Tensor], config: VisionConfig) -> None:
    """Split timm's `(1, prefix + N, D)` table: prefix rows go into the prefix tokens."""
    table = out["pos_embed"]
    patches = config.grid_size[0] * config.grid_size[1]
    prefix = table.shape[1] - patches
    if prefix == 0:
        return
    if prefix != config.num_prefix_tokens:
        raise WeightsError(
            f"timm pos_embed has {table.shape[1]} rows; expected {patches} (patches only) or "
            f"{patches + config.num_prefix_tokens} (with {config.num_prefix_tokens} prefix tokens) "
            f"for a {config.grid_size} grid"
        )
    start = 0
    if config.class_token:
        if "cls_token" not in out:
            raise WeightsError("timm state dict has a position row for the CLS token but no cls_token")
        out["cls_token"] = out["cls_token"] + table[:, :1]
        start = 1
    if config.num_register_tokens:
        if "register_tokens" not in out:
            raise WeightsError("timm state dict has position rows for register tokens but no reg_token")
        out["register_tokens"] = out["register_tokens"] + table[:, start:prefix]
    out["pos_embed"] = table[:, prefix:].contiguous()


class WeightsNotCached(FileNotFoundError, RuntimeError):
    """Pretrained weights neither cached nor downloadable: a missing file to the commands (one
    line, exit 2, as a hub id not cached offline), and still the `RuntimeError` it always was."""


def not_cached(what: str, err: Exception, way_out: str) -> WeightsNotCached:
    """The error for pretrained weights that are neither cached nor downloadable (the
    libraries raise many kinds): what failed, and how to pass a local file instead."""
    return WeightsNotCached(
        f"{what} are not in the local cache and could not be downloaded "
        f"({type(err).__name__}: {str(err).strip()[:300]}). Pass a local file instead: {way_out}"
    )


def encoder_from_timm_model(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> VisionEncoder:
    """A `VisionEncoder` equivalent to a timm `VisionTransformer` instance.

    Args:
        model: The timm model (gives the architecture).
        state_dict: Weights in timm's format; the model's own when `None`.

    Returns:
        The encoder in eval mode, without an image processor.
    """
    config = config_from_timm(model)
    weights = convert_state_dict(model.state_dict() if state_dict is None else state_dict, config)
    return encoder_holding(config, weights, copy=state_dict is None, source="converted timm state dict")


def encoder_holding(config: VisionConfig, weights: dict[str, torch.Tensor], *, copy: bool, source: str) -> VisionEncoder:
    """A `VisionEncoder` of `config` holding converted `weights`, in eval mode: copied into a
    built encoder when they are a live timm model's own tensors (`copy`, so the two never share
    storage), else built on `meta` and assigned (loading holds one copy of the weights)."""
    if copy:
        encoder = VisionEncoder(config)
        load_state_dict_strict(encoder, weights, source=source)
    else:
        encoder = build_and_load(lambda: VisionEncoder(config), weights, source=source)
    return encoder.eval()


def create_timm_model(
    name: str, checkpoint: str | None, timm_kwargs: Mapping[str, Any], *, way_out: str | None = None, meta: bool = True
) -> tuple[nn.Module, dict[str, torch.Tensor] | None, str]:
    """The timm model `name` and the weights to convert, for every `timm:` converter: with
    `checkpoint=None`, timm's pretrained weights inside the model (the state dict returned is
    `None`); else the model built on `meta` (only its architecture is read: no random weights
    beside the file's; `meta=False` where a converter reads values off the built model) and the
    file's state dict, read safely.

    Returns:
        `(model, state_dict or None, source)`, `source` naming the weights in errors.

    Raises:
        WeightsNotCached: `checkpoint=None` and timm cannot get the weights (offline and not
            cached); the message names `way_out` (default: `timm:NAME` with a checkpoint).
    """
    import timm

    if checkpoint is None:
        try:
            model = timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as err:  # noqa: BLE001 - timm / huggingface_hub raise many kinds
            way_out = way_out or f"timm:{name} with checkpoint=PATH"
            raise not_cached(f"timm pretrained weights for {name!r}", err, way_out) from err
        return model, None, f"timm {name} pretrained weights"
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    return model, read_state_dict(checkpoint), str(checkpoint)


def timm_processor(model: nn.Module, img_size: tuple[int, int] | None = None, **changes: Any) -> ImageProcessor:
    """timm's eval preprocessing of `model` as our `ImageProcessor`, at `img_size` when given (the
    model's own input size, so that `img_size=` overrides reach the processor too: timm's
    pretrained cfg keeps the checkpoint's native size); `changes` replace entries of timm's
    data config (e.g. `mean` / `std`)."""
    import timm.data

    from ..processing import ImageProcessor

    data = timm.data.resolve_data_config({} if img_size is None else {"input_size": (model.in_chans, *img_size)},
                                         model=model)
    return ImageProcessor.from_timm({**data, **changes})


def load_timm(name: str, checkpoint: str | None = None, **timm_kwargs: Any) -> VisionEncoder:
    """Load a timm ViT as a `VisionEncoder`.

    Args:
        name: A timm model name (`vit_base_patch16_clip_224.openai`,
            `vit_base_patch14_reg4_dinov2`, `vit_base_patch16_siglip_224`, ...).
        checkpoint: A weight file in timm's state-dict format (`.safetensors`, or a torch
            pickle read with `weights_only=True`). `None` uses timm's pretrained weights
            (downloaded once into the Hugging Face cache; offline they must be there).
        **timm_kwargs: Architecture overrides passed to `timm.create_model`
            (e.g. `img_size=384`, `dynamic_img_size=True`).

    Returns:
        The encoder in eval mode; `image_processor` holds timm's preprocessing.

    Raises:
        RuntimeError: `checkpoint=None` and timm cannot get the weights (offline and not cached).
        UnsupportedTimmModel: The architecture is not expressible.
        WeightsError: The checkpoint does not fit the architecture.
    """
    way_out = f"load_timm({name!r}, checkpoint='path/to/model.safetensors')"
    model, state_dict, source = create_timm_model(name, checkpoint, timm_kwargs, way_out=way_out)
    with naming(source):
        encoder = encoder_from_timm_model(model, state_dict)
    encoder.image_processor = timm_processor(model, model.patch_embed.img_size)
    return encoder

