"""Evaluation of a contrastive model: zero-shot classification (class names x prompt templates)
and image-to-text / text-to-image retrieval recall at 1, 5 and 10.

Ties count against the model: a candidate scoring exactly as high as the right one ranks above
it. Identical captions are embedded once (per process), so repeated captions (a class name as
caption, as in digits) tie exactly: another image's identical caption is not a hit for this image.

Under several processes each rank embeds a contiguous shard of the images (shards differ by
at most one image; no padding, so no image is counted twice and no rank waits on a batch
another lacks), then the embeddings are gathered and every rank scores the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..contrastive import ContrastiveModel
from ..contrastive.distributed import gather_features, world
from ..cpu_speed import fast_cpu
from ..determinism import batch_invariance
from ..processing import ImageProcessor
from ..specs.data import check_class_names
from .batches import ImageReader
from .sources import PairSource

RECALL_AT = (1, 5, 10)


@dataclass
class EvalEmbeddings:
    """Embeddings of an evaluation set (all ranks gathered).

    Attributes:
        image_embeds: `(N, E)` normalised, one row per readable image, in dataset order.
        image_index: `(N,)` dataset index of each row.
        text_embeds: `(M, E)` normalised, every caption of every readable image.
        text_owner: `(M,)` row of `image_embeds` each caption describes.
        skipped: Unreadable images left out (all ranks).
    """

    image_embeds: torch.Tensor
    image_index: torch.Tensor
    text_embeds: torch.Tensor
    text_owner: torch.Tensor
    skipped: int


def shard(num: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of `range(num)` (sizes differ by at most one)."""
    return range(num * rank // world_size, num * (rank + 1) // world_size)


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    return gather_features(tensor, with_grad=False).features


@torch.no_grad()
def embed_source(
    model: ContrastiveModel,
    source: PairSource,
    processor: ImageProcessor,
    tokenizer: Callable,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalEmbeddings:
    """Embed every readable image of `source` and all its captions (sharded over ranks; a
    progress bar on rank 0 counts this rank's images)."""
    rank, world_size = world()
    reader = ImageReader(source, processor)
    mine = list(shard(len(source), rank, world_size))
    images, index, owners, skipped = [], [], [], 0
    unique, row_of_caption, texts = [], {}, []  # each distinct caption embedded once; rows per caption
    bar = tqdm(total=len(mine), desc="eval", unit="img", disable=not progress or rank != 0, dynamic_ncols=True,
               leave=False)
    for start in range(0, len(mine), batch_size):
        bar.update(len(mine[start : start + batch_size]))
        kept, pixels, bad = reader.read(mine[start : start + batch_size])
        skipped += len(bad)
        if not kept:
            continue
        captions = [(i, c) for i in kept for c in source.captions(i)]
        new = list(dict.fromkeys(c for _, c in captions if c not in row_of_caption))
        if new:
            tokens = tokenizer(new)
            unique.append(model.encode_text(tokens.input_ids.to(device), tokens.attention_mask.to(device)).float())
            row_of_caption.update({c: len(row_of_caption) + k for k, c in enumerate(new)})
        images.append(model.encode_image(pixels.to(device)).float())
        texts.extend(row_of_caption[c] for _, c in captions)
        index.append(torch.tensor(kept, device=device))
        owners.append(torch.tensor([i for i, _ in captions], device=device))
    bar.close()
    width = model.embed_dim
    cat = lambda parts, shape, dtype: torch.cat(parts) if parts else torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
    image_embeds = _gather(cat(images, (0, width), torch.float32))
    image_index = _gather(cat(index, (0,), torch.long))
    text_embeds = _gather(cat(unique, (0, width), torch.float32)[torch.tensor(texts, dtype=torch.long, device=device)])
    text_owner_index = _gather(cat(owners, (0,), torch.long))
    skipped = int(_gather(torch.tensor([skipped], device=device)).sum())
    # Rows are in rank order = dataset order (contiguous shards); map owners to rows.
    row_of = torch.full((len(source),), -1, dtype=torch.long, device=image_index.device)
    row_of[image_index] = torch.arange(len(image_index), device=image_index.device)
    return EvalEmbeddings(image_embeds, image_index, text_embeds, row_of[text_owner_index], skipped)


def zero_shot_logits(
    model: ContrastiveModel,
    image_embeds: torch.Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenizer: Callable,
) -> torch.Tensor:
    """`(N, C)` cosine similarity of each image to each class (the mean of its normalised
    prompt embeddings, normalised again)."""
    device = image_embeds.device
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = tokenizer(prompts)
    with torch.no_grad():
        text = model.encode_text(tokens.input_ids.to(device), tokens.attention_mask.to(device)).float()
    classes = text.view(len(class_names), len(templates), -1).mean(dim=1)
    classes = torch.nn.functional.normalize(classes, dim=-1)  # (C, E)
    return image_embeds @ classes.T


def retrieval_recall(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_owner: torch.Tensor, ks: Sequence[int] = RECALL_AT
) -> dict[str, float]:
    """Recall at k of image-to-text (an image is found if any of its captions ranks in the top
    k) and text-to-image (a caption finds its image in the top k). Ties count against the
    model: another candidate scoring exactly as high as the right one ranks above it (a
    constant model scores 0, not 1).

    Args:
        image_embeds: `(N, E)` normalised.
        text_embeds: `(M, E)` normalised.
        text_owner: `(M,)` image row of each caption.
    """
    metrics: dict[str, float] = {}
    sims = image_embeds @ text_embeds.T  # (N, M)
    n_images, n_texts = sims.shape
    # text -> image: rank of the true image among all images.
    true_t2i = sims[text_owner, torch.arange(n_texts)]  # (M,)
    other_image = torch.ones_like(sims, dtype=torch.bool)
    other_image[text_owner, torch.arange(n_texts)] = False
    t2i_rank = ((sims >= true_t2i.unsqueeze(0)) & other_image).sum(dim=0)  # other images scoring as high or higher
    # image -> text: best rank among the image's own captions.
    own = text_owner.unsqueeze(0) == torch.arange(n_images, device=sims.device).unsqueeze(1)  # (N, M)
    best_own = sims.masked_fill(~own, float("-inf")).max(dim=1).values  # (N,)
    i2t_rank = ((sims >= best_own.unsqueeze(1)) & ~own).sum(dim=1)  # others' captions as high or higher
    for k in ks:
        metrics[f"i2t_R@{k}"] = (i2t_rank < k).float().mean().item()
        metrics[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item()
    return metrics


@batch_invariance("off")  # metrics need no bitwise batch invariance: batched CPU kernels
def evaluate(
    model: ContrastiveModel,
    source: PairSource,
    processor: ImageProcessor,
    tokenizer: Callable,
    *,
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Zero-shot accuracy (when the source has labels and class names) and retrieval recall
    (`progress`: a bar over the images on rank 0).

    Raises:
        ValueError: Labels that `class_names` do not name (`specs.data.check_class_names`).

    Returns:
        `zero_shot_top1`, `zero_shot_top5` (if labelled; top-5 with more than 5 classes), `i2t_R@k`, `t2i_R@k` for k in 1, 5,
        10, and `num_images`, `num_captions`, `skipped_images`.
    """
    from torch.distributed.tensor import DTensor

    was_training = model.training
    model.eval()
    try:
        # On the CPU the oneDNN GEMM route (`fast_cpu`: float32 to the order of the sums; not
        # on FSDP shards); the copy shares `model`'s weights and is dropped after this evaluation.
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        fast = fast_cpu(model, enabled=torch.device(device).type == "cpu" and not sharded)
        embeds = embed_source(fast, source, processor, tokenizer, batch_size, device, progress)
        metrics: dict[str, float] = {}
        labels, names = getattr(source, "labels", None), getattr(source, "class_names", None)
        if labels is not None and names and templates:
            check_class_names(list(labels), tuple(names), getattr(source, "name", "the evaluation source"))
            logits = zero_shot_logits(fast, embeds.image_embeds, names, templates, tokenizer)
            target = torch.tensor(labels, device=logits.device)[embeds.image_index]
            top = logits.topk(min(5, len(names)), dim=1).indices
            metrics["zero_shot_top1"] = (top[:, 0] == target).float().mean().item()
            if len(names) > 5:  # with 5 classes or fewer a top-5 is every class: always 1
                metrics["zero_shot_top5"] = (top == target.unsqueeze(1)).any(dim=1).float().mean().item()
        metrics.update(retrieval_recall(embeds.image_embeds, embeds.text_embeds, embeds.text_owner))
        metrics["num_images"] = int(embeds.image_embeds.shape[0])
        metrics["num_captions"] = int(embeds.text_embeds.shape[0])
        metrics["skipped_images"] = embeds.skipped
        return metrics
    finally:
        model.train(was_training)
