"""Training augmentation as open_clip does it: `RandomResizedCrop(size, scale=(0.9, 1.0),
interpolation=bicubic)` on the RGB image (torchvision v2), then the processor's normalisation.

open_clip's `image_transform(is_train=True)` with its default `AugmentationCfg` is exactly this
(its colour jitter, grayscale and timm options are off by default). Its crops come from the
global torch RNG, so they would depend on the order DataLoader workers read in and on where a
run was resumed. Here each image's crop is drawn from the torch RNG seeded by
`(seed, epoch, index)` for that one draw (`torch.random.fork_rng`: the process's RNG is left as
it was): the crops follow from the sampler's `(epoch, position)`, which every checkpoint holds,
so a resumed run and any `num_workers` give the same pixels as a straight run.
"""

from __future__ import annotations

import torch

from ..processing import ImageProcessor
from ..processing.convert import to_rgb
from ..processing.transforms import rescale_and_normalize

# open_clip's `AugmentationCfg` default scale; the aspect ratio is torchvision's (3/4, 4/3).
OPEN_CLIP_SCALE = (0.9, 1.0)


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation (a stream apart from `choose_caption`'s)."""
    return ((seed * 1_000_033 + epoch) * 10_000_079 + index) * 2 + 1


class TrainAugment:
    """open_clip's training transform for a processor's output size and statistics.

    Args:
        processor: Supplies the output size (`config.output_size`, which must be fixed), the
            RGB conversion rules and the rescale / mean / std.
        seed: The run's seed.
        scale: `RandomResizedCrop`'s area range.

    Raises:
        ValueError: The processor has no fixed output size (NaFlex, `resize_mode='none'`).
    """

    def __init__(self, processor: ImageProcessor, seed: int, scale: tuple[float, float] = OPEN_CLIP_SCALE) -> None:
        from torchvision.transforms import v2

        size = processor.config.output_size
        if size is None:
            raise ValueError(
                f"augment needs a processor with a fixed output size, and {processor} has none "
                "(set resize_mode='exact' or a crop_size)"
            )
        self.processor = processor
        self.seed = seed
        self.crop = v2.RandomResizedCrop(list(size), scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                                         antialias=True)

    def __call__(self, image, epoch: int, index: int) -> torch.Tensor:
        """One augmented image `(3, H, W)` float32, normalised as the processor does."""
        from PIL import Image
        from torchvision.transforms.v2 import functional as tvF

        cfg = self.processor.config
        rgb = to_rgb(image, cfg.background, cfg.exif_transpose)  # (H, W, 3)
        # uint8 through PIL, as open_clip (PIL images); 16-bit / float data as a float tensor.
        picture = Image.fromarray(rgb, mode="RGB") if rgb.dtype.name == "uint8" else torch.from_numpy(rgb.copy()).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augment_seed(self.seed, epoch, index))
            cropped = self.crop(picture)
        pixels = tvF.pil_to_tensor(cropped) if isinstance(cropped, Image.Image) else cropped.clamp(0.0, 255.0)
        return rescale_and_normalize(pixels[None].float(), cfg.rescale_factor, cfg.mean, cfg.std)[0]
