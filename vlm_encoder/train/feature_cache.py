"""LiT with a cached image tower: the locked tower runs once over the training images and its
`(N, Dv)` features stand in for the pixels in every epoch (`lock_image` +
`cache_image_features`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..contrastive.distributed import gather_features
from .batches import ImageReader, PairBatch
from .evaluate import shard
from .metrics import MetricsLog
from .setup import TrainSetup
from .step import StepInputs


@dataclass
class ImageFeatureCache:
    """The locked image tower's features of every training image.

    Attributes:
        features: `(N, Dv)` features, zero where not valid.
        valid: `(N,)` True where the image was readable and its features finite.
    """

    features: torch.Tensor
    valid: torch.Tensor

    @property
    def skipped(self) -> int:
        """Images left out (unreadable, or features not finite)."""
        return len(self.valid) - int(self.valid.sum())

    def step_inputs(self, batch: PairBatch) -> StepInputs:
        """The batch's captions with the cached features of its valid images."""
        device = self.features.device
        indices = batch.indices.to(device)
        keep = self.valid[indices]
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        return StepInputs(ids[keep], mask[keep], image_features=self.features[indices[keep]])


@torch.no_grad()
def cache_image_features(parts: TrainSetup, log: MetricsLog, step: int) -> ImageFeatureCache:
    """Run the locked image tower over the training images (sharded over processes, then
    gathered).

    Unreadable images, and images whose features are not finite (NaN / inf would poison every
    batch they join, every epoch), are left out and logged at `step`."""
    acc, source, device = parts.accelerator, parts.train_source, parts.device
    reader = ImageReader(source, parts.processor)
    mine = list(shard(len(source), acc.process_index, acc.num_processes))
    batch_size = parts.config.eval_batch_size
    feats, index = [], []
    vision = parts.model.vision
    bar = tqdm(total=len(mine), desc="caching LiT image features", unit="img", dynamic_ncols=True, leave=False,
               disable=not (parts.config.progress and acc.is_main_process))
    for start in range(0, len(mine), batch_size):
        bar.update(len(mine[start : start + batch_size]))
        kept, pixels, bad = reader.read(mine[start : start + batch_size])
        for i, reason in bad:
            log.write("skipped_image", step, index=i, reason=reason)
        if kept:
            with parts.gathered(), acc.autocast():
                batch_feats = vision.image_embeds(pixels.to(device)).float()
            finite = torch.isfinite(batch_feats).all(dim=-1)
            for i, ok in zip(kept, finite.tolist()):
                if not ok:
                    log.write("skipped_image", step, index=i, reason="non-finite features from the locked image tower")
            feats.append(batch_feats[finite])
            index.append(torch.tensor(kept, device=device)[finite])
    bar.close()
    width = vision.config.embed_dim or vision.config.width
    local = torch.cat(feats) if feats else torch.zeros(0, width, device=device)
    local_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)
    all_feats = gather_features(local, with_grad=False).features
    all_index = gather_features(local_index, with_grad=False).features
    cache = ImageFeatureCache(torch.zeros(len(source), width, device=device),
                              torch.zeros(len(source), dtype=torch.bool, device=device))
    cache.features[all_index] = all_feats
    cache.valid[all_index] = True
    log.write("feature_cache", step, images=int(cache.valid.sum()), skipped_images=cache.skipped)
    return cache
