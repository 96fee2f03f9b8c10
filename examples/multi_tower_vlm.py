"""A VLM with two vision towers (Prismatic's DINOv2 + SigLIP), end to end, in a few seconds.

    python examples/multi_tower_vlm.py [--out DIR] [--resize interpolate|pool]

The towers come from presets, shrunk to 2 blocks of width 64 (random weights): DINOv2-S/14
at 224 px (a 16x16 patch grid) and SigLIP-B/16 at 384 px (24x24). Each has its own image
processor; SigLIP's grid is brought to DINOv2's 16x16 (`tower_resize`), then a
`pixel_shuffle` projector (InternVL's channel order) concatenates the towers' channels and
merges 2x2 patches into 64 image tokens for a tiny random GPT-2. One forward pass, one
greedy `generate` on scikit-image's astronaut photo, and a save / load round trip that gives
the same logits. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from skimage import data
from transformers import GPT2Config, GPT2LMHeadModel

from projectors import build_projector
from vlm_encoder import VisionLanguageModel, create_encoder

IMAGE_ID = 99  # the <image> placeholder of the tiny LM's 100-token vocabulary
TINY = {"width": 64, "depth": 2, "num_heads": 4}


def build(resize: str) -> VisionLanguageModel:
    """Two towers, a pixel-shuffle projector and a tiny GPT-2 (random weights)."""
    torch.manual_seed(0)
    dino = create_encoder("vit_small_patch14_dinov2", image_size=224, **TINY)  # 16x16 patches
    siglip = create_encoder("vit_base_patch16_siglip_384", **TINY)  # 24x24 patches
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=128, n_layer=2, n_head=4, n_positions=256,
                                    bos_token_id=0, eos_token_id=0))
    # One input stream per tower layer: DINOv2's last block, SigLIP's last two (widths 64 each).
    projector = build_projector("pixel_shuffle", (64, 64, 64), 128, scale_factor=2, order="offset_major")
    return VisionLanguageModel([dino, siglip], projector, lm, IMAGE_ID, feature_layers=[(-1,), (-2, -1)],
                               tower_resize=resize).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to save the model (default: a temporary directory)")
    parser.add_argument("--resize", choices=("interpolate", "pool"), default="pool",
                        help="how SigLIP's 24x24 grid is brought to DINOv2's 16x16")
    args = parser.parse_args(argv)

    vlm = build(args.resize)
    for i, tower in enumerate(vlm.encoders):
        c = tower.config
        print(f"tower {i}: {c.image_size[0]} px, patch {c.patch_size}, grid {c.grid_size[0]}x{c.grid_size[1]}, "
              f"layers {vlm.feature_layers[i]}")
    pixel_values = vlm.preprocess(data.astronaut())  # one tensor per tower, each tower's own processor
    print("pixel_values:", [tuple(p.shape) for p in pixel_values])
    with torch.no_grad():
        streams = vlm.tower_features(pixel_values)
    print(f"streams on the common grid {vlm.tower_grid} ({args.resize}):", [tuple(s.shape) for s in streams])
    print("image tokens per image:", vlm.num_image_tokens())

    ids = torch.tensor([vlm.expand_image_tokens([1, IMAGE_ID, 5, 6, 7])])
    with torch.no_grad():
        logits = vlm(ids, pixel_values).logits
    print("logits:", tuple(logits.shape))
    new = vlm.generate(ids, pixel_values, max_new_tokens=5, do_sample=False, pad_token_id=0)
    print("generated ids:", new[0].tolist())

    with tempfile.TemporaryDirectory() as tmp:
        out = vlm.save_pretrained(args.out or Path(tmp) / "two_tower_vlm")
        print("saved:", sorted(p.name for p in out.iterdir()))
        loaded = VisionLanguageModel.from_pretrained(out)
        with torch.no_grad():
            same = torch.equal(loaded(ids, pixel_values).logits, logits)
    print("logits equal after save / load:", same)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
