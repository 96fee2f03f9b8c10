"""What a `TrainConfig` builds: the model, AdamW with its parameter groups, and the warm-up +
cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..contrastive import ContrastiveModel
from ..presets import preset_config
from ..encoder import VisionEncoder
from ..specs.models import load_model
from ..text import HFTextConfig, HFTextEncoder, TextEncoder, text_preset_config
from .config import TrainConfig


def build_model(config: TrainConfig) -> ContrastiveModel:
    """The model a run starts from: `init_model` loaded (a saved `ContrastiveModel` or an
    open_clip CLIP), or a new one whose image tower is `vision_init` loaded or built from the
    preset, and whose text tower is `text_model` loaded or built from its preset."""
    if config.init_model:
        model = load_model(config.init_model, need="contrastive", command="train init_model").model
    else:
        if config.vision_init:
            vision = load_model(config.vision_init, need="vision", command="train vision_init",
                                checkpoint=config.vision_checkpoint).vision
        else:
            vision = VisionEncoder(preset_config(config.vision_preset, **config.vision_overrides))
        if config.text_model:
            length = config.text_overrides.get("context_length", 77)
            text = HFTextEncoder(HFTextConfig(config.text_model, pooling=config.text_pooling, context_length=length))
        else:
            text = TextEncoder(text_preset_config(config.text_preset, **config.text_overrides))
        model = ContrastiveModel(vision, text, config.embed_dim, objective=config.objective)
    if config.lock_image:
        model.freeze_vision()
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.train()


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm weights, embeddings / tokens and the logit scale and bias: no weight decay.
    return param.ndim < 2 or "embed" in name or "token" in name or name.startswith("logit_")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices only; fused on a GPU
    (build it after the model is on its device)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (one launch for all parameters) where every parameter is on a GPU.
    trainable = decay + no_decay
    fused = bool(trainable) and all(p.device.type == "cuda" for p in trainable)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas), eps=config.eps,
        **({"fused": True} if fused else {}),
    )


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up over
    `warmup_steps` (from 1/warmup), then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine schedule (stepped once per optimizer step)."""
    min_ratio = config.min_lr / config.lr if config.lr else 0.0
    warmup = min(config.warmup_steps, total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total_steps, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
