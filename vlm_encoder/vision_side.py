"""`load_vision_side`: a VLM checkpoint's vision side as one unit: its tower as a `VisionEncoder`,
its connector as a `Projector`, the layer(s) the connector reads and whether the tower's final
norm is applied, so `side.image_tokens(pixels)` gives exactly the image tokens the checkpoint's
language model receives, without loading the language model (only the tower's and the
connector's tensors are read).

Families (by `config.json`'s `model_type`): connector; layers read; final norm applied.

  * `llava`, `llava_next`, `llava_onevision`: `mlp2x_gelu` (`multi_modal_projector`);
    `vision_feature_layer` (CLS dropped for `default`); no. NeXT / OneVision: `anyres_image_tokens`.
  * `qwen2_5_vl`: `qwen_merger` (RMSNorm); last; no (the tower has none).
  * `qwen3_vl`, `qwen3_vl_moe`, `qwen3_5`, `qwen3_5_moe`: `qwen_merger` (LayerNorm); last; no
    (none). Qwen3-VL's DeepStack mergers: `deepstack_connectors` on `deepstack_visual_indexes`.
  * `kimi_k25`: `qwen_merger` (LayerNorm); last; yes.
  * `deepseek_v4`: `deepseek_aligner`; last; yes (the aligner reads the final-normed layer).
  * `gemma3`: `gemma_pool`; last; yes (SigLIP's `post_layernorm`).
  * `gemma4`: `gemma_pool` (scale, standardize); last; no (none).
  * `perception_lm`: `mlp_pool`; last (CLS dropped); yes (timm's `forward_features`: its `norm`
    when `use_post_transformer_norm`).
  * `llama4`: `pixel_shuffle` (`vision_adapter` + `multi_modal_projector`); last (CLS dropped);
    yes (`layernorm_post`).
  * `molmo2`: `molmo_pool` (one crop per image); `adapter_config.vision_feature_layer`; no (none).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from .encoder import VisionEncoder
from .projectors.base import Projector

FeatureSelect = Literal["patch", "cls_patch"]

LLAVA_TYPES = ("llava", "llava_next", "llava_onevision")
QWEN_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
VISION_SIDE_TYPES = (*LLAVA_TYPES, *QWEN_TYPES, "kimi_k25", "deepseek_v4", "gemma3", "gemma4",
                     "perception_lm", "llama4", "molmo2")


class VisionSide(nn.Module):
    """A VLM's tower and connector, and how the connector reads the tower.

    Args:
        encoder: The vision tower.
        connector: The projector to the LLM's width (one input stream per entry of `layers`).
        layers: The encoder blocks the connector reads, in its input order.
        norm: Apply the tower's final norm to those blocks' tokens.
        feature_select: `patch` (patch tokens on their grid) or `cls_patch` (CLS then patches,
            LLaVA's `full` strategy on a CLS tower).
        family: The checkpoint's `model_type`.
        anyres: LLaVA-NeXT / OneVision tiling (`anyres_image_tokens`); `None` otherwise.
        image_newline: Their learned newline token `(D_llm,)`.
        deepstack_layers: Qwen3-VL: the blocks whose DeepStack mergers feed the LLM's first
            decoder layers (`deepstack_visual_indexes`).
        deepstack_connectors: One connector per entry of `deepstack_layers`.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        connector: Projector,
        *,
        layers: Sequence[int] = (-1,),
        norm: bool = False,
        feature_select: FeatureSelect = "patch",
        family: str = "",
        anyres: Any = None,
        image_newline: torch.Tensor | None = None,
        deepstack_layers: Sequence[int] = (),
        deepstack_connectors: Sequence[Projector] = (),
    ) -> None:
        super().__init__()
        if feature_select not in ("patch", "cls_patch"):
            raise ValueError(f"feature_select must be 'patch' or 'cls_patch', got {feature_select!r}")
        if len(layers) != connector.config.num_inputs:
            raise ValueError(
                f"the connector reads {connector.config.num_inputs} stream(s), {len(layers)} layer(s) given"
            )
        self.encoder, self.connector = encoder, connector
        self.layers, self.norm, self.feature_select, self.family = tuple(layers), norm, feature_select, family
        self.anyres = anyres
        self.image_newline = None if image_newline is None else nn.Parameter(image_newline, requires_grad=False)
        if len(deepstack_layers) != len(deepstack_connectors):
            raise ValueError(f"{len(deepstack_layers)} DeepStack layers for {len(deepstack_connectors)} connectors")
        self.deepstack_layers = tuple(deepstack_layers)
        self.deepstack_connectors = nn.ModuleList(deepstack_connectors)
        self.tile_side = 0
        if anyres is not None:
            from .vlm.model import VisionLanguageModel

            self.tile_side = VisionLanguageModel._anyres_tile_side(anyres, encoder, connector, feature_select)

    @property
    def processor(self) -> Any:
        """The tower's `ImageProcessor` (`encoder.image_processor`)."""
        return self.encoder.image_processor

    def image_tokens(self, pixel_values: torch.Tensor | Any) -> torch.Tensor:
        """The image tokens the checkpoint's language model receives for each image.

        Args:
            pixel_values: Normalised images `(B, C, H, W)` of one size (LLaVA-NeXT / OneVision:
                tiles), or images the `processor` takes (PIL, arrays, a list of them).

        Returns:
            `(B, T, D_llm)`: row-major over the connector's output grid (the order the reference
            places them in its sequence); `T = connector.num_output_tokens(grid)`.
        """
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = self.processor(pixel_values)
        param = next(self.encoder.parameters())
        out = self.encoder(pixel_values.to(param.dtype), layers=self.layers, norm=self.norm)
        if self.feature_select == "patch":
            return self.connector([out.patches(l) for l in self.layers], grid_size=out.grid_size)
        return self.connector([torch.cat([out.cls(l).unsqueeze(1), out.patches(l)], dim=1) for l in self.layers])

    def deepstack_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Qwen3-VL: `image_tokens` and the DeepStack features from one pass of the tower.

        Args:
            pixel_values: Normalised images `(B, C, H, W)` of one size.

        Returns:
            The image tokens `(B, T, D_llm)` and one `(B, T, D_llm)` tensor per entry of
            `deepstack_layers` (what the reference adds to the LLM's hidden states at the image
            positions after decoder layer 0, 1, ...); no DeepStack: an empty list.
        """
        param = next(self.encoder.parameters())
        layers = tuple(dict.fromkeys((*self.layers, *self.deepstack_layers)))
        out = self.encoder(pixel_values.to(param.dtype), layers=layers, norm=self.norm)
        tokens = self.connector([out.patches(l) for l in self.layers], grid_size=out.grid_size)
        taps = zip(self.deepstack_connectors, self.deepstack_layers)
        deep = [proj(out.patches(l), grid_size=out.grid_size) for proj, l in taps]
        return tokens, deep

    def anyres_image_tokens(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | Sequence
    ) -> list[torch.Tensor]:
        """LLaVA-NeXT / OneVision: each image's assembled tokens (base tile, unpadded tile grid,
        budget, newlines), as `get_image_features`.

        Args:
            pixel_values: transformers' tiles `(I, T_max, C, S, S)` or stacked `(sum T_i, C, S, S)`.
            image_sizes: `(I, 2)` original `(height, width)`.

        Returns:
            One `(L_i, D_llm)` tensor per image.
        """
        from .anyres import assemble_tokens, num_tiles

        if self.anyres is None:
            raise ValueError(f"{self.family or 'this'} vision side has no anyres tiling; use image_tokens")
        rows = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        sizes = [tuple(int(v) for v in s) for s in rows]
        counts = [num_tiles(size, self.anyres) for size in sizes]
        if pixel_values.ndim == 5:
            pixel_values = torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts)])
        tiles = self.image_tokens(pixel_values)  # (sum T_i, s*s, D_llm)
        return [assemble_tokens(f, size, self.anyres, self.tile_side, self.image_newline)
                for f, size in zip(tiles.split(counts), sizes)]

    def num_image_tokens(self, grid_size: tuple[int, int]) -> int:
        """`T` of `image_tokens` for a patch grid `(h, w)` (one image or tile)."""
        tokens = None if self.feature_select == "patch" else 1 + grid_size[0] * grid_size[1]  # CLS + patches
        return self.connector.num_output_tokens(grid_size=grid_size, num_tokens=tokens)

    def extra_repr(self) -> str:
        return f"family={self.family!r}, layers={self.layers}, norm={self.norm}, feature_select={self.feature_select!r}"


def load_vision_side(source: str | os.PathLike, *, revision: str | None = None) -> VisionSide:
    """Load the vision side of a whole VLM checkpoint (a directory or hub repo id).

    Args:
        source: A model spec naming a whole checkpoint of one of `VISION_SIDE_TYPES` (see the
            module docstring): a directory or a hub repo id (`specs.models.parse_model_spec`).
        revision: Hub revision for a repo id.

    Returns:
        The `VisionSide` in eval mode, float32.

    Raises:
        ValueError: Another `model_type` (the supported ones are listed), or a spec of another
            scheme (`timm:`, `open_clip:`, `preset:`: towers without a VLM's connector).
        FileNotFoundError: Missing files (a hub id not cached offline says so in one line).
        WeightsError: The tower's or the connector's keys are not the family's.
    """
    from .loading import CONFIG_FILE, load_encoder_files, read_config_file
    from .specs.files import SourceFiles
    from .specs.models import parse_model_spec

    spec = parse_model_spec(source)
    if spec.scheme not in ("path", "hub"):
        raise ValueError(f"model {spec.text!r}: load_vision_side reads a whole VLM checkpoint (a directory or hub "
                         f"repo id), not a {spec.scheme} spec")
    source = spec.name
    files = SourceFiles(source, revision)
    config = read_config_file(files.get(CONFIG_FILE))
    model_type = config.get("model_type")
    if model_type not in VISION_SIDE_TYPES:
        raise ValueError(
            f"{files.source}: model_type={model_type!r} has no vision-side loader; "
            f"supported: {', '.join(VISION_SIDE_TYPES)}"
        )
    encoder = load_encoder_files(source, revision=revision).eval()
    options: dict[str, Any] = {}
    if model_type in LLAVA_TYPES:
        connector, options = _llava(files, config, encoder)
    elif model_type in QWEN_TYPES:
        connector, options = _qwen_merger(files, config, model_type)
    elif model_type == "kimi_k25":
        from .converters import hf_kimi_k25

        connector, options = hf_kimi_k25.load_merger(source, revision=revision), {"norm": True}
    elif model_type == "deepseek_v4":
        from .converters import hf_deepseek_v4

        connector, options = hf_deepseek_v4.load_aligner(source, revision=revision), {"norm": True}
    elif model_type == "molmo2":
        from .converters.hf_connectors import load_molmo2_connector, molmo2_adapter_config

        layers = tuple(molmo2_adapter_config(config).vision_feature_layer)  # hidden_states[l + 1] (l >= 0) = layer l
        connector, options = load_molmo2_connector(source, revision=revision), {"layers": layers}
    elif model_type == "llama4":
        from .converters.hf_connectors import load_llama4_connector

        connector, options = load_llama4_connector(source, revision=revision), {"norm": True}
    elif model_type == "perception_lm":
        from .converters.hf_connectors import load_perception_lm_connector

        connector, options = load_perception_lm_connector(source, revision=revision), {"norm": True}
    else:
        from .converters.hf_gemma4 import load_gemma_projector

        connector, options = load_gemma_projector(source, revision=revision), {"norm": model_type == "gemma3"}
    return VisionSide(encoder, connector.eval(), family=model_type, **options).eval()


def _tensors(
    files: Any, prefixes: tuple[str, ...], parts: tuple[str, ...] = ("",)
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors under `prefix + part` for the first of `prefixes` that the weights hold (only
    the shards holding them are read), without the prefix."""
    from .loading import read_weights

    wanted = tuple(p + part for p in prefixes for part in parts)
    tensors, _, read = read_weights(files, None, lambda key: key.startswith(wanted))
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in tensors)), prefixes[0])
    where = f"{files.source} ({', '.join(read)})"
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, where


