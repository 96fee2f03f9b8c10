"""`VisionConfig`: the one validated, frozen description of a ViT vision encoder.

Every family the package loads (CLIP, SigLIP, DINOv2, plain ViT, hybrid ResNet-ViT) is
expressed by one `VisionConfig`; converters produce a config plus a state dict, never a
different module class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .layers.norm import NormKind
from .layers.rope import RopeKind, RopeLayout
from .specs.options import ConfigMixin, at_least, check_fields
from .validation import repeat_number

Activation = Literal["gelu", "quick_gelu", "gelu_tanh"]
PosEmbedKind = Literal["learned", "sincos", "none", "factorized"]
PoolKind = Literal["cls", "gap", "map", "none"]
MlpKind = Literal["mlp", "swiglu", "gated"]
ProjectionActivation = Literal["none", "tanh"]
PosResampleMode = Literal["bicubic", "bilinear"]


@dataclass(frozen=True)
class VisionConfig(ConfigMixin):
    """Configuration of a `VisionEncoder`.

    Attributes:
        image_size: Native input size `(H, W)` (an int means square). The learned position
            table has one row per patch of this size.
        patch_size: Side of the square patch in pixels of the patch-embedding input (the
            stem's feature map for a hybrid model).
        in_channels: Input image channels.
        width: Token width `D`.
        depth: Number of transformer blocks `L`.
        num_heads: Attention heads; must divide `width`.
        mlp_dim: Hidden width of each block's MLP (default `4 * width`).
        mlp_type: `mlp` (Linear, act, Linear), `swiglu` (packed SwiGLU, as DINOv2-g) or `gated`
            (the same packed gate with `act` instead of SiLU: Gemma 4's GELU-tanh GeGLU).
        act: MLP activation: `gelu` (exact erf), `quick_gelu` (OpenAI CLIP) or `gelu_tanh`
            (SigLIP).
        qkv_bias: Bias on the query/key/value projection.
        patch_bias: Bias on the patch-embedding convolution (CLIP has none).
        class_token: Prepend a learned CLS token.
        num_class_tokens: With `class_token`, how many class tokens lead the sequence (RADIO:
            one per teacher, 3 in C-RADIOv4); the first is the CLS (`cls()`, `pool='cls'`), all
            of them come out apart as `EncoderOutput.class_tokens` when there are several.
        summary_idxs: Which class tokens form the summary (RADIO's `summary_idxs`), returned as
            `EncoderOutput.summary_tokens`; empty: no summary.
        num_register_tokens: Learned register tokens inserted after the CLS token
            (DINOv2 with registers); they get no position embedding.
        pos_embed: `learned` 1D table over the patch grid (resampled for other sizes),
            fixed 2D `sincos`, `factorized` (two learned tables of `pos_table_size` rows, one per
            axis: a patch at row `y`, column `x` gets `column_table[x] + row_table[y]`, Gemma 4;
            any grid up to that side, looked up, never resampled), or `none`. The CLS token's own
            position embedding, when a checkpoint has one, is folded into the CLS token by the
            converters.
        pos_table_size: `factorized` only: rows of each axis table, the largest grid side the
            tower takes (default: the larger side of the native grid).
        rope: 2D rotary position embedding of the patch tokens' queries and keys (prefix
            tokens unrotated), on top of `pos_embed` (EVA02 and PE have both; DINOv3 sets
            `pos_embed='none'`): `none`, `eva` (integer positions, timm `eva.py`'s EVA02 / PE)
            or `dinov3` (patch centres in [-1, 1], its training-time jitter off). Recomputed
            for every grid, never resampled. See `layers/rope.py`.
        rope_theta: RoPE frequency base (timm `rope_temperature`, HF `rope_theta`).
        rope_layout: `half` (rotate the two halves of the head dim), `interleaved`
            (adjacent pairs; timm's default for EVA02 / PE) or `split` (each axis a contiguous half
            of the head dim, rotating its two quarters: Gemma 4).
        rope_ref_grid: `eva` only: positions are rescaled so that any grid spans this one
            (timm `ref_feat_shape`, the pre-training grid), or `None` (integer positions).
        rope_grid_offset: Added to every RoPE position (PE uses 1).
        rope_xy: Head-dim order of the axes `(x, y)` instead of `(y, x)` (timm
            `rope_grid_indexing='xy'`, PE).
        attn_window: Side in patches of the square windows that blocks not in
            `full_attention_blocks` attend within (Qwen2.5-VL: `window_size / patch_size`
            rounded down to whole merge units), tiling the grid from its top-left corner; `None`:
            every block attends over all tokens. Tokens stay row-major (`layers.WindowMask`).
        full_attention_blocks: With `attn_window`, the blocks that attend over all tokens
            (Qwen2.5-VL `fullatt_block_indexes`).
        qk_norm: LayerNorm over each head's queries and keys before RoPE.
        attn_norm: LayerNorm on the attended tokens before the output projection (EVA02-CLIP's
            sub-LN, timm `scale_attn_inner`).
        mlp_norm: LayerNorm on the MLP's hidden activations before `fc2` (timm `scale_mlp`).
        qk_norm_scope: `head` (the qk-norm over each head's channels) or `width` (over all
            heads' channels of a token at once, before the split: InternViT's `use_qk_norm`).
        v_norm: RMS-normalise each head's values before attention, without a weight (Gemma 4).
        sandwich_norm: Normalise each block's attention and MLP outputs before the residual add,
            as well as their inputs (`x + norm(attn(norm(x)))`; Gemma 4's post-attention and
            post-feedforward norms), with `norm_type`.
        clipped_linears: Every block Linear (`qkv`, `proj`, `fc1`, `fc2`) clamps its input and its
            output to bounds it holds, per fused part (`layers.ClippedLinear`; Gemma 4 E2B / E4B's
            `use_clipped_linears`); the bounds are infinite until loaded.
        norm_type: `layernorm` or `rmsnorm` (AIMv2, InternViT-6B): the blocks' `norm1` /
            `norm2`, the qk-norm, `patch_norm`, `norm_pre` and the final norm. The sub-LNs
            (`attn_norm`, `mlp_norm`) and `pooled_norm` stay LayerNorms.
        patch_norm: Norm on the patch tokens right after the patch embedding, before the
            positions (AIMv2's `embeddings.rms_norm`).
        norm_pre: LayerNorm on the tokens before the first block (CLIP's `ln_pre`).
        final_norm: LayerNorm after the last block, applied to every token.
        pooled_norm: LayerNorm applied to the pooled vector (timm/MAE `fc_norm`, used with
            `gap`).
        norm_eps: Epsilon of every LayerNorm.
        layer_scale_init: Initial value of per-channel LayerScale (DINOv2), or `None`.
        pool: Pooled output: `cls`, `gap` (mean of patch tokens), `map` (attention
            pooling with a learned query, as SigLIP) or `none`.
        map_mlp_dim: Hidden width of the MAP head's MLP (default `mlp_dim`).
        map_num_heads: Attention heads of the MAP head (default `num_heads`; PE core uses 8).
        embed_dim: Width of the projected image embedding (CLIP's visual projection),
            or `None` for no projection.
        proj_bias: Bias on that projection.
        proj_act: Activation after the projection (`tanh` for HF ViT's pooler).
        stem_layers: Bottleneck blocks per ResNet stage of a hybrid convolutional stem
            (e.g. `(3, 4, 9)` for R50 at stride 16); empty for a plain ViT.
        stem_width: Channels of the stem's first convolution.
        drop_path_rate: Stochastic-depth rate, rising linearly over the blocks.
        pos_resample_antialias: Resample the position table with torch's antialiased bicubic
            (as timm and HF DINOv2-with-registers do; it also uses PIL's a=-0.5 cubic kernel
            when enlarging) or the plain one (a=-0.75, as HF CLIP, SigLIP, ViT and DINOv2's
            `interpolate_pos_encoding`; their converters turn this off for parity).
        pos_resample_mode: Interpolation of that resampling: `bicubic` (default) or
            `bilinear` (SigLIP2 NaFlex resizes its square table per image with antialiased
            bilinear).
        pos_resample_align_corners: Resample with torch's `align_corners=True` (the corner
            patches of both grids coincide: Qwen3-VL's bilinear table, not antialiased) instead
            of half-pixel centres.
        pos_resample_crop: Resample the (square) learned table to a square of the input grid's
            larger side, then keep its top-left `h x w` rows (RADIO's cropped position
            embedding, CPE; its table covers `image_size` = the largest image it takes) instead
            of resampling it to `h x w` directly.
        patch_remainder: What a side that is not a multiple of the patch stride gets:
            `error` (default), or `drop`, where the convolution ignores the last pixels as
            the references silently do (needed for checkpoints such as SigLIP so400m/14 at
            384 px, a 27 x 27 grid).
    """

    image_size: tuple[int, int] = at_least(1, (224, 224))
    patch_size: int = at_least(1, 16)
    in_channels: int = at_least(1, 3)
    width: int = at_least(1, 768)
    depth: int = at_least(1, 12)
    num_heads: int = at_least(1, 12)
    mlp_dim: int | None = at_least(1, None)
    mlp_type: MlpKind = "mlp"
    act: Activation = "gelu"
    qkv_bias: bool = True
    patch_bias: bool = True
    class_token: bool = True
    num_class_tokens: int = at_least(1, 1)
    summary_idxs: tuple[int, ...] = at_least(0, ())
    num_register_tokens: int = at_least(0, 0)
    pos_embed: PosEmbedKind = "learned"
    pos_table_size: int | None = at_least(1, None)
    rope: RopeKind = "none"
    rope_theta: float = at_least(1.0, 10000.0)
    rope_layout: RopeLayout = "half"
    rope_ref_grid: tuple[int, int] | None = at_least(1, None)
    rope_grid_offset: float = 0.0
    rope_xy: bool = False
    attn_window: int | None = at_least(1, None)
    full_attention_blocks: tuple[int, ...] = at_least(0, ())
    qk_norm: bool = False
    attn_norm: bool = False
    mlp_norm: bool = False
    qk_norm_scope: Literal["head", "width"] = "head"
    v_norm: bool = False
    sandwich_norm: bool = False
    clipped_linears: bool = False
    norm_type: NormKind = "layernorm"
    patch_norm: bool = False
    norm_pre: bool = False
    final_norm: bool = True
    pooled_norm: bool = False
    norm_eps: float = 1e-6
    layer_scale_init: float | None = None
    pool: PoolKind = "cls"
    map_mlp_dim: int | None = at_least(1, None)
    map_num_heads: int | None = at_least(1, None)
    embed_dim: int | None = at_least(1, None)
    proj_bias: bool = False
    proj_act: ProjectionActivation = "none"
    stem_layers: tuple[int, ...] = at_least(1, ())
    stem_width: int = at_least(1, 64)
    drop_path_rate: float = at_least(0.0, 0.0)
    pos_resample_antialias: bool = True
    pos_resample_mode: PosResampleMode = "bicubic"
    pos_resample_align_corners: bool = False
    pos_resample_crop: bool = False
    patch_remainder: Literal["error", "drop"] = "error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", repeat_number(self.image_size, 2))  # an int: square
        check_fields(self)
        if self.mlp_dim is None:
            object.__setattr__(self, "mlp_dim", 4 * self.width)
        if self.width % self.num_heads:
            raise ValueError(
                f"width={self.width} must be divisible by num_heads={self.num_heads} "
                f"(head dim = width / num_heads)"
            )
        if self.map_num_heads is not None and self.width % self.map_num_heads:
            raise ValueError(f"width={self.width} must be divisible by map_num_heads={self.map_num_heads}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True; use 'gap', 'map' or 'none' without a CLS token")
        if self.num_class_tokens > 1 and not self.class_token:
            raise ValueError(f"num_class_tokens={self.num_class_tokens} needs class_token=True")
        if any(i >= self.num_class_tokens for i in self.summary_idxs) or (self.summary_idxs and not self.class_token):
            raise ValueError(
                f"summary_idxs {self.summary_idxs} must index the class tokens (num_class_tokens="
                f"{self.num_class_tokens if self.class_token else 0})"
            )
        if self.pos_resample_crop and (self.pos_embed != "learned" or self.grid_size[0] != self.grid_size[1]):
            raise ValueError(
                f"pos_resample_crop needs a square learned table (pos_embed='learned', square image_size), "
                f"got pos_embed={self.pos_embed!r}, image_size={self.image_size}"
            )
        if self.pos_embed == "sincos" and self.width % 4:
            raise ValueError(f"pos_embed='sincos' needs width divisible by 4, got width={self.width}")
        if self.rope != "none" and self.head_dim % 4:
            raise ValueError(
                f"rope={self.rope!r} needs a head dim (width / num_heads) divisible by 4, got {self.head_dim}"
            )
        if self.pos_table_size is not None and self.pos_embed != "factorized":
            raise ValueError(f"pos_table_size applies to pos_embed='factorized' only, got pos_embed={self.pos_embed!r}")
        if self.pos_embed == "factorized" and self.pos_table_size is None:
            object.__setattr__(self, "pos_table_size", max(self.grid_size))
        if self.pos_embed == "factorized" and self.pos_table_size < max(self.grid_size):
            raise ValueError(f"pos_table_size={self.pos_table_size} is smaller than the native grid {self.grid_size}")
        if self.rope_ref_grid is not None and self.rope != "eva":
            raise ValueError(f"rope_ref_grid applies to rope='eva' only, got rope={self.rope!r}")
        if self.attn_window is not None and self.num_prefix_tokens:
            raise ValueError("attn_window needs a tower without CLS / register tokens (windows tile the patch grid)")
        if self.full_attention_blocks and self.attn_window is None:
            raise ValueError("full_attention_blocks applies with attn_window only (without it every block is full)")
        if any(i >= self.depth for i in self.full_attention_blocks):
            raise ValueError(f"full_attention_blocks {self.full_attention_blocks} must be block indices < depth={self.depth}")
        if self.proj_act != "none" and self.embed_dim is None:
            raise ValueError("proj_act needs a projection: set embed_dim")
        if self.drop_path_rate >= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        stride = self.input_stride
        for side, name in zip(self.image_size, ("height", "width")):
            if side < stride:
                raise ValueError(f"image {name} {side} is smaller than the patch stride {stride}")
            if side % stride and self.patch_remainder == "error":
                raise ValueError(
                    f"image {name} {side} is not a multiple of the patch stride {stride} "
                    f"(patch_size={self.patch_size}"
                    + (f" x stem stride {self.stem_stride}" if self.stem_layers else "")
                    + "); set patch_remainder='drop' to ignore the remainder as the conv does"
                )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def stem_stride(self) -> int:
        """Downsampling of the hybrid stem (1 without one): 4 for the root, x2 per later stage."""
        if not self.stem_layers:
            return 1
        return 4 * 2 ** (len(self.stem_layers) - 1)

    @property
    def input_stride(self) -> int:
        """Pixels per patch side in the input image."""
        return self.patch_size * self.stem_stride

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid `(h, w)` at the native image size."""
        return (self.image_size[0] // self.input_stride, self.image_size[1] // self.input_stride)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) * self.num_class_tokens + self.num_register_tokens
