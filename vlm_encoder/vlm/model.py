"""`VisionLanguageModel`: a vision encoder, a projector and any Hugging Face causal LM.

Data flow (the transformers LLaVA convention):
  image `(I, C, H, W)` -> encoder layers `feature_layers` -> [drop CLS] -> projector
  -> image tokens `(I, M, d_llm)`;
  text `(B, L)` holding one placeholder id (`image_token_id`) per image token -> LM input
  embeddings `(B, L, d_llm)` with the image tokens written at the placeholders, in order
  (sample 0's images first) -> `language_model(inputs_embeds=...)`.

Any resolution (`anyres=AnyresConfig(...)`, LLaVA-NeXT / LLaVA-OneVision / InternVL): each
image comes as `T_i` encoder-sized tiles (`vlm_encoder.anyres.tile_image`); all tiles of all
images are encoded and projected in one batch, then each image's tiles are assembled into one
token sequence of its own length `L_i` (base tokens, the unpadded tile grid, a learned
`image_newline` after each row); the text holds `L_i` placeholders for image `i`
(`num_image_tokens(image_size)` gives `L_i` before encoding).

Several towers (Prismatic's DINOv2 + SigLIP, Cambrian): `encoder` may be a list of encoders,
each with its own image size and processor; their patch grids are brought to one grid
`tower_grid` (`tower_resize`: bilinear `interpolate` or adaptive average `pool`), then the
projector fuses every tower's layers (`in_dim` lists one width per tower layer, in order);
`pixel_values` is then one tensor per tower (`preprocess(images)` gives them).

DeepStack (Qwen3-VL, `deepstack.py`): `deepstack_layers` are further encoder layers, each
projected by its own projector (`deepstack_projectors`, any kind giving the main projector's
token count) and added to the LM's hidden states at the image positions after decoder layer
0, 1, ... in turn. `positions='mrope'` gives the LM the position ids of its own `get_rope_index`
(Qwen3-VL's multimodal RoPE: each image token at its `(t, h, w)` place on the merged grid).

By default the encoder(s) and the LM are frozen and only the projector(s) train (LLaVA's
stage-1 feature alignment); `set_trainable` switches each part.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..anyres import AnyresConfig, assemble_tokens
from ..anyres import num_image_tokens as anyres_num_image_tokens
from ..anyres import num_tiles as anyres_num_tiles
from ..encoder import VisionEncoder

FeatureSelect = Literal["patch", "cls_patch"]
Positions = Literal["sequence", "mrope"]
POSITIONS = ("sequence", "mrope")
FEATURE_SELECTS = ("patch", "cls_patch")
TowerResize = Literal["interpolate", "pool"]
TOWER_RESIZES = ("interpolate", "pool")
IGNORE_INDEX = -100
PixelValues = torch.Tensor | Sequence[torch.Tensor]


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int], mode: TowerResize) -> torch.Tensor:
    """Row-major patch tokens `(B, h*w, D)` on `grid` to `(B, h'*w', D)` on `new_grid`.

    `interpolate`: the projectors' bilinear resampling (`projectors.resample_tokens`:
    `align_corners=False`, antialiased when a side shrinks); `pool`: adaptive average pooling
    (`F.adaptive_avg_pool2d`; growing a side repeats patches). Computed in float32 and cast
    back; a stream already on `new_grid` is returned as it is.
    """
    from ..projectors.fusion import resample_tokens
    from ..projectors.kind import grid_to_tokens, tokens_to_grid

    if tuple(grid) == tuple(new_grid):
        return tokens
    if mode == "interpolate":
        return resample_tokens(tokens, grid, new_grid)
    fmap = F.adaptive_avg_pool2d(tokens_to_grid(tokens.float(), grid), tuple(new_grid))  # (B, D, h', w')
    return grid_to_tokens(fmap).to(tokens.dtype)


def expand_image_tokens(
    input_ids: Sequence[int], image_token_id: int, num_image_tokens: int | Sequence[int]
) -> list[int]:
    """Repeat every image placeholder id `num_image_tokens` times (one id per image token).

    Args:
        input_ids: One sequence of token ids holding one `image_token_id` per image.
        image_token_id: The placeholder id (`<image>`).
        num_image_tokens: `M`, the projector's tokens per image (`vlm.num_image_tokens()`),
            or one count per placeholder, in order (any-resolution images differ).

    Returns:
        The expanded ids as a list.
    """
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim != 1:
            raise ValueError(f"expand_image_tokens takes one sequence (L,), got shape {tuple(input_ids.shape)}; expand each row, then pad")
        input_ids = input_ids.tolist()
    n_images = sum(token == image_token_id for token in input_ids)
    if isinstance(num_image_tokens, int):
        counts = iter([num_image_tokens] * n_images)
    else:
        if len(num_image_tokens) != n_images:
            raise ValueError(f"{len(num_image_tokens)} token counts given for {n_images} image placeholder(s) ({image_token_id})")
        counts = iter(num_image_tokens)
    out: list[int] = []
    for token in input_ids:
        out.extend([token] * next(counts) if token == image_token_id else [token])
    return out


def hf_layer_to_block(hf_index: int, depth: int) -> int:
    """An index into HF's `hidden_states` (`depth + 1` entries, the embeddings first) as our
    block index: `hidden_states[k]` is block `k` for `k < 0` and block `k - 1` for `k >= 1`.

    Raises:
        ValueError: `k == 0` or `k == -(depth + 1)` (the embedding output, not a block
            output) or an index out of range.
    """
    if not -(depth + 1) <= hf_index <= depth:
        raise ValueError(f"vision_feature_layer {hf_index} is out of range for a tower of {depth} blocks")
    if hf_index == 0 or hf_index == -(depth + 1):
        raise ValueError(
            f"vision_feature_layer {hf_index} selects HF hidden_states[0], the embedding output before the first "
            "block; only block outputs (hidden_states[1:]) are supported"
        )
    return hf_index if hf_index < 0 else hf_index - 1


class VisionLanguageModel(nn.Module):
    """Feeds projected image tokens into a causal LM (LLaVA-style).

    Args:
        encoder: The vision encoder, or a list of them (several towers, each fed its own
            `pixel_values`).
        projector: A `projectors.Projector` with one input stream per feature layer (per
            tower, in order), each of its encoder's width, and `out_dim` equal to the LM's
            hidden size.
        language_model: Any `AutoModelForCausalLM` (it must accept `inputs_embeds`).
        image_token_id: The placeholder id; the text holds one per image token.
        feature_layers: Encoder blocks whose tokens the projector fuses (negatives from the
            end; `-2` is LLaVA's default, HF `hidden_states[-2]`). Several towers: the same
            layers for each, or one sequence of layers per tower.
        feature_select: `patch` (drop CLS, LLaVA's `default`) or `cls_patch` (CLS then
            patches, LLaVA's `full`; needs a per-token projector or the resampler).
        train_encoder: Train the encoder (default frozen).
        train_projector: Train the projector (default yes).
        train_language_model: Train the LM (default frozen).
        anyres: Any-resolution tiling and assembly (`None`: one fixed-size image per
            placeholder group). Needs `feature_select='patch'` and a projector whose output per
            tile is a square grid (token-wise kinds, `pixel_shuffle`, `pool`, ...); for
            `llava_next` with `newline`, adds the learned `image_newline` `(d_llm,)`, trained
            with the projector. One tower only.
        tower_grid: Several towers: the common patch grid `(h, w)` (an int: square) the
            towers' tokens are resized to before fusion. Default: the projector's
            `fusion_grid`, else the first tower's grid.
        tower_resize: Several towers: `interpolate` (bilinear) or `pool` (adaptive average),
            see `resize_tokens`.
        deepstack_layers: DeepStack: encoder blocks whose tokens, each through its own
            projector, are added to the LM's hidden states at the image positions after
            decoder layer 0, 1, ... (Qwen3-VL's `deepstack_visual_indexes`). One tower, no
            anyres, `feature_select='patch'`.
        deepstack_projectors: One `Projector` per tapped layer (any kind; one stream of the
            encoder's width in, the LM's width out, as many tokens per image as `projector`);
            trained with `projector`.
        positions: `sequence` (the LM's own positions, 0, 1, ...) or `mrope`: the position ids
            of the LM's `model.get_rope_index` (a transformers Qwen3-VL / Qwen3.5 model without
            its vision tower), where each image token sits at its place on the merged patch grid.
    """

    def __init__(
        self,
        encoder: VisionEncoder | Sequence[VisionEncoder],
        projector: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
        feature_layers: Sequence[int] | Sequence[Sequence[int]] = (-2,),
        feature_select: FeatureSelect = "patch",
        *,
        train_encoder: bool = False,
        train_projector: bool = True,
        train_language_model: bool = False,
        anyres: AnyresConfig | None = None,
        tower_grid: int | tuple[int, int] | None = None,
        tower_resize: TowerResize = "interpolate",
        deepstack_layers: Sequence[int] = (),
        deepstack_projectors: Sequence[nn.Module] = (),
        positions: Positions = "sequence",
    ) -> None:
        super().__init__()
        from ..projectors import Projector
        from ..validation import optional_positive_pair

        if not isinstance(projector, Projector):
            raise TypeError(f"projector must be a projectors.Projector, got {type(projector).__name__}")
        if feature_select not in FEATURE_SELECTS:
            raise ValueError(f"feature_select={feature_select!r} is not supported; allowed: {', '.join(FEATURE_SELECTS)}")
        towers = [encoder] if isinstance(encoder, VisionEncoder) else list(encoder)
        if not towers or not all(isinstance(t, VisionEncoder) for t in towers):
            raise TypeError("encoder must be a VisionEncoder or a non-empty sequence of VisionEncoders")
        self.tower_layers = tuple(
            tuple(tower.resolve_layers(tuple(layers))) for tower, layers in zip(towers, _layers_per_tower(feature_layers, len(towers)))
        )
        widths = tuple(tower.width for tower, layers in zip(towers, self.tower_layers) for _ in layers)
        pc = projector.config
        if pc.num_inputs != len(widths):
            raise ValueError(
                f"the projector fuses {pc.num_inputs} stream(s) (in_dim={pc.in_dim}) but feature_layers "
                f"{tuple(feature_layers)} gives {len(widths)}"
            )
        if pc.in_dims != widths:
            which = "encoder width" if len(towers) == 1 else "encoder widths per feature layer"
            raise ValueError(f"projector in_dim={pc.in_dim} does not match the {which} {widths if len(towers) > 1 else widths[0]}")
        if tower_resize not in TOWER_RESIZES:
            raise ValueError(f"tower_resize={tower_resize!r} is not supported; allowed: {', '.join(TOWER_RESIZES)}")
        self.tower_grid = None  # the common grid of several towers
        if len(towers) > 1:
            if feature_select != "patch" or anyres is not None:
                raise ValueError("several towers need feature_select='patch' and anyres=None: their patch grids are resized")
            grid = optional_positive_pair(tower_grid, "tower_grid") or pc.fusion_grid or towers[0].config.grid_size
            if pc.fusion_grid is not None and tuple(pc.fusion_grid) != tuple(grid):
                raise ValueError(f"tower_grid {tuple(grid)} differs from the projector's fusion_grid {tuple(pc.fusion_grid)}")
            self.tower_grid = tuple(grid)
        elif tower_grid is not None:
            raise ValueError("tower_grid is for several encoders; this model has one")
        self.tower_resize = tower_resize
        encoder = towers[0]
        if feature_select == "cls_patch":
            if encoder.cls_token is None:
                raise ValueError("feature_select='cls_patch' needs an encoder with a CLS token; use 'patch'")
            if projector.body.needs_grid:
                raise ValueError(
                    f"feature_select='cls_patch' needs a projector that takes any token set (linear, mlp{{N}}x_gelu, "
                    f"identity, resampler); kind {pc.kind!r} works on the patch grid"
                )
        embeddings = language_model.get_input_embeddings()
        if embeddings.embedding_dim != pc.out_dim:
            raise ValueError(f"projector out_dim={pc.out_dim} does not match the LM's hidden size {embeddings.embedding_dim}")
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int) or image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative int, got {image_token_id!r}")
        self.anyres = anyres
        self.tile_side = 0  # side of one tile's projected token grid (anyres only)
        newline = None
        if anyres is not None:
            self.tile_side = self._anyres_tile_side(anyres, encoder, projector, feature_select)
            if anyres.policy == "llava_next" and anyres.newline:
                d_llm = pc.out_dim  # initialised as transformers' LlavaNextModel does
                newline = nn.Parameter(torch.randn(d_llm, dtype=embeddings.weight.dtype) / d_llm**0.5)
        self.image_newline = newline  # (d_llm,) or None
        self.deepstack_layers = self._check_deepstack(
            deepstack_layers, deepstack_projectors, encoder, language_model, len(towers), anyres, feature_select
        )
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} is not supported; allowed: {', '.join(POSITIONS)}")
        if positions == "mrope" and not callable(getattr(getattr(language_model, "model", None), "get_rope_index", None)):
            raise ValueError(
                f"positions='mrope' takes the position ids of the LM's model.get_rope_index (a transformers Qwen3-VL "
                f"model); {type(language_model).__name__} has none"
            )
        self.positions = positions
        self.encoders = nn.ModuleList(towers)
        self.projector = projector
        self.deepstack_projectors = nn.ModuleList(deepstack_projectors)
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.feature_select = feature_select
        self.trainable: dict[str, bool] = {}
        self.set_trainable(encoder=train_encoder, projector=train_projector, language_model=train_language_model)

    @staticmethod
    def _check_deepstack(
        layers: Sequence[int], projectors: Sequence[nn.Module], encoder: VisionEncoder, language_model: nn.Module,
        n_towers: int, anyres: AnyresConfig | None, feature_select: str,
    ) -> tuple[int, ...]:
        """The DeepStack layers as block indices, after checking the arguments."""
        from .deepstack import check_deepstack, decoder_layers

        if not layers and not projectors:
            return ()
        if n_towers > 1 or anyres is not None or feature_select != "patch":
            raise ValueError("DeepStack needs one tower, anyres=None and feature_select='patch'")
        check_deepstack(layers, projectors, encoder.width, language_model.get_input_embeddings().embedding_dim)
        n_decoder = len(decoder_layers(language_model))
        if len(layers) > n_decoder:
            raise ValueError(f"{len(layers)} DeepStack layers, but the LM has {n_decoder} decoder layers to add them to")
        return tuple(encoder.resolve_layers(tuple(layers)))

    @staticmethod
    def _anyres_tile_side(anyres: AnyresConfig, encoder: VisionEncoder, projector: nn.Module, feature_select: str) -> int:
        if not isinstance(anyres, AnyresConfig):
            raise TypeError(f"anyres must be an AnyresConfig, got {type(anyres).__name__}")
        if feature_select != "patch":
            raise ValueError("anyres needs feature_select='patch': tiles are reassembled on their patch grids")
        stride = encoder.config.input_stride
        if anyres.tile_size % stride and encoder.config.patch_remainder == "error":
            raise ValueError(
                f"anyres tile_size={anyres.tile_size} is not a multiple of the encoder's patch stride {stride} "
                "(an encoder with patch_remainder='drop' floors each tile's grid, as LLaVA-OneVision's SigLIP at 384/14)"
            )
        side = anyres.tile_size // stride
        m = projector.num_output_tokens(grid_size=(side, side))
        out_side = math.isqrt(m)
        if out_side * out_side != m:
            raise ValueError(
                f"anyres reassembles each tile's projected tokens as a square grid, but kind {projector.config.kind!r} "
                f"gives {m} tokens for a {side}x{side} tile"
            )
        return out_side

    @property
    def encoder(self) -> VisionEncoder:
        """The vision encoder of a one-tower model (several towers: `encoders`)."""
        if len(self.encoders) > 1:
            raise ValueError(f"this model has {len(self.encoders)} vision towers: use vlm.encoders[i]")
        return self.encoders[0]

    @property
    def feature_layers(self) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
        """The encoder's feature layers (block indices); several towers: one tuple per tower."""
        return self.tower_layers[0] if len(self.encoders) == 1 else self.tower_layers

    def _part(self, name: str) -> nn.Module:
        if name == "projector":  # the DeepStack projectors train with the main one
            return nn.ModuleList([self.projector, *self.deepstack_projectors])
        return self.encoders if name == "encoder" else getattr(self, name)

    # ------------------------------------------------------------- training
    def set_trainable(
        self, encoder: bool | None = None, projector: bool | None = None, language_model: bool | None = None
    ) -> None:
        """Freeze or unfreeze each part (`None` leaves it as it is). A frozen part has
        `requires_grad=False` and stays in eval mode when `.train()` is called."""
        for name, flag in (("encoder", encoder), ("projector", projector), ("language_model", language_model)):
            if flag is None:
                continue
            self.trainable[name] = bool(flag)
            self._part(name).requires_grad_(bool(flag))
        if projector is not None and self.image_newline is not None:
            self.image_newline.requires_grad_(bool(projector))
        self.train(self.training)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        for name, flag in self.trainable.items():
            if not flag:
                self._part(name).eval()
        return self

    # --------------------------------------------------------------- images
    def num_image_tokens(self, image_size: tuple[int, int] | None = None, base_only: bool = False) -> int:
        """`M`, the image tokens per image at `image_size` `(H, W)` (default: the encoder's).

        With `anyres`, `image_size` is the original image's size (required) and the result is
        its assembled sequence length `L` (computed before encoding); `base_only`: an image of
        a multi-image sample under `anyres.multi_image='base'` (its base tile and a newline).
        """
        if self.anyres is not None:
            if image_size is None:
                raise ValueError("with anyres the token count depends on the image: pass image_size=(height, width)")
            return anyres_num_image_tokens(image_size, self.anyres, self.tile_side, base_only)
        if self.tower_grid is not None:
            if image_size is not None:
                raise ValueError("a model of several towers gives tower_grid's token count for every image; pass no image_size")
            return self.projector.num_output_tokens(grid_size=self.tower_grid)
        c = self.encoder.config
        if image_size is None:
            grid = c.grid_size
        else:
            grid = (image_size[0] // c.input_stride, image_size[1] // c.input_stride)
        if self.feature_select == "cls_patch":
            return self.projector.num_output_tokens(num_tokens=1 + grid[0] * grid[1])
        return self.projector.num_output_tokens(grid_size=grid)

    def expand_image_tokens(
        self, input_ids: Sequence[int], image_size: tuple[int, int] | Sequence[tuple[int, int]] | None = None
    ) -> list[int]:
        """`expand_image_tokens` with this model's placeholder id and `M`.

        Args:
            input_ids: One sequence holding one placeholder per image.
            image_size: One `(H, W)` for every image, or one per placeholder in order (a list
                or an `(I, 2)` tensor: anyres images of different sizes get different counts).
        """
        if isinstance(image_size, torch.Tensor):
            image_size = image_size.tolist()
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        # LLaVA-OneVision: the images of a sample holding several are base tiles only.
        base_only = self.anyres is not None and self.anyres.multi_image == "base" and ids.count(self.image_token_id) > 1
        if image_size is not None and len(image_size) and not isinstance(image_size[0], int):
            counts = [self.num_image_tokens(tuple(s), base_only) for s in image_size]
            return expand_image_tokens(input_ids, self.image_token_id, counts)
        return expand_image_tokens(input_ids, self.image_token_id, self.num_image_tokens(image_size, base_only))

    def preprocess(self, images: Any) -> list[torch.Tensor]:
        """Each tower's `image_processor` applied to `images` (one image or a list): one
        `(I, 3, H_t, W_t)` tensor per tower, the `pixel_values` of a model of several towers."""
        return [tower.image_processor(images) for tower in self.encoders]

    def tower_features(self, pixel_values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The projector's input streams of a model of several towers: for each tower (in
        order) and each of its feature layers, the patch tokens resized to `tower_grid`.

        Args:
            pixel_values: One `(I, C, H_t, W_t)` tensor per tower, each normalised by its
                tower's processor (`preprocess`).

        Returns:
            One `(I, h*w, D_t)` tensor per stream, `(h, w) = tower_grid`.
        """
        if isinstance(pixel_values, torch.Tensor) or len(pixel_values) != len(self.encoders):
            got = "one tensor" if isinstance(pixel_values, torch.Tensor) else f"{len(pixel_values)}"
            raise ValueError(f"this model has {len(self.encoders)} vision towers: pass one pixel tensor per tower "
                             f"(vlm.preprocess(images)), got {got}")
        streams = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable.get("encoder", False)):
            for tower, layers, pixels in zip(self.encoders, self.tower_layers, pixel_values):
                out = tower(pixels.to(next(tower.parameters()).dtype), layers=layers)
                streams += [resize_tokens(t, out.grid_size, self.tower_grid, self.tower_resize) for t in out.patch_tokens]
        return streams

    def image_features(self, pixel_values: PixelValues) -> torch.Tensor:
        """Projected image tokens.

        Args:
            pixel_values: Normalised images `(I, C, H, W)`; several towers: one such tensor
                per tower (`preprocess`).

        Returns:
            `(I, M, d_llm)` in the LM's embedding dtype.
        """
        return self.image_and_deepstack_features(pixel_values)[0]

    def image_and_deepstack_features(self, pixel_values: PixelValues) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`image_features` and the DeepStack features, from one pass of the encoder.

        Returns:
            The image tokens `(I, M, d_llm)` and one `(I, M, d_llm)` tensor per DeepStack layer
            (`deepstack_projectors[j]` on block `deepstack_layers[j]`; none without DeepStack),
            in the LM's embedding dtype.
        """
        dtype = self.language_model.get_input_embeddings().weight.dtype
        if self.tower_grid is not None:
            return self.projector(self.tower_features(pixel_values), grid_size=self.tower_grid).to(dtype), []
        if not isinstance(pixel_values, torch.Tensor):
            if len(pixel_values) != 1:
                raise ValueError(f"this model has one vision tower, got {len(pixel_values)} pixel tensors")
            pixel_values = pixel_values[0]
        param = next(self.encoder.parameters())
        layers = tuple(dict.fromkeys(self.feature_layers + self.deepstack_layers))  # each block once, in order asked
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable.get("encoder", False)):
            out = self.encoder(pixel_values.to(param.dtype), layers=layers)
        if self.feature_select == "patch":
            features = self.projector([out.patches(l) for l in self.feature_layers], grid_size=out.grid_size)
        else:
            streams = [torch.cat([out.cls(l).unsqueeze(1), out.patches(l)], dim=1) for l in self.feature_layers]
            features = self.projector(streams)  # (I, 1 + N, D) per layer
        deep = [proj(out.patches(l), grid_size=out.grid_size) for proj, l in zip(self.deepstack_projectors, self.deepstack_layers)]
        for j, tokens in enumerate(deep):
            if tokens.shape != features.shape:
                raise ValueError(
                    f"DeepStack projector {j} gives {tuple(tokens.shape)} tokens, the image tokens are {tuple(features.shape)}: "
                    "each must give as many tokens per image as the main projector"
                )
        return features.to(dtype), [tokens.to(dtype) for tokens in deep]

    def anyres_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | Sequence,
        base_only: Sequence[bool] | None = None,
    ) -> list[torch.Tensor]:
        """Each image's assembled token sequence (`anyres` models).

        All tiles of all images are encoded and projected in one batch.

        Args:
            pixel_values: The tiles of every image, base image first
                (`vlm_encoder.anyres.stack_tiles`): `(sum T_i, C, S, S)`, or transformers'
                layout `(I, T_max, C, S, S)` padded with unused tiles.
            image_sizes: `(I, 2)` original `(height, width)` of each image.
            base_only: Per image, whether only its base tile was given (an image of a
                multi-image sample under `anyres.multi_image='base'`); default none.

        Returns:
            One `(L_i, d_llm)` tensor per image, `L_i = num_image_tokens(image_sizes[i], base_only[i])`.
        """
        if self.anyres is None:
            raise ValueError("this model has no anyres config; use image_features")
        sizes = [tuple(int(v) for v in size) for size in (image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes)]
        flags = [False] * len(sizes) if base_only is None else [bool(b) for b in base_only]
        if len(flags) != len(sizes):
            raise ValueError(f"base_only has {len(flags)} entries for {len(sizes)} images")
        counts = [anyres_num_tiles(size, self.anyres, flag) for size, flag in zip(sizes, flags)]
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(sizes) or pixel_values.shape[1] < max(counts):
                raise ValueError(
                    f"pixel_values {tuple(pixel_values.shape)} do not hold {len(sizes)} images of up to {max(counts)} tiles"
                )
            pixel_values = torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts)])
        if pixel_values.ndim != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"the image sizes {sizes} need {counts} tiles (sum {sum(counts)}), got pixel_values {tuple(pixel_values.shape)}"
            )
        tiles = self.image_features(pixel_values)  # (sum T_i, s*s, d)
        return [
            assemble_tokens(features, size, self.anyres, self.tile_side, self.image_newline, flag)
            for features, size, flag in zip(tiles.split(counts), sizes, flags)
        ]

    # ------------------------------------------------------------------ text
    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: PixelValues | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence | None = None,
        batch_num_images: Sequence[int] | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The LM's keyword arguments with the image tokens placed at the placeholders.

        Args:
            input_ids: `(B, L)` text ids holding `M` placeholder ids per image
                (`expand_image_tokens`); samples may have several images or none.
            pixel_values: `(I, C, H, W)`, the images in the order their placeholders appear
                (sample 0's first), or `None` for text only. With `anyres`: the tiles, as
                `anyres_image_features` takes them. Several towers: one such tensor per tower.
            attention_mask: `(B, L)`; default all ones.
            labels: `(B, L)` next-token targets; image positions are set to -100.
            image_sizes: `anyres` only: `(I, 2)` original `(height, width)` of each image;
                image `i` fills the next `num_image_tokens(image_sizes[i])` placeholders.
            batch_num_images: `anyres.multi_image='base'` only (LLaVA-OneVision): the number
                of images of each sample, as transformers takes it; the images of a sample
                holding several are then base tiles only. Default: every image tiled.

        Returns:
            `{"inputs_embeds": (B, L, d_llm), "attention_mask": (B, L)}` plus `"labels"` when
            given; with `positions='mrope'` and images, `"position_ids"` `(3, B, L)` (the LM's
            `get_rope_index`); with DeepStack and images, transformers' Qwen3-VL names
            `"visual_pos_masks"` `(B, L)` (the image positions) and `"deepstack_visual_embeds"`
            (one `(n_image_tokens, d_llm)` tensor per tapped layer, in placeholder order), which
            `forward` / `generate` add inside the LM (`deepstack.deepstack_hooks`) rather than pass.

        Raises:
            ValueError: The number of placeholder ids differs from the number of image
                features (both counts are named), or a sample's count is not a multiple of `M`.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        is_image = input_ids == self.image_token_id  # (B, L)
        n_tokens = int(is_image.sum())
        embed = self.language_model.get_input_embeddings()
        inputs_embeds = embed(input_ids.masked_fill(is_image, 0))  # (B, L, d); placeholder ids may lie outside the vocab
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image token ids ({self.image_token_id}) but no pixel_values were given")
        elif self.anyres is not None:
            if image_sizes is None:
                raise ValueError("an anyres model needs image_sizes (I, 2), the original (height, width) of each image")
            per_image = self.anyres_image_features(pixel_values, image_sizes, self._base_only(batch_num_images))
            lengths = [f.shape[0] for f in per_image]
            if n_tokens != sum(lengths):
                raise ValueError(
                    f"image tokens and image features do not match: input_ids hold {n_tokens} image token ids "
                    f"(id {self.image_token_id}) but the {len(lengths)} image(s) give {lengths} = {sum(lengths)} features; "
                    "expand each <image> placeholder with vlm.expand_image_tokens(ids, image_size=[(H, W), ...])"
                )
            # Each sample must end where an image ends (no image split across samples).
            ends = set(torch.tensor(lengths).cumsum(0).tolist()) | {0}
            sample_ends = is_image.sum(dim=1).cumsum(0).tolist()
            split = [b for b, end in enumerate(sample_ends) if end not in ends]
            if split:
                raise ValueError(f"sample {split[0]}'s image token ids end inside an image (image lengths {lengths})")
            features = torch.cat(per_image).to(inputs_embeds.dtype)  # (sum L_i, d)
            inputs_embeds = inputs_embeds.masked_scatter(is_image.unsqueeze(-1), features)
        else:
            if image_sizes is not None:
                raise ValueError("image_sizes are only used by anyres models (this one has anyres=None)")
            features, deep = self.image_and_deepstack_features(pixel_values)  # (I, M, d) each
            images, per_image = features.shape[:2]
            n_features = images * per_image
            if n_tokens != n_features:
                raise ValueError(
                    f"image tokens and image features do not match: input_ids hold {n_tokens} image token ids "
                    f"(id {self.image_token_id}) but the {images} image(s) give {images} x {per_image} = {n_features} "
                    f"features; expand each <image> placeholder to {per_image} ids with expand_image_tokens"
                )
            per_sample = is_image.sum(dim=1).tolist()
            bad = [(i, n) for i, n in enumerate(per_sample) if n % per_image]
            if bad:
                raise ValueError(
                    f"sample {bad[0][0]} holds {bad[0][1]} image token ids, not a multiple of the {per_image} tokens of an image"
                )
            # masked_scatter fills the placeholders in row-major order: sample 0's images first.
            inputs_embeds = inputs_embeds.masked_scatter(is_image.unsqueeze(-1), features.to(inputs_embeds.dtype))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if labels is not None:
            out["labels"] = labels.masked_fill(is_image, IGNORE_INDEX)
        if pixel_values is not None and self.deepstack_layers:
            out["visual_pos_masks"] = is_image
            out["deepstack_visual_embeds"] = [tokens.flatten(0, 1) for tokens in deep]  # (I*M, d), placeholder order
        if pixel_values is not None and self.positions == "mrope":
            out["position_ids"] = self._mrope_position_ids(input_ids, attention_mask, self._image_grid_thw(pixel_values))
        return out

    def _image_grid_thw(self, pixel_values: PixelValues) -> torch.Tensor:
        """`(I, 3)` rows `(1, h, w)`: each image's patch grid, as Qwen-VL's `image_grid_thw`."""
        pixels = pixel_values if isinstance(pixel_values, torch.Tensor) else pixel_values[0]
        stride = self.encoder.config.input_stride
        grid = (pixels.shape[-2] // stride, pixels.shape[-1] // stride)
        return torch.tensor([[1, *grid]] * pixels.shape[0], device=pixels.device)

    def _mrope_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """`(3, B, L)` from the LM's own `get_rope_index` (image placeholders are its image tokens)."""
        token_type = (input_ids == self.image_token_id).int()  # 1: image, 0: text
        positions, _ = self.language_model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_type, image_grid_thw=grid_thw, attention_mask=attention_mask
        )
        return positions

    def _base_only(self, batch_num_images: Sequence[int] | torch.Tensor | None) -> list[bool] | None:
        """Per image, whether it is a base tile only (`multi_image='base'`, a sample of several)."""
        if batch_num_images is None:
            return None
        if self.anyres is None or self.anyres.multi_image != "base":
            raise ValueError("batch_num_images is only used with anyres.multi_image='base' (LLaVA-OneVision)")
        counts = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else list(batch_num_images)
        return [n > 1 for n in counts for _ in range(int(n))]

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: PixelValues | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence | None = None,
        batch_num_images: Sequence[int] | torch.Tensor | None = None,
        **lm_kwargs: Any,
    ) -> Any:
        """Run the LM on text with image tokens; returns the LM's own output (`.logits`,
        `.loss` when `labels` are given: next-token loss, image positions ignored).
        `image_sizes`, `batch_num_images`: anyres models only (see `prepare_inputs`)."""
        from .deepstack import deepstack_hooks

        inputs = self.prepare_inputs(input_ids, pixel_values, attention_mask, labels, image_sizes, batch_num_images)
        if "deepstack_visual_embeds" not in inputs:
            return self.language_model(**inputs, **lm_kwargs)
        mask, deep = inputs.pop("visual_pos_masks"), inputs.pop("deepstack_visual_embeds")
        with deepstack_hooks(self.language_model, mask, deep):
            return self.language_model(**inputs, **lm_kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: PixelValues | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence | None = None,
        batch_num_images: Sequence[int] | torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """`language_model.generate` from the prompt with image tokens (`image_sizes`,
        `batch_num_images`: anyres models only).

        Returns:
            The generated ids `(B, T)` only (what HF returns when decoding from `inputs_embeds`).
        """
        from .deepstack import deepstack_hooks

        inputs = self.prepare_inputs(input_ids, pixel_values, attention_mask, image_sizes=image_sizes,
                                     batch_num_images=batch_num_images)
        mask, deep = inputs.pop("visual_pos_masks", None), inputs.pop("deepstack_visual_embeds", None)
        if "position_ids" in inputs:
            # M-RoPE: the LM's generate computes the prompt's position ids itself (get_rope_index)
            # and continues them; it needs the ids, the image tokens' type and each image's grid.
            del inputs["position_ids"]
            inputs.update(input_ids=input_ids, mm_token_type_ids=(input_ids == self.image_token_id).int(),
                          image_grid_thw=self._image_grid_thw(pixel_values))
        if deep is None:
            out = self.language_model.generate(**inputs, **generate_kwargs)
        else:
            with deepstack_hooks(self.language_model, mask, deep):
                out = self.language_model.generate(**inputs, **generate_kwargs)
        return out[:, input_ids.shape[1]:] if "input_ids" in inputs else out

    def save_pretrained(self, save_directory: str | os.PathLike, *, language_model: bool = True) -> Path:
        """Write the whole model into `save_directory`:

            vlm_config.json        image_token_id, feature_layers, feature_select, anyres, trainable
                                   (several towers: num_encoders, tower_grid, tower_resize;
                                   DeepStack: deepstack_layers; positions unless 'sequence')
            encoder/               VisionEncoder.save_pretrained (with its image processor);
                                   several towers: encoder_0/, encoder_1/, ...
            projector/             Projector.save_pretrained
            deepstack_0/, ...      the DeepStack projectors (Projector.save_pretrained), if any
            language_model/        the LM's own save_pretrained (safetensors); left out with
                                   `language_model=False` (a frozen LM: give it to
                                   `from_pretrained(..., language_model=...)` instead)
            image_newline.safetensors   the learned newline token, when the model has one

        Everything is written into a temporary directory beside the target first, then moved
        in by renames (a new directory: one rename; an existing one: each file in one rename,
        each sub-directory after its old version is moved aside), so no entry is ever half
        written. Other files in an existing directory are kept.

        Returns:
            The directory.
        """
        from .saving import save_vlm

        return save_vlm(self, save_directory, language_model)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload what `save_pretrained` writes (the language model included), with a model
        card, to the hub repo `repo_id` (`vlm_encoder.hub.push_to_hub`)."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        language_model: nn.Module | str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> VisionLanguageModel:
        """Load a model written by `save_pretrained`.

        Args:
            path: The directory, or a hub repo id (`push_to_hub`'s; read through the hub cache).
            language_model: The LM, for a model saved with `language_model=False` (or to use
                another one): a module, or a directory read by `AutoModelForCausalLM`
                (never with remote code; a `positions='mrope'` model's by
                `AutoModelForImageTextToText`, its tower dropped). Default: the saved `language_model/`.
            dtype: Cast everything to this dtype (default: the LM's dtype).
            device: Where to put the model (with `device_map`: the towers and the projector).
            device_map: Placement of a language model read from a directory, passed to
                transformers' `AutoModelForCausalLM.from_pretrained` (`"auto"` spreads a big LM
                over the GPUs, then the CPU; needs accelerate). The LM is built on `meta` and
                loaded in place; the towers and projector go where its input embeddings are.
            **kwargs: Constructor options overriding the saved ones (e.g. `train_language_model=True`).

        Returns:
            The model in eval mode.

        Raises:
            FileNotFoundError: A missing part (named), or no LM saved and none given.
            WeightsError: A config that is not a VisionLanguageModel's, or weights that do not fit.
        """
        from .saving import load_vlm

        return load_vlm(path, language_model, dtype, device, device_map=device_map, **kwargs)

    # --------------------------------------------------------------- loading
    @classmethod
    def from_llava(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> VisionLanguageModel:
        """Load a transformers `LlavaForConditionalGeneration` checkpoint directory.

        The vision tower (CLIP, or SigLIP with `vision_feature_select_strategy='full'`) is
        converted to a `VisionEncoder`, the `multi_modal_projector` to an `mlp2x_gelu`
        `Projector` (one input stream per `vision_feature_layer`, fused by concatenation as
        transformers does), and the language model becomes an `AutoModelForCausalLM` sharing
        the loaded modules, so the same image and prompt give the same logits.

        Args:
            path: A local directory written by `LlavaForConditionalGeneration.save_pretrained`.
            dtype: Load in this dtype (default: as transformers does).
            device: Where to put the model.
            **kwargs: Passed to the constructor (e.g. `train_language_model=True`).

        Returns:
            The model in eval mode.

        Raises:
            ValueError: Not a LLaVA checkpoint, or a vision tower, activation or feature
                layer that is not supported.
        """
        from .llava import load_hf_llava

        return load_hf_llava(path, "llava", dtype=dtype, device=device, **kwargs)

    @classmethod
    def from_llava_next(cls, path: str | os.PathLike, **options: Any) -> VisionLanguageModel:
        """Load a transformers `LlavaNextForConditionalGeneration` checkpoint directory
        (`path`, with the `options` of `from_llava`: `dtype`, `device`, constructor options).

        As `from_llava`, plus any resolution: `anyres` is the checkpoint's
        `image_grid_pinpoints` at the tower's image size (`llava_next` policy, unpad,
        newline), and `image_newline` is loaded. Tile the images with
        `vlm_encoder.anyres.tile_image` (or pass transformers' `pixel_values` and
        `image_sizes` as they are); the same inputs give the same logits.

        Raises:
            ValueError: Not a LLaVA-NeXT checkpoint, `vision_feature_select_strategy='full'`
                with a CLS tower (transformers' own reshape fails on it), or what `from_llava`
                rejects.
        """
        from .llava import load_hf_llava

        return load_hf_llava(path, "llava_next", **options)

    @classmethod
    def from_llava_onevision(cls, path: str | os.PathLike, **options: Any) -> VisionLanguageModel:
        """Load a transformers `LlavaOnevisionForConditionalGeneration` checkpoint directory
        (LLaVA-OneVision: a SigLIP tower, `anyres_max_N` tiling; the `options` of `from_llava`).

        As `from_llava_next`, plus the token budget: `anyres.budget_tiles` is the `N` of the
        checkpoint's `vision_aspect_ratio` (`anyres_max_9`), so an image whose unpadded tile
        grid holds more than about `N` tiles' worth of tokens is downscaled bilinearly, as
        transformers does. Its multi-image path is reproduced too (`anyres.multi_image='base'`):
        in a sample holding several images each is its base tile only
        (`tile_image(..., base_only=True)`) and one newline; pass transformers'
        `batch_num_images` to `forward` / `generate`.

        Raises:
            ValueError: Not a LLaVA-OneVision checkpoint, a `vision_aspect_ratio` other than
                `anyres_max_N`, or what `from_llava_next` rejects.
        """
        from .llava import load_hf_llava

        return load_hf_llava(path, "llava_onevision", **options)

    @classmethod
    def from_qwen3_vl(cls, path: str | os.PathLike, **options: Any) -> VisionLanguageModel:
        """Load a transformers `Qwen3VLForConditionalGeneration` checkpoint directory (`path`,
        with the `options` of `from_llava`: `dtype`, `device`, constructor options); its MoE
        model's (`qwen3_vl_moe`) and Qwen3.5's (`qwen3_5`, `qwen3_5_moe`: no DeepStack) likewise.

        The tower becomes a `VisionEncoder`, its merger the `qwen_merger` projector on the last
        block, its DeepStack mergers `deepstack_projectors` on `deepstack_visual_indexes`; the
        LM is the loaded model without its tower (transformers' decoder, its multimodal RoPE via
        `positions='mrope'`, its `generate`). Images `(I, C, H, W)` of one size per call, sides
        multiples of `patch_size * spatial_merge_size`, normalised by the checkpoint's processor
        (mean = std = 0.5); the same images and prompt give the same logits and generation.

        Raises:
            ValueError: Not a Qwen3-VL / Qwen3.5 checkpoint, or a tower variant the encoder does not express.
        """
        from .qwen3_vl import load_hf_qwen3_vl

        return load_hf_qwen3_vl(path, **options)


def _layers_per_tower(feature_layers: Sequence[int] | Sequence[Sequence[int]], n_towers: int) -> list[Sequence[int]]:
    """`feature_layers` as one sequence of layers per tower (ints: the same for every tower)."""
    items = list(feature_layers)
    if all(isinstance(item, int) for item in items):
        return [items] * n_towers
    if len(items) != n_towers or any(isinstance(item, int) for item in items):
        raise ValueError(
            f"feature_layers must be a sequence of ints or one sequence of ints per tower ({n_towers}), got {feature_layers!r}"
        )
    return items
