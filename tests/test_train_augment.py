"""Training augmentation (`augment`): open_clip's train transform, seeded per image so the crops
do not depend on DataLoader workers or on where a run was resumed."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image
from test_train import _train, params, tiny_config
from train_helpers import run_killed_after

from vlm_encoder.processing import ImageProcessor
from vlm_encoder.processing.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ProcessorConfig
from vlm_encoder.train import TrainConfig, open_pair_source
from vlm_encoder.train.augment import TrainAugment, augment_seed
from vlm_encoder.train.batches import PairBatches, batch_loader
from vlm_encoder.train.sampler import EpochSampler
from vlm_encoder.text import TextEncoder, text_preset_config

SHAPES = {"num_train": 40, "num_test": 13, "canvas": 16}


def _processor(size: int = 16) -> ImageProcessor:
    return ImageProcessor(ProcessorConfig(resize_mode="exact", size=(size, size), interpolation="bicubic",
                                          mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD))


def test_equals_open_clip_train_transform_at_the_same_seed():
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.image_transform(24, is_train=True, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    augment = TrainAugment(_processor(24), seed=3)
    image = Image.fromarray(torch.randint(0, 256, (37, 29, 3), dtype=torch.uint8).numpy())
    for epoch, index in [(0, 0), (1, 5), (4, 17)]:
        torch.manual_seed(augment_seed(3, epoch, index))
        expected = reference(image)
        state = torch.get_rng_state()
        got = augment(image, epoch, index)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def _batches(augment: bool, num_workers: int = 0, count: int = 6) -> list:
    source = open_pair_source("builtin:shapes", "train", options=SHAPES)
    tokenizer = TextEncoder(text_preset_config("tiny", width=32, depth=1, num_heads=2, context_length=12)).tokenizer()
    processor = _processor()
    dataset = PairBatches(source, processor, tokenizer, seed=0, augment=TrainAugment(processor, 0) if augment else None)
    sampler = EpochSampler(len(source), 8, seed=0)  # 5 batches an epoch: 6 batches cross an epoch
    return list(itertools.islice(batch_loader(dataset, sampler, num_workers), count))


def test_augment_changes_the_pixels_and_workers_do_not():
    plain, augmented = _batches(False), _batches(True)
    for a, b in zip(plain, augmented):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.input_ids, b.input_ids)
        assert a.pixel_values.shape == b.pixel_values.shape == (8, 3, 16, 16)
        assert not torch.allclose(a.pixel_values, b.pixel_values, atol=1e-3)
    # The same image is cropped afresh in a new epoch.
    first = {int(i): p for i, p in zip(augmented[0].indices, augmented[0].pixel_values)}
    later = {int(i): p for i, p in zip(augmented[5].indices, augmented[5].pixel_values)}
    assert any(not torch.equal(first[i], later[i]) for i in first.keys() & later.keys())
    for a, b in zip(augmented, _batches(True, num_workers=2)):
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_off_by_default_and_refused_with_cached_features():
    assert TrainConfig().augment is False
    with pytest.raises(ValueError, match="cache_image_features"):
        TrainConfig(augment=True, lock_image=True)
    TrainConfig(augment=True, lock_image=True, cache_image_features=False)


@pytest.mark.slow  # three short runs
def test_augmented_resume_is_exact(tmp_path):
    steps = dict(max_steps=5, checkpoint_every=2, augment=True)
    straight, _ = _train(tiny_config(tmp_path / "a", **steps))
    config = tiny_config(tmp_path / "b", **steps)
    run_killed_after(config, 3)
    resumed, result = _train(config)
    assert result.resumed_from.name == "step_00000002"
    expected, got = params(straight.model), params(resumed.model)
    unaugmented, _ = _train(tiny_config(tmp_path / "c", max_steps=5))
    assert any(not torch.equal(expected[k], v) for k, v in params(unaugmented.model).items())
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
