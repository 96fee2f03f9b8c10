"""`ContrastiveModel`: a vision tower and a text tower projected into one embedding space
(CLIP, SigLIP, LiT).

    image `(B, C, H, W)` -> VisionEncoder.image_embeds `(B, Dv)` -> image_proj -> L2 norm `(B, E)`
    ids `(B, L)` -> text tower pooled `(B, Dt)` -> text_proj -> L2 norm `(B, E)`

plus a learned log-scale (clamped to at most ln 100) and, for SigLIP, a learned bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import VisionEncoder
from ..pretrained import PretrainedMixin
from ..text.hf_text import HFTextEncoder
from ..text.model import TextEncoder
from .config import ContrastiveConfig, Objective
from .losses import ClipLoss, SigLipLoss


@dataclass
class ContrastiveOutput:
    """What `ContrastiveModel.forward` returns; the arguments of `ClipLoss` / `SigLipLoss`.

    Attributes:
        image_embeds: `(B, E)` L2-normalised image embeddings.
        text_embeds: `(B, E)` L2-normalised text embeddings.
        logit_scale: 0-d multiplier `exp(min(logit_scale, max))` (at most 100).
        logit_bias: 0-d learned bias, or `None` (CLIP).
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None

    def logits_per_image(self) -> torch.Tensor:
        """`(B, B)` image-to-text logits (for evaluation at small batch; losses never build it)."""
        logits = self.logit_scale * self.image_embeds @ self.text_embeds.T
        return logits if self.logit_bias is None else logits + self.logit_bias


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # In float32: a half-precision sum of squares overflows for large features.
    return F.normalize(x.float(), dim=-1).to(x.dtype)