def _llava(files: Any, config: dict[str, Any], encoder: VisionEncoder) -> tuple[Projector, dict[str, Any]]:
    import transformers

    from .projectors import build_projector, convert_hf_llava_projector
    from .vlm.llava import llava_vision_options
    from .weights import WeightsError, load_state_dict_strict, naming

    hf_config = transformers.AutoConfig.for_model(**config)
    if hf_config.projector_hidden_act != "gelu":
        raise ValueError(f"{files.source}: projector_hidden_act={hf_config.projector_hidden_act!r}; "
                         "only 'gelu' (mlp2x_gelu) is supported")
    layers, feature_select, anyres = llava_vision_options(files.source, config["model_type"], hf_config, encoder)
    state, where = _tensors(files, ("model.multi_modal_projector.", "multi_modal_projector."))
    with naming(where):
        if "linear_1.weight" not in state or "linear_2.weight" not in state:
            raise WeightsError(f"no multi_modal_projector.linear_1 / linear_2 weights (found {sorted(state)[:8]})")
        first, last = state["linear_1.weight"], state["linear_2.weight"]
        connector = build_projector(
            "mlp2x_gelu", (encoder.width,) * len(layers), int(last.shape[0]), bias=hf_config.multimodal_projector_bias,
            **({"hidden_dim": int(first.shape[0])} if first.shape[0] != last.shape[0] else {}),
        )
        load_state_dict_strict(connector, convert_hf_llava_projector(state), source=where)
        newline = None
        if anyres is not None:
            newline, _ = _tensors(files, ("model.image_newline", "image_newline"))
            if set(newline) != {""}:
                raise WeightsError("no image_newline tensor")
            newline = newline[""].float()
    return connector, dict(layers=layers, feature_select=feature_select, anyres=anyres, image_newline=newline)


def _qwen_merger(files: Any, config: dict[str, Any], model_type: str) -> tuple[Projector, dict[str, Any]]:
    from .projectors import load_qwen2_5_vl_merger, load_qwen3_vl_merger
    from .weights import naming

    vision = config.get("vision_config") or {}
    merge = int(vision.get("spatial_merge_size", 2))
    state, where = _tensors(files, ("model.visual.", "visual."), ("merger.", "deepstack_merger_list."))
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    with naming(where):
        if model_type == "qwen2_5_vl":
            return load_qwen2_5_vl_merger(part("merger."), scale_factor=merge), {}
        taps = tuple(vision.get("deepstack_visual_indexes") or ())  # Qwen3.5: none
        deepstack = [
            load_qwen3_vl_merger(part(f"deepstack_merger_list.{j}."), scale_factor=merge, norm_after_merge=True)
            for j in range(len(taps))
        ]
        merger = load_qwen3_vl_merger(part("merger."), scale_factor=merge)
        return merger, dict(deepstack_layers=taps, deepstack_connectors=deepstack)
