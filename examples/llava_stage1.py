"""LLaVA stage 1 (feature alignment) on procedurally drawn shapes, offline and on a CPU.

    python examples/llava_stage1.py --quick --out llava_stage1_output

What LLaVA's first stage does: the vision encoder and the LLM stay frozen and only the
projector trains, with the next-token loss on the caption of each image, so that the
projected image tokens land where the LLM can read them. Here everything is tiny and built
offline:

* images: coloured circles, squares and triangles drawn with PIL (32x32), captioned
  "a red circle";
* tokenizer: a word-level `tokenizers` model wrapped in `PreTrainedTokenizerFast`;
* encoder: a tiny random `VisionEncoder` (frozen), layer -2 as LLaVA;
* language model: a tiny Llama that first learns to write the caption of the colour and
  shape words it finds anywhere in a context of noise vectors (a stand-in for a pretrained
  LLM that reads words but has never seen an image), then is frozen;
* projector: `mlp2x_gelu`, the only part that trains (with `--deepstack 0 1`, also one
  `mlp2x_gelu` per DeepStack tap: encoder layers whose tokens are added to the LM's hidden
  states at the image positions after its decoder layers 0, 1, ..., as Qwen3-VL).

The script prints the caption loss before and after, saves the projector with
`save_pretrained`, reloads it with `Projector.from_pretrained`, and captions new images.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from projectors import Projector, build_projector
from vlm_encoder import VisionConfig, VisionEncoder, VisionLanguageModel

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 220, 40)}
SHAPES = ("circle", "square", "triangle")
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<image>"]
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Stage1Config:
    """Sizes and schedule of the run (`--quick` shortens it)."""

    lm_steps: int = 300
    projector_steps: int = 800
    batch_size: int = 32
    lm_width: int = 64
    encoder_width: int = 64
    lr: float = 2e-3
    seed: int = 0
    deepstack_layers: tuple[int, ...] = ()  # encoder layers tapped for DeepStack (at most the LM's 2 layers)


QUICK = Stage1Config(lm_steps=150, projector_steps=150)


# ----------------------------------------------------------------- data
def draw_shape(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A `shape` in `colour` of random size and place on a grey background."""
    grey = rng.randint(90, 150)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    size = rng.randint(14, 24)
    x0, y0 = rng.randint(1, IMAGE_SIZE - size - 1), rng.randint(1, IMAGE_SIZE - size - 1)
    box = (x0, y0, x0 + size, y0 + size)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=COLOURS[colour])
    return image


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images to normalised pixels `(B, 3, H, W)` in [-1, 1]."""
    array = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2 - 1


def sample_batch(n: int, rng: random.Random, draw: bool = True) -> tuple[torch.Tensor | None, list[str]]:
    """`n` random images `(n, 3, 32, 32)` (or `None` without `draw`) and their captions."""
    pairs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]
    pixels = to_pixels([draw_shape(c, s, rng) for c, s in pairs]) if draw else None
    return pixels, [f"a {c} {s}" for c, s in pairs]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the caption words, built offline."""
    words = SPECIAL + ["a"] + list(COLOURS) + list(SHAPES)
    model = models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
        additional_special_tokens=["<image>"],
    )