class ContrastiveModel(PretrainedMixin, nn.Module):
    """Two towers and projection heads into a shared `E`-dimensional space.

    Args:
        vision: Image tower (its `image_embeds`, i.e. pooled output through its own
            projection when it has one, feeds `image_proj`).
        text: Text tower: `TextEncoder` or `HFTextEncoder`.
        embed_dim: Shared embedding width `E`.
        objective: `clip` or `siglip` (adds the learned bias; sets the default init).
        init_logit_scale: Starting log-scale (default ln(1/0.07) for CLIP, ln 10 for SigLIP).
        init_logit_bias: Starting bias (default -10 for SigLIP, no bias for CLIP).
        max_logit_scale: Clamp of the log-scale (default ln 100).

    Example:
        >>> model = ContrastiveModel(create_encoder("vit_base_patch16_224"), TextEncoder(TextConfig()), 512)
        >>> out = model(pixels, batch.input_ids, batch.attention_mask)
        >>> loss = model.build_loss()(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    """

    config_class = ContrastiveConfig
    model_type = "vlm_encoder.contrastive"

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder | HFTextEncoder,
        embed_dim: int,
        *,
        objective: Objective = "clip",
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
        max_logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        extra = {} if max_logit_scale is None else {"max_logit_scale": max_logit_scale}
        # The one check of the combination (and where the defaults are resolved).
        head = ContrastiveConfig(
            vision.config, text.config, embed_dim, objective, init_logit_scale, init_logit_bias, **extra
        )
        self.vision = vision
        self.text = text
        self.objective = head.objective
        self.init_logit_scale = head.init_logit_scale
        self.init_logit_bias = head.init_logit_bias
        self.max_logit_scale = head.max_logit_scale
        vision_width = vision.config.embed_dim or vision.config.width
        self.image_proj = nn.Linear(vision_width, head.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, head.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=vision_width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(head.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(head.init_logit_bias))) if head.init_logit_bias is not None else None
        )
        self.vision_frozen = False

    # ------------------------------------------------------------------ config
    @property
    def embed_dim(self) -> int:
        return self.image_proj.out_features

    @property
    def config(self) -> ContrastiveConfig:
        """The current configuration (tower configs as they are now)."""
        return ContrastiveConfig(
            vision=self.vision.config,
            text=self.text.config,
            embed_dim=self.embed_dim,
            objective=self.objective,
            init_logit_scale=self.init_logit_scale,
            init_logit_bias=self.init_logit_bias,
            max_logit_scale=self.max_logit_scale,
        )

    @classmethod
    def from_config(cls, config: ContrastiveConfig) -> "ContrastiveModel":
        """A randomly initialised model (an HF text tower is built from its directory's
        config without reading its weights). `from_pretrained` loads into it, so a saved
        model with an HF text tower needs `config.text.model_dir` to still exist."""
        text = (
            TextEncoder(config.text) if config.text_tower == "clip" else HFTextEncoder(config.text, load_weights=False)
        )
        return cls(
            VisionEncoder(config.vision),
            text,
            config.embed_dim,
            objective=config.objective,
            init_logit_scale=config.init_logit_scale,
            init_logit_bias=config.init_logit_bias,
            max_logit_scale=config.max_logit_scale,
        )

    @classmethod
    def from_open_clip(
        cls, arch: str, checkpoint: str | None = None, cache_dir: str | None = None
    ) -> "ContrastiveModel":
        """A whole open_clip CLIP model (both towers, logit scale): see
        `vlm_encoder.converters.open_clip_clip.load_open_clip_contrastive`.

        Example:
            >>> model = ContrastiveModel.from_open_clip("ViT-B-32", "laion2b_s34b_b79k")
        """
        from ..converters.open_clip_clip import load_open_clip_contrastive

        return load_open_clip_contrastive(arch, checkpoint, cache_dir)

    def get_image_processor(self) -> Any:
        return self.vision.get_image_processor()

    def set_image_processor(self, processor: Any) -> None:
        if processor is not None:
            self.vision.image_processor = processor

    # ------------------------------------------------------------- training set-up
    def build_loss(self, chunk_size: int | None = None, gather_with_grad: bool = True) -> ClipLoss | SigLipLoss:
        """The loss of this model's objective (`ClipLoss` or `SigLipLoss`)."""
        loss_class = SigLipLoss if self.objective == "siglip" else ClipLoss
        return loss_class(chunk_size=chunk_size, gather_with_grad=gather_with_grad)

    def freeze_vision(self, freeze: bool = True, include_projection: bool = False) -> None:
        """Lock the image tower (LiT): no gradients, kept in eval mode, run without autograd.

        Args:
            freeze: Lock (True) or unlock (False).
            include_projection: Also lock `image_proj` (LiT locks the whole image side;
                the default leaves the new head trainable).
        """
        self.vision.requires_grad_(not freeze)
        if include_projection or not freeze:
            self.image_proj.requires_grad_(not freeze)
        self.vision_frozen = freeze
        self.vision.train(self.training and not freeze)

    def train(self, mode: bool = True) -> "ContrastiveModel":
        super().train(mode)
        if self.vision_frozen:
            self.vision.eval()  # no dropout / drop-path in a locked tower
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks of both towers in the backward pass."""
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    # ---------------------------------------------------------------- forward
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings `(B, E)` of normalised images `(B, C, H, W)`."""
        if self.vision_frozen:
            with torch.no_grad():
                features = self.vision.image_embeds(pixel_values)
        else:
            features = self.vision.image_embeds(pixel_values)
        embeds = self.image_proj(features)
        return _normalize(embeds) if normalize else embeds

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text embeddings `(B, E)` of token ids `(B, L)` (and their mask, for HF towers)."""
        embeds = self.text_proj(self.text(input_ids, attention_mask).pooled)
        return _normalize(embeds) if normalize else embeds

    def current_logit_scale(self) -> torch.Tensor:
        """0-d `exp(min(logit_scale, max_logit_scale))`; the clamp holds however far the
        parameter is pushed (it gets no gradient above the clamp)."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp()

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ContrastiveOutput:
        """Embed a batch of image-caption pairs.

        Args:
            pixel_values: `(B, C, H, W)` normalised images.
            input_ids: `(B, L)` caption ids; row `i` describes image `i`.
            attention_mask: `(B, L)` mask from the tokenizer (needed by HF mean pooling).

        Returns:
            `ContrastiveOutput` with normalised `image_embeds` / `text_embeds` `(B, E)`,
            `logit_scale` and `logit_bias`.
        """
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} images and {input_ids.shape[0]} captions: a batch holds one caption per image"
            )
        return ContrastiveOutput(
            image_embeds=self.encode_image(pixel_values),
            text_embeds=self.encode_text(input_ids, attention_mask),
            logit_scale=self.current_logit_scale(),
            logit_bias=self.logit_bias,
        )
