"""`TrainConfig`: everything a contrastive training run needs, as one frozen dataclass that
reads from YAML, takes `key=value` overrides from the command line, and is saved resolved
(`config.yaml` in the run directory) so a run can be repeated or resumed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from ..specs.options import ConfigMixin, at_least, check_fields

MixedPrecision = Literal["no", "bf16", "fp16"]
MIXED_PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)

# Zero-shot prompts when a config names none: neutral ones, as CLIP's simplest template.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
DIGITS_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")

# What a resumed run may change from the config its checkpoint was saved with: the length of the
# run, the schedule and the optimizer's hyperparameters (they take effect from the resumed step),
# evaluation, logging and checkpointing, and how the run is executed. Any other difference (the
# data, the model, the batch, the seed, the precision, ...) would not continue the same run, and
# is refused before anything is written.
RESUMABLE_FIELDS: frozenset[str] = frozenset({
    "epochs", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "eps", "grad_clip",
    "eval_data", "eval_split", "class_names", "templates", "eval_every", "eval_batch_size",
    "log_every", "progress", "checkpoint_every", "keep_checkpoints", "output_dir",
    "resume", "allow_partial_resume", "resume_fallback",
    "accum_steps", "grad_checkpointing", "compile", "fast_cpu", "cpu", "num_workers", "fsdp",
})


@dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """Configuration of `vlm-encoder train` (and `eval`).

    Read from YAML 1.2 and `key=value` overrides by the field types (`specs.options`): `lr:
    1e-3` is a float, `mixed_precision: no` the string "no", booleans only `true` / `false`.

    Attributes:
        data: Training data: `builtin:digits`, `builtin:shapes`, a hub dataset name, a local
            `imagefolder` directory (captions in `metadata.jsonl` / `metadata.csv`), a folder
            of parquet files, a `.parquet` / `.csv` / `.tsv` / `.jsonl` / webdataset `.tar`
            file or glob, or a directory written by `Dataset.save_to_disk`.
        train_split: Split used for training.
        eval_data: Evaluation data (same forms as `data`); default: `data` itself.
        eval_split: Split used for evaluation (`None`: no evaluation).
        data_options: Options of a builtin source (`num_train`, `num_test`, `canvas`, `seed`
            for shapes; `canvas` for digits), or keyword arguments of `datasets.load_dataset`
            (`name`, `revision`, ...) for the others.
        image_column: Column holding images (PIL images, bytes or file paths).
        text_column: Column holding captions (a string, or a list of captions per image).
        label_column: Optional integer label column for zero-shot evaluation.
        class_names: Class names for zero-shot evaluation (default: the label feature's names).
        templates: Zero-shot prompt templates, each with one `{}` (default: neutral ones,
            "a photo of a {}." ...; `examples/configs/digits.yaml` sets digit prompts).
        vision_preset: `create_encoder` preset of the image tower.
        vision_overrides: `VisionConfig` fields replacing the preset's (e.g. `{width: 64}`).
        text_preset: Text tower preset (`tiny`, `small`, `base`).
        text_overrides: `TextConfig` fields replacing the preset's (`context_length` also
            sets the length of a `text_model`'s tokenizer).
        text_model: A local Hugging Face text model directory (model + tokenizer, e.g. a BERT)
            as the text tower instead of the CLIP-style one; its weights start the run.
        text_pooling: How a `text_model` is pooled: `mean` (over the attention mask) or `cls`.
        embed_dim: Width of the shared embedding space.
        objective: `clip` or `siglip`.
        init_model: A whole model to start from instead of random weights: a `ContrastiveModel`
            `save_pretrained` directory, an HF CLIP or MetaCLIP 2 directory or hub id, or an open_clip
            CLIP as `open_clip:ARCH` or `open_clip:ARCH:TAG_OR_FILE` (both towers and the logit scale, e.g.
            `open_clip:ViT-B-32:laion2b_s34b_b79k`).
        vision_init: A pretrained image tower for a new model (any `load_encoder` source: a
            directory, a hub id such as `google/siglip-base-patch16-224`, `open_clip:ARCH`,
            `timm:NAME`); the text tower and the heads start from random weights. LiT is this
            with `lock_image: true`. Replaces `vision_preset` / `vision_overrides`.
        vision_checkpoint: The weight file (or open_clip tag) for `vision_init`.
        lock_image: LiT: the image tower is frozen, in eval mode, without gradients.
        cache_image_features: With `lock_image`, compute each image's tower output once and
            reuse it every epoch.
        epochs: Passes over the training data (ignored when `max_steps` is set).
        max_steps: Optimizer steps to run (default: `epochs` worth).
        batch_size: Contrastive batch per process (every sample sees all others as negatives).
        accum_steps: Micro-batches per batch: features are cached without gradients, the loss
            is taken over the whole batch, then each micro-batch is recomputed with gradients
            (GradCache); gradients equal the full batch's.
        lr: Peak learning rate of AdamW.
        min_lr: Learning rate at the end of the cosine decay.
        warmup_steps: Linear warm-up steps from 0 to `lr`.
        weight_decay: AdamW weight decay (not applied to biases, norms, embeddings and the
            logit scale/bias).
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: Maximum global gradient norm (`0` disables clipping).
        mixed_precision: `no`, `bf16` or `fp16` (through accelerate).
        grad_checkpointing: Recompute the tower blocks in the backward pass.
        compile: `torch.compile` the model (GPU).
        fast_cpu: On the CPU, run the float32 linears' forward and backward GEMMs through
            oneDNN (`vlm_encoder.cpu_speed.fast_cpu`: ~2x MKL's sgemm on AMD CPUs, float32
            exact to the order of the sums); not with `fsdp` over several processes, and a
            step under bf16 / fp16 autocast keeps autocast's own GEMMs. `false`: torch's default.
        cpu: Force the CPU even when a GPU is present.
        seed: Seed of the weights, the sample order and the caption choice.
        num_workers: DataLoader worker processes.
        output_dir: Run directory (checkpoints, metrics, plots, exported towers).
        checkpoint_every: Write a checkpoint every N optimizer steps (`0`: only at the end).
        keep_checkpoints: Keep the last k checkpoints.
        resume: `auto` resumes from the run directory's last complete checkpoint; `never`
            refuses to start in a directory that holds checkpoints; a path resumes from it.
        allow_partial_resume: Accept a checkpoint without RNG or sampler state (not exact).
        resume_fallback: With `resume=auto`, a newest checkpoint that does not load (a
            truncated, corrupt or missing file) is skipped with a warning and the newest older
            one that loads is used; without it, that is an error naming the broken file.
        eval_every: Evaluate every N optimizer steps (`0`: only at the end).
        eval_batch_size: Batch of the evaluation forward passes.
        log_every: Log the training loss every N steps.
        progress: Show a progress bar.
        ema_decay: Keep an exponential moving average of the weights with this decay
            (`torch.optim.swa_utils.AveragedModel`, updated after every applied step, e.g.
            `0.999`); evaluation and the export use the averaged weights, and checkpoints hold
            it (`ema.safetensors`) so a resumed run stays exact. `None`: no average.
        augment: open_clip's training augmentation: `RandomResizedCrop(size, scale=(0.9, 1.0),
            bicubic)` (torchvision v2) in place of the processor's resize and crop, then its
            normalisation. Each image's crop is seeded by `(seed, epoch, index)`, so resumed runs
            and any `num_workers` stay exact. Not with cached LiT features.
        lora_r: Train LoRA adapters of this rank (through `peft`) instead of the weights: only
            the adapters train (the heads and logit scale stay as loaded); checkpoints hold
            them, and `export/` holds the model with the adapters merged. `None`: no LoRA.
        lora_targets: The linear layers adapted: module-name suffixes (`qkv`, `proj`: both
            towers' attention) or regular expressions over full names (`vision\\..*qkv`).
        lora_alpha: LoRA's scaling numerator (the update is scaled by `alpha / r`); default `r`.
        fsdp: Shard the weights, gradients and optimizer state over the processes (FSDP2,
            `torch.distributed.fsdp.fully_shard`, one unit per tower block; `train/fsdp.py`)
            instead of replicating them (DDP). Same steps as DDP; not with `ema_decay`.
    """

    data: str = "builtin:digits"
    train_split: str = "train"
    eval_data: str | None = None
    eval_split: str | None = "test"
    data_options: dict[str, Any] = field(default_factory=dict)
    image_column: str = "image"
    text_column: str = "text"
    label_column: str | None = None
    class_names: tuple[str, ...] | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    vision_preset: str = "vit_tiny_patch16_224"
    vision_overrides: dict[str, Any] = field(default_factory=dict)
    text_preset: str = "tiny"
    text_overrides: dict[str, Any] = field(default_factory=dict)
    text_model: str | None = None
    text_pooling: Literal["mean", "cls"] = "mean"
    embed_dim: int = at_least(1, 128)
    objective: Literal["clip", "siglip"] = "clip"
    init_model: str | None = None
    vision_init: str | None = None
    vision_checkpoint: str | None = None
    lock_image: bool = False
    cache_image_features: bool = True
    epochs: int = at_least(1, 1)
    max_steps: int | None = at_least(1, None)
    batch_size: int = at_least(1, 256)
    accum_steps: int = at_least(1, 1)
    lr: float = at_least(0.0, 1e-3)
    min_lr: float = at_least(0.0, 0.0)
    warmup_steps: int = at_least(0, 100)
    weight_decay: float = at_least(0.0, 0.1)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = at_least(0.0, 1e-6)
    grad_clip: float = at_least(0.0, 1.0)
    mixed_precision: MixedPrecision = "no"
    grad_checkpointing: bool = False
    compile: bool = False
    fast_cpu: bool = True
    cpu: bool = False
    seed: int = at_least(0, 0)
    num_workers: int = at_least(0, 0)
    output_dir: str = "runs/train"
    checkpoint_every: int = at_least(0, 0)
    keep_checkpoints: int = at_least(1, 2)
    resume: str = "auto"
    allow_partial_resume: bool = False
    resume_fallback: bool = False
    eval_every: int = at_least(0, 0)
    eval_batch_size: int = at_least(1, 256)
    log_every: int = at_least(1, 10)
    progress: bool = True
    ema_decay: float | None = None
    augment: bool = False
    lora_r: int | None = at_least(1, None)
    lora_targets: tuple[str, ...] = ("qkv", "proj")
    lora_alpha: float | None = None
    fsdp: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by accum_steps={self.accum_steps} "
                "(each micro-batch is batch_size / accum_steps)"
            )
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (or None for no average), got {self.ema_decay!r}")
        if self.fsdp and self.ema_decay is not None:
            raise ValueError("fsdp with ema_decay: the moving average would copy the sharded weights; use one")
        if self.augment and self.lock_image and self.cache_image_features:
            raise ValueError("augment with lock_image and cache_image_features: cached image features are computed "
                             "once, unaugmented; set cache_image_features: false to augment a locked tower's input")
        if self.lora_r is not None and not self.lora_targets:
            raise ValueError("lora_r is set but lora_targets is empty: name the linear layers to adapt, e.g. [qkv, proj]")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"templates must be a non-empty list of strings with exactly one '{{}}', got {self.templates!r}")
        if self.init_model and self.vision_init:
            raise ValueError(
                "init_model and vision_init both given: init_model loads a whole model, vision_init only an image "
                "tower for a new one; give one"
            )
        if self.text_model and self.init_model:
            raise ValueError("text_model and init_model both given: init_model already holds a text tower; give one")
        if self.vision_checkpoint and not self.vision_init:
            raise ValueError("vision_checkpoint is set without vision_init")
        if not self.resume:
            raise ValueError("resume must be 'auto', 'never' or a checkpoint path")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved config as YAML (atomically)."""
        from ..pretrained import write_atomic

        path = Path(path)
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())
        return path