def encode_batch(tokenizer, captions: list[str], image_prefix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[BOS] image-tokens caption [EOS]` ids `(B, L)` and labels (-100 on BOS; the model
    sets the image positions to -100 itself). All captions have the same length here."""
    rows = [[tokenizer.bos_token_id] + image_prefix + tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for c in captions]
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, 0] = -100
    return ids, labels


# --------------------------------------------------------------- models
def build_models(cfg: Stage1Config, tokenizer) -> tuple[VisionEncoder, LlamaForCausalLM]:
    encoder = VisionEncoder(VisionConfig(image_size=IMAGE_SIZE, patch_size=8, width=cfg.encoder_width, depth=3, num_heads=4))
    lm = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.lm_width, intermediate_size=4 * cfg.lm_width,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    )
    return encoder, lm


def word_context(lm: LlamaForCausalLM, tokenizer, captions: list[str], length: int, rng: random.Random) -> torch.Tensor:
    """Context embeddings `(B, length, d)`: the caption's colour and shape words each at a
    few random slots, Gaussian noise (at the embedding table's scale) everywhere else."""
    table = lm.get_input_embeddings().weight.detach()
    context = torch.randn(len(captions), length, table.shape[1]) * table.std()
    for row, caption in enumerate(captions):
        _, colour, shape = caption.split()
        slots = rng.sample(range(length), 2 * rng.randint(1, length // 4))
        for i, slot in enumerate(slots):
            context[row, slot] = table[tokenizer.convert_tokens_to_ids(colour if i % 2 else shape)]
    return context


def pretrain_lm(lm: LlamaForCausalLM, tokenizer, cfg: Stage1Config, context_length: int, rng: random.Random) -> None:
    """Teach the tiny LM to write the caption of the words found in its context.

    A stand-in for a pretrained LLM, which can read words anywhere in its context but has
    never seen an image: the caption `[BOS] ctx a red circle [EOS]` follows a context of
    `context_length` slots (the number of image tokens) where the colour and shape words
    sit at random slots among noise vectors. Stage 1 then has to map image tokens into
    this word-embedding space, which is what feature alignment means.
    """
    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr)
    embed = lm.get_input_embeddings()
    lm.train()
    for _ in tqdm(range(cfg.lm_steps), desc="LM pretraining", dynamic_ncols=True):
        _, captions = sample_batch(cfg.batch_size, rng, draw=False)
        ids, labels = encode_batch(tokenizer, captions, [tokenizer.pad_token_id] * context_length)
        labels[:, 1 : 1 + context_length] = -100
        inputs = embed(ids)
        inputs = torch.cat([inputs[:, :1], word_context(lm, tokenizer, captions, context_length, rng), inputs[:, 1 + context_length :]], dim=1)
        loss = lm(inputs_embeds=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.eval()
    print(f"LM pretraining on captions after a word context: {cfg.lm_steps} steps, loss {loss.item():.3f} per token "
          f"(guessing colour and shape: {math.log(len(COLOURS) * len(SHAPES)) / 4:.3f})")


def caption_loss(vlm: VisionLanguageModel, tokenizer, batch, prefix) -> torch.Tensor:
    pixels, captions = batch
    ids, labels = encode_batch(tokenizer, captions, prefix)
    return vlm(ids, pixels, labels=labels).loss


def train_projector(vlm: VisionLanguageModel, tokenizer, cfg: Stage1Config, rng: random.Random) -> tuple[float, float]:
    """Stage 1: only the projector's parameters are optimised. Returns the loss before and after."""
    prefix = [vlm.image_token_id] * vlm.num_image_tokens()
    held_out = sample_batch(64, rng)
    with torch.no_grad():
        before = caption_loss(vlm, tokenizer, held_out, prefix).item()
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    projectors = [*vlm.projector.parameters(), *vlm.deepstack_projectors.parameters()]
    assert len(trainable) == len(projectors) and all(p is q for p, q in zip(trainable, projectors)), "only the projectors train"
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr)
    vlm.train()
    for step in tqdm(range(1, cfg.projector_steps + 1), desc="projector", dynamic_ncols=True):
        loss = caption_loss(vlm, tokenizer, sample_batch(cfg.batch_size, rng), prefix)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, cfg.projector_steps // 5) == 0:
            tqdm.write(f"  step {step:4d}  caption loss {loss.item():.3f}")
    vlm.eval()
    with torch.no_grad():
        after = caption_loss(vlm, tokenizer, held_out, prefix).item()
    return before, after


@torch.no_grad()
def caption_images(vlm: VisionLanguageModel, tokenizer, n: int, rng: random.Random) -> float:
    """Greedy captions for `n` new images; prints a few and returns the exact-match accuracy."""
    pixels, truth = sample_batch(n, rng)
    prompt = torch.tensor([[tokenizer.bos_token_id] + [vlm.image_token_id] * vlm.num_image_tokens()] * n)
    new = vlm.generate(prompt, pixels, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    predicted = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    for p, t in list(zip(predicted, truth))[:4]:
        print(f"  image of {t!r:22} -> {p!r}")
    return sum(p == t for p, t in zip(predicted, truth)) / n


def build_vlm(cfg: Stage1Config, encoder: VisionEncoder, projector: Projector, lm: LlamaForCausalLM, tokenizer,
              deepstack: list[Projector] | None = None) -> VisionLanguageModel:
    """The VLM over layer -2 (as LLaVA), with one `mlp2x_gelu` per `cfg.deepstack_layers` tap
    (new, or the `deepstack` projectors given)."""
    if deepstack is None:
        deepstack = [build_projector("mlp2x_gelu", encoder.width, lm.config.hidden_size) for _ in cfg.deepstack_layers]
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    return VisionLanguageModel(encoder, projector, lm, image_token_id, feature_layers=(-2,),
                               deepstack_layers=cfg.deepstack_layers, deepstack_projectors=deepstack)


def run(cfg: Stage1Config, out_dir: Path) -> dict[str, float]:
    """The whole stage-1 run; returns the losses before and after, and the caption accuracy."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer()
    encoder, lm = build_models(cfg, tokenizer)
    projector = build_projector("mlp2x_gelu", encoder.width, lm.config.hidden_size)
    pretrain_lm(lm, tokenizer, cfg, projector.num_output_tokens(encoder.config.grid_size), rng)
    print(f"  ({time.perf_counter() - start:.0f} s so far)")

    vlm = build_vlm(cfg, encoder, projector, lm, tokenizer)
    taps = f", DeepStack taps {cfg.deepstack_layers}" if cfg.deepstack_layers else ""
    print(f"stage 1: encoder and LM frozen, projector trains ({sum(p.numel() for p in projector.parameters())} "
          f"parameters, {vlm.num_image_tokens()} image tokens per image{taps})")
    before, after = train_projector(vlm, tokenizer, cfg, rng)
    print(f"held-out caption loss: {before:.3f} before -> {after:.3f} after ({time.perf_counter() - start:.0f} s so far)")

    saved = projector.save_pretrained(out_dir / "projector")
    deep = [p.save_pretrained(out_dir / f"deepstack_{j}") for j, p in enumerate(vlm.deepstack_projectors)]
    tokenizer.save_pretrained(out_dir / "tokenizer")
    reloaded = Projector.from_pretrained(saved)
    print(f"saved the projector to {saved} and reloaded it")
    vlm_reloaded = build_vlm(cfg, encoder, reloaded, lm, tokenizer, [Projector.from_pretrained(d) for d in deep])
    accuracy = caption_images(vlm_reloaded, tokenizer, 64, rng)
    print(f"exact-match captions on 64 new images with the reloaded projector: {accuracy:.0%} "
          f"(chance {1 / (len(COLOURS) * len(SHAPES)):.0%}); {time.perf_counter() - start:.0f} s in all")
    return {"loss_before": before, "loss_after": after, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short run of `make demo` (well under a minute on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path("llava_stage1_output"), help="where the projector is saved")
    parser.add_argument("--steps", type=int, default=None, help="projector training steps (overrides the default)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; models this tiny run fastest on one")
    parser.add_argument("--deepstack", type=int, nargs="*", default=[], metavar="LAYER",
                        help="encoder layers tapped for DeepStack, added after LM layers 0, 1 (e.g. --deepstack 0 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else Stage1Config()
    if args.steps is not None:
        cfg = Stage1Config(**{**cfg.__dict__, "projector_steps": args.steps})
    if args.deepstack:
        cfg = Stage1Config(**{**cfg.__dict__, "deepstack_layers": tuple(args.deepstack)})
    result = run(cfg, args.out)
    if not result["loss_after"] < result["loss_before"]:
        raise SystemExit("the caption loss did not fall")


if __name__ == "__main__":
    main()
