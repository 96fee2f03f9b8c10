"""The ViT vision encoder ("An Image is Worth 16x16 Words") with a multi-layer feature API.

Data flow for an image `(B, C, H, W)`:
  [hybrid stem] -> patch embedding `(B, N, D)` + position table -> [CLS, registers, patches]
  `(B, T, D)` -> [LN pre] -> blocks 0..L-1 (pre-norm) -> final LN -> pooled `(B, D)`
  -> [projection `(B, E)`].
With `config.rope`, every block also rotates the patch tokens' queries and keys by a 2D
rotary table `(T, head_dim)` computed for the grid (`layers/rope.py`); with `config.attn_window`,
the blocks not in `config.full_attention_blocks` attend within windows of the grid (Qwen2.5-VL).
Layer `i` is the output of block `i`; negative indices count from the end. Only the blocks
up to the deepest requested layer run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn

from .config import VisionConfig
from .determinism import batch_invariant_call
from .layers import (
    AttentionPoolHead,
    Block,
    PatchEmbed,
    ResNetStem,
    Rope2d,
    RopeTable,
    WindowMask,
    build_norm,
    init_linears_and_norms,
    resample_patch_projection,
    resample_pos_embed,
    sincos_2d_pos_embed,
)
from .output import EncoderOutput
from .pretrained import PretrainedMixin

LayerSpec = Sequence[int] | Literal["all"]


class VisionEncoder(PretrainedMixin, nn.Module):
    """ViT image encoder returning CLS, register and patch tokens of any set of blocks.

    Args:
        config: The architecture.

    Example:
        >>> enc = create_encoder("vit_base_patch16_224")
        >>> out = enc(pixels, layers=(-2,))
        >>> out.patches(-2).shape  # (B, 196, 768)
    """

    config_class = VisionConfig
    model_type = "vlm_encoder.vision"

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.stem = ResNetStem(c.in_channels, c.stem_layers, c.stem_width) if c.stem_layers else None
        patch_in = self.stem.out_channels if self.stem is not None else c.in_channels
        self.patch_embed = PatchEmbed(patch_in, c.width, c.patch_size, bias=c.patch_bias)
        self.patch_norm = build_norm(c.norm_type, c.width, c.norm_eps) if c.patch_norm else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, c.num_class_tokens, c.width)) if c.class_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, c.num_register_tokens, c.width)) if c.num_register_tokens else None
        )
        grid = c.grid_size
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, grid[0] * grid[1], c.width)) if c.pos_embed == "learned" else None
        )
        # `factorized`: (2, P, D), the column (x) table then the row (y) table (Gemma 4's order).
        self.pos_embed_axes = (
            nn.Parameter(torch.zeros(2, c.pos_table_size, c.width)) if c.pos_embed == "factorized" else None
        )
        self.norm_pre = build_norm(c.norm_type, c.width, c.norm_eps) if c.norm_pre else nn.Identity()
        rates = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()  # also when built on meta
        self.blocks = nn.ModuleList(
            Block(
                c.width,
                c.num_heads,
                c.mlp_dim,
                mlp_type=c.mlp_type,
                act=c.act,
                qkv_bias=c.qkv_bias,
                norm_eps=c.norm_eps,
                layer_scale_init=c.layer_scale_init,
                drop_path=rate,
                qk_norm=c.qk_norm,
                attn_norm=c.attn_norm,
                mlp_norm=c.mlp_norm,
                norm_type=c.norm_type,
                qk_norm_scope=c.qk_norm_scope,
                v_norm=c.v_norm,
                sandwich_norm=c.sandwich_norm,
                clipped_linears=c.clipped_linears,
            )
            for rate in rates
        )
        self.rope = (
            Rope2d(c.head_dim, c.rope, c.rope_theta, c.rope_layout, c.rope_grid_offset, c.rope_ref_grid, c.rope_xy)
            if c.rope != "none"
            else None
        )
        self.norm = build_norm(c.norm_type, c.width, c.norm_eps) if c.final_norm else nn.Identity()
        self.attn_pool = (
            AttentionPoolHead(c.width, c.map_num_heads or c.num_heads, c.map_mlp_dim or c.mlp_dim, c.act, c.norm_eps)
            if c.pool == "map"
            else None
        )
        self.pooled_norm = nn.LayerNorm(c.width, eps=c.norm_eps) if c.pooled_norm else nn.Identity()
        self.proj = nn.Linear(c.width, c.embed_dim, bias=c.proj_bias) if c.embed_dim else None
        self.grad_checkpointing = False
        self._pos_cache: dict[tuple, torch.Tensor] = {}  # sin-cos tables only (see position_embedding)
        self._image_processor = None  # what a pretrained source records (see `image_processor`)
        self.source_info: dict = {}  # where a loader found the weights: family, source, ...
        self.reset_parameters()

    # ------------------------------------------------------------------ preprocessing
    @property
    def image_processor(self):
        """The tower's preprocessing (an `ImageProcessor`): what its source records, else the
        default for its config (resize to `image_size`, OpenAI CLIP mean/std)."""
        if self._image_processor is None:
            from .processing import ImageProcessor

            return ImageProcessor.default_for(self.config)
        return self._image_processor

    @image_processor.setter
    def image_processor(self, processor) -> None:
        self._image_processor = processor

    def get_image_processor(self):
        """The recorded preprocessing only (`None` for a preset): what `save_pretrained` writes."""
        return self._image_processor

    # ------------------------------------------------------------------ set-up
    def reset_parameters(self) -> None:
        """ViT initialisation: truncated normal (std 0.02) for linears and the position table."""
        init_linears_and_norms(self, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.pos_embed_axes is not None:
            nn.init.trunc_normal_(self.pos_embed_axes, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS (if any) then the registers."""
        return self.config.num_prefix_tokens

    # ---------------------------------------------------------------- helpers
    def resolve_layers(self, layers: LayerSpec) -> tuple[int, ...]:
        """Resolve a layer request to non-negative block indices, validating it.

        Args:
            layers: Block indices (negatives count from the end) or `"all"`.

        Returns:
            The indices in `[0, L)`, in the order asked.

        Raises:
            ValueError: An index out of range, a repeated layer, or an empty request.
        """
        L = self.num_blocks
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers must be a sequence of ints or 'all', got {layers!r}")
            return tuple(range(L))
        if isinstance(layers, int) or not isinstance(layers, Sequence) and not hasattr(layers, "__iter__"):
            raise TypeError(
                f"layers must be a sequence of block indices such as (-1,) or (-2, -1), got {layers!r}"
            )
        resolved = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layer indices must be ints, got {layer!r}")
            if not -L <= layer < L:
                raise ValueError(f"layer {layer} is out of range: this encoder has {L} blocks, valid indices are {-L}..{L - 1}")
            resolved.append(layer % L)
        if not resolved:
            raise ValueError(f"ask for at least one layer (valid indices {-L}..{L - 1})")
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"layers {list(layers)} repeat a block (resolved to {resolved}; {L} blocks)")
        return tuple(resolved)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor (B, C, H, W), got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W), got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float tensor (normalised pixels), got {pixel_values.dtype}; "
                "use encoder.image_processor or convert and normalise first"
            )
        C = self.config.in_channels
        if pixel_values.shape[1] != C:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, the encoder expects {C} (B, C, H, W)")
        stride = self.config.input_stride
        H, W = pixel_values.shape[-2:]
        if H < stride or W < stride:
            raise ValueError(f"image size {H}x{W} is smaller than one patch ({stride}x{stride})")
        if (H % stride or W % stride) and self.config.patch_remainder == "error":
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {stride}; "
                f"resize or crop to multiples of {stride} (e.g. {max(stride, H // stride * stride)}x{max(stride, W // stride * stride)})"
            )

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The position embedding `(1, h*w, D)` for a patch grid, or `None` without one.

        A learned table is resampled (`config.pos_resample_mode`, bicubic by default, in
        float32, antialiased unless `config.pos_resample_antialias` is off) from its current
        values on every call for grids other than the native one. It is never cached: no key
        can see every write (`.data`, an EMA, a fused optimizer step leave `_version` as it
        was), and resampling costs ~0.2% of a batch-1 forward (docs/guarantees.md). A fixed
        sin-cos table depends on the config only and is cached per grid, device and dtype.
        With `config.pos_resample_crop` (RADIO's CPE) the table is resampled to a square of the
        grid's larger side and its top-left `h x w` rows are kept.
        A `factorized` table is looked up: the patch at `(y, x)` gets `columns[x] + rows[y]`.
        """
        c = self.config
        if c.pos_embed == "none":
            return None
        if c.pos_embed == "factorized":
            h, w = grid
            if max(h, w) > c.pos_table_size:
                raise ValueError(
                    f"patch grid {h}x{w} is larger than the position tables ({c.pos_table_size} rows per axis); "
                    f"use images of at most {c.pos_table_size * c.input_stride} px a side"
                )
            columns, rows = self.pos_embed_axes[0, :w], self.pos_embed_axes[1, :h]  # (w, D), (h, D)
            return (columns[None, :] + rows[:, None]).reshape(1, h * w, c.width)
        if c.pos_embed == "learned":
            # RADIO's CPE (`pos_resample_crop`): resample to a square of the larger side, then crop
            h, w = grid
            side = max(h, w) if c.pos_resample_crop else None
            table = resample_pos_embed(
                self.pos_embed,
                c.grid_size,
                (side, side) if side else grid,
                antialias=c.pos_resample_antialias,
                mode=c.pos_resample_mode,
                align_corners=c.pos_resample_align_corners,
            )
            if side and (h, w) != (side, side):
                table = table.reshape(1, side, side, c.width)[:, :h, :w].reshape(1, h * w, c.width)
            return table
        param = self.patch_embed.proj.weight
        key = (tuple(grid), c.width, param.device, param.dtype)
        if key not in self._pos_cache:
            if len(self._pos_cache) > 32:
                self._pos_cache.clear()
            self._pos_cache[key] = sincos_2d_pos_embed(c.width, grid).to(device=param.device, dtype=param.dtype)
        return self._pos_cache[key]

    def block_masks(self, grid: tuple[int, int], device: torch.device) -> list[WindowMask | None]:
        """Per block, the `WindowMask` of a windowed block (`config.attn_window`) or `None` for
        attention over all tokens."""
        c = self.config
        window = WindowMask.grid(grid, c.attn_window, device) if c.attn_window is not None else None
        return [None if i in c.full_attention_blocks else window for i in range(self.num_blocks)]

    def rope_table(self, grid: tuple[int, int], device: torch.device) -> RopeTable | None:
        """The rotary table `(T, head_dim)` of one image's tokens (prefix rows the identity),
        or `None` without RoPE."""
        return None if self.rope is None else self.rope(grid, self.num_prefix_tokens, device)

    def patchify(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image `(B, C, H, W)` through the stem (if any) and the patch embedding: patch tokens
        `(B, N, D)` without positions (after `patch_norm` when the config has one), and the
        grid `(h, w)`. Pixels are cast to the encoder's dtype first, as transformers does
        (float32 pixels into a bfloat16 encoder, and the reverse)."""
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)
        x = pixel_values if self.stem is None else batch_invariant_call(self.stem, pixel_values)  # (B, C', H', W')
        x, grid = self.patch_embed(x)
        return self.patch_norm(x), grid

    def embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image `(B, C, H, W)` to input tokens `(B, T, D)` (class token(s), registers, patches) and grid."""
        x, grid = self.patchify(pixel_values)  # (B, N, D)
        pos = self.position_embedding(grid)
        if pos is not None:
            x = x + pos
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(x.shape[0], -1, -1))
        if prefix:
            x = torch.cat(prefix + [x], dim=1)  # (B, T, D)
        return self.norm_pre(x), grid

    def pool(self, x: torch.Tensor) -> torch.Tensor | None:
        """Pool final-normed tokens `(B, T, D)` to `(B, D)` as `config.pool` says."""
        c = self.config
        if c.pool == "cls":
            pooled = x[:, 0]
        elif c.pool == "gap":
            pooled = x[:, c.num_prefix_tokens :].mean(dim=1)
        elif c.pool == "map":
            pooled = self.attn_pool(x)
        else:
            return None
        return self.pooled_norm(pooled)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        layers: LayerSpec = (-1,),
        norm: bool = False,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """Encode images and return the tokens of the requested layers.

        Args:
            pixel_values: Normalised images `(B, C, H, W)`; `H` and `W` multiples of the
                patch size (times the stem stride for a hybrid model).
            layers: Block indices to return (negatives count from the end; `-1` is the last
                block, `-2` the one before, as HF `hidden_states[-2]`), or `"all"`.
            norm: Apply the final LayerNorm to the returned tokens.
            output_attentions: Also return the attention probabilities of the requested
                layers (slower explicit-softmax path for those blocks only).

        Returns:
            An `EncoderOutput`; `pooled` is set only when the last block ran.
        """
        wanted = self.resolve_layers(layers)
        self._check_pixels(pixel_values)
        x, grid = self.embed(pixel_values)
        rope = self.rope_table(grid, x.device)
        masks = self.block_masks(grid, x.device)
        last = max(wanted)
        wanted_set = set(wanted)
        captured: dict[int, torch.Tensor] = {}
        attentions: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: last + 1]):
            want_weights = output_attentions and i in wanted_set
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not want_weights:
                x, weights = torch.utils.checkpoint.checkpoint(block, x, masks[i], rope=rope, use_reentrant=False)
            else:
                x, weights = block(x, masks[i], return_weights=want_weights, rope=rope)
            if i in wanted_set:
                captured[i] = x
                if weights is not None:
                    attentions[i] = weights
        pooled = None
        if last == self.num_blocks - 1:
            pooled = self.pool(self.norm(x))
        return self._assemble(wanted, captured, attentions if output_attentions else None, grid, pooled, norm)

    def _assemble(
        self,
        wanted: tuple[int, ...],
        captured: dict[int, torch.Tensor],
        attentions: dict[int, torch.Tensor] | None,
        grid: tuple[int, int],
        pooled: torch.Tensor | None,
        norm: bool,
    ) -> EncoderOutput:
        c = self.config
        n_prefix = self.num_prefix_tokens
        has_cls = self.cls_token is not None
        n_cls = c.num_class_tokens if has_cls else 0
        n_reg = c.num_register_tokens
        summary = list(c.summary_idxs)
        patches, cls, regs, classes, summaries = [], [], [], [], []
        for i in wanted:
            tokens = self.norm(captured[i]) if norm else captured[i]  # (B, T, D)
            patches.append(tokens[:, n_prefix:])
            if has_cls:
                cls.append(tokens[:, 0])
            if n_cls > 1:
                classes.append(tokens[:, :n_cls])  # (B, C, D)
            if summary:
                summaries.append(tokens[:, summary])  # (B, S, D)
            if n_reg:
                regs.append(tokens[:, n_cls:n_prefix])
        return EncoderOutput(
            layers=wanted,
            patch_tokens=tuple(patches),
            cls_tokens=tuple(cls) if has_cls else None,
            register_tokens=tuple(regs) if n_reg else None,
            grid_size=(int(grid[0]), int(grid[1])),
            pooled=pooled,
            attentions=tuple(attentions[i] for i in wanted) if attentions is not None else None,
            num_blocks=self.num_blocks,
            class_tokens=tuple(classes) if n_cls > 1 else None,
            summary_tokens=tuple(summaries) if summary else None,
        )

    def pooled_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled output `(B, D)` (runs every block)."""
        pooled = self(pixel_values, layers=(-1,)).pooled
        if pooled is None:
            raise ValueError("this encoder has pool='none'; ask for tokens with encoder(pixels, layers=...)")
        return pooled

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embedding `(B, E)`: the pooled output through the projection when the model
        has one (CLIP's `get_image_features`), else the pooled output (SigLIP's)."""
        return self.project(self.pooled_features(pixel_values))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Apply the image projection (and its activation) to pooled features `(B, D)`."""
        if self.proj is None:
            return pooled
        out = batch_invariant_call(self.proj, pooled)  # one row per image: see `determinism`
        return torch.tanh(out) if self.config.proj_act == "tanh" else out

    # ------------------------------------------------------ permanent changes
    @torch.no_grad()
    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Change the native image size for fine-tuning: the learned position table is
        resampled once to the new grid and becomes the new parameter.

        Args:
            image_size: New `(H, W)` (or an int for square), multiples of the patch stride.
        """
        new_config = self.config.replace(image_size=image_size)
        if self.pos_embed is not None:
            table = resample_pos_embed(self.pos_embed.data, self.config.grid_size, new_config.grid_size)
            self.pos_embed = nn.Parameter(table.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.config = new_config
        self._pos_cache.clear()

    @torch.no_grad()
    def set_patch_size(self, patch_size: int) -> None:
        """Change the patch size (FlexiViT): the patch projection is resized by the
        pseudo-inverse resize and the position table resampled to the new grid.

        Args:
            patch_size: New patch side; the image size must be a multiple of it.
        """
        new_config = self.config.replace(patch_size=patch_size)
        old_proj = self.patch_embed.proj
        new_embed = PatchEmbed(old_proj.in_channels, self.config.width, patch_size, bias=old_proj.bias is not None)
        new_embed = new_embed.to(device=old_proj.weight.device, dtype=old_proj.weight.dtype)
        new_embed.proj.weight.copy_(resample_patch_projection(old_proj.weight, patch_size))
        if old_proj.bias is not None:
            new_embed.proj.bias.copy_(old_proj.bias)
        self.patch_embed = new_embed
        if self.pos_embed is not None:
            table = resample_pos_embed(self.pos_embed.data, self.config.grid_size, new_config.grid_size)
            self.pos_embed = nn.Parameter(table.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.config = new_config
        self._pos_cache.clear()

    def extra_repr(self) -> str:
        c = self.config
        return f"image_size={c.image_size}, patch_size={c.patch_size}, width={c.width}, depth={c.depth}, heads={c.num_heads}"
