"""What the Hugging Face converters share: reading a config, mapping activation names,
selecting a tower's keys, and the walker that applies a family's key table strictly (timm's
`checkpoint_filter_fn` renames, without its guessing: a key no entry names is an error)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Activation
from ..weights import WeightsError

# HF `hidden_act` names and ours. `gelu_new` is HF's hand-written tanh approximation, the
# same formula as `gelu_pytorch_tanh`.
HF_ACTIVATIONS: dict[str, Activation] = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def parse_config(config: Any, classes: Mapping[str, type], family: str) -> Any:
    """An HF config (or its `config.json` dict, parsed so that HF's defaults fill the fields a
    file leaves out) as the class `classes` names for its `model_type`.

    Raises:
        ValueError: A `model_type` not in `classes` (which are listed).
    """
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if model_type not in classes:
        expected = " or ".join(repr(name) for name in classes)
        raise ValueError(f"{family}: expected a config with model_type {expected}, got {model_type!r}")
    return classes[model_type].from_dict(dict(config)) if isinstance(config, Mapping) else config


def tower_shape(vision: Any, family: str, image_size: int | None = None) -> dict[str, Any]:
    """The `VisionConfig` geometry fields every HF vision config states the same way
    (`image_size` from the config unless given).

    `patch_remainder='drop'`: every HF family embeds patches with a strided convolution that
    floors the grid (`image_size // patch_size`, e.g. SigLIP so400m/14 at 384 px: 27 x 27),
    and sizes its position table by that floor."""
    return dict(
        image_size=square(vision.image_size, "image_size", family) if image_size is None else image_size,
        patch_size=square(vision.patch_size, "patch_size", family),
        in_channels=vision.num_channels,
        width=vision.hidden_size,
        depth=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        patch_remainder="drop",
    )


def tower_fields(vision: Any, family: str, image_size: int | None = None) -> dict[str, Any]:
    """`tower_shape` plus the MLP activation and LayerNorm epsilon of the classic families."""
    return dict(tower_shape(vision, family, image_size), act=activation(vision.hidden_act, family),
                norm_eps=vision.layer_norm_eps)


def activation(name: str, family: str) -> Activation:
    """Our `VisionConfig.act` for an HF `hidden_act`."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{family}: hidden_act={name!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def square(value: Any, name: str, family: str) -> int:
    """An HF size given as an int or a square pair, as an int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{family}: only square {name} is supported, got {value!r}")
        value = value[0]
    return int(value)


def select_tower(
    state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], ignored: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Keys of one tower with its wrapper prefix removed.

    The first of `prefixes` that some key starts with is removed from the keys under it
    (e.g. `vision_model.` of a `CLIPModel`); keys outside it are kept as they are, so that
    a top-level head (`visual_projection.weight`) is still seen. With no prefix present the
    keys are used bare (a `CLIPVisionModel` saved by transformers 5). Keys starting with one
    of `ignored` (the text tower, logit scale, a classifier) are dropped.
    """
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state_dict)), "")
    return {
        key[len(prefix) :] if prefix and key.startswith(prefix) else key: value
        for key, value in state_dict.items()
        if not key.startswith(ignored)
    }


@dataclass(frozen=True)
class Transform:
    """Our keys `targets` computed by `fn` from the HF keys `sources` (`{i}`: the block index).

    `fn` takes the source tensors in order and returns one tensor per target (a tuple when
    there are several). An `optional` transform is skipped when none of its sources is there;
    otherwise every source must be.
    """

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    fn: Callable[..., Any]
    optional: bool = False


@dataclass(frozen=True)
class KeyTable:
    """A family's checkpoint layout: how its keys become ours, applied strictly by `convert`.

    Args:
        renames: HF name -> our name, `{i}` standing for the block index. A name is a key or a
            module: `pre_layrnorm -> norm_pre` turns `pre_layrnorm.weight` into `norm_pre.weight`.
        transforms: The keys that are more than renamed (fused qkv, the CLS position row).
        optional: Prefixes of `renames` entries that a checkpoint may lack (a head); every
            other entry must match at least one key (per block, for an `{i}` entry).
        ignored: Keys dropped when present (buffers such as `embeddings.position_ids`).

    Which tensors a renamed module holds (weight, bias) is the model's to check: the result
    goes to `load_state_dict_strict`, which names a missing one as the key it feeds.
    """

    renames: Mapping[str, str]
    transforms: tuple[Transform, ...] = ()
    optional: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    def convert(self, tower: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
        """Our state dict from one tower's HF keys (no guessing: each key is consumed by
        exactly one entry, each required entry is met, nothing is produced twice).

        Raises:
            WeightsError: Naming the HF keys that are missing, unknown, or mapped twice, or
                blocks that are not numbered `0..n-1`.
        """
        tensors = {k: v for k, v in tower.items() if k not in self.ignored}
        blocks = self._blocks(tensors, family)
        out: dict[str, torch.Tensor] = {}

        def put(key: str, value: torch.Tensor, source: str) -> None:
            if key in out:
                raise WeightsError(f"{family} checkpoint maps two keys to {key!r}, the second {source!r}")
            out[key] = value

        for t in self.transforms:
            for i in blocks if "{i}" in "".join(t.sources) else [None]:
                sources = [s.format(i=i) for s in t.sources]
                missing = [s for s in sources if s not in tensors]
                if missing and (len(missing) < len(sources) or not t.optional):
                    raise WeightsError(f"{family} checkpoint is missing the keys {_listing(missing)}")
                if not missing:
                    values = t.fn(*(tensors.pop(s) for s in sources))
                    for target, value in zip(t.targets, values if isinstance(values, tuple) else (values,)):
                        put(target.format(i=i), value, sources[0])

        patterns = [(_pattern(hf), hf, ours) for hf, ours in self.renames.items()]
        met, unknown = set(), []
        for key, value in tensors.items():
            match = next(((m, hf, ours) for rx, hf, ours in patterns if (m := rx.fullmatch(key))), None)
            if match is None:
                unknown.append(key)
                continue
            m, hf, ours = match
            i = int(m["i"]) if "{i}" in hf else None
            met.add((hf, i))
            put(ours.format(i=i) + (m["rest"] or ""), value, key)
        if unknown:
            raise WeightsError(f"{family} checkpoint has keys the converter does not know: {_listing(unknown)}")
        missing = [
            hf.format(i=i)
            for hf in self.renames
            if not hf.startswith(self.optional)
            for i in (blocks if "{i}" in hf else [None])
            if (hf, i) not in met
        ]
        if missing:
            raise WeightsError(f"{family} checkpoint is missing the keys (or modules) {_listing(missing)}")
        return out

    def _blocks(self, tensors: Mapping[str, torch.Tensor], family: str) -> list[int]:
        """The block indices `0..n-1` found under the table's `{i}` prefixes."""
        names = [*self.renames, *(s for t in self.transforms for s in t.sources)]
        prefixes = tuple({name.split("{i}")[0] for name in names if "{i}" in name})
        if not prefixes:
            return []
        heads = (key[len(p) :].split(".", 1)[0] for key in tensors for p in prefixes if key.startswith(p))
        indices = {int(head) for head in heads if head.isdigit()}
        if not indices:
            raise WeightsError(f"{family} checkpoint has no blocks under {_listing(prefixes)}")
        if indices != set(range(len(indices))):
            raise WeightsError(f"{family} checkpoint's blocks are not numbered 0..n-1: {sorted(indices)}")
        return sorted(indices)


def native_image_processor(config: Any, data: dict[str, Any] | None, resize_mode: str, processor_class: str) -> Any:
    """A native-resolution tower's processor: from the checkpoint's `preprocessor_config.json`
    (`data`), which must be `processor_class` (our `resize_mode`, or no resize) with the tower's
    `patch_size`; without one, a resize to the native size (bicubic, torchvision), mean = std = 0.5.

    Raises:
        ValueError: Another processor class, or a `patch_size` that is not the tower's.
    """
    from ..processing import ImageProcessor, ProcessorConfig

    if data is None:
        return ImageProcessor(ProcessorConfig(resize_mode="exact", size=config.image_size, interpolation="bicubic",
                                              backend="torchvision", mean=0.5, std=0.5))
    processor = ImageProcessor.from_hf_config(data)
    hf = processor.config
    if hf.resize_mode not in (resize_mode, "none") or hf.crop_size is not None:
        raise ValueError(f"the checkpoint's processor should be {processor_class}, got {data.get('image_processor_type')!r}")
    if hf.resize_mode == resize_mode and hf.patch_size != config.patch_size:
        raise ValueError(f"{processor_class} patch_size={hf.patch_size} is not the tower's patch_size {config.patch_size}")
    return processor


def _pattern(name: str) -> re.Pattern[str]:
    """`name` (with `{i}`) as a regex for the key itself or the keys under it."""
    return re.compile(re.escape(name).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"(?P<rest>\..+)?")


def fused_qkv(attn: str, names: tuple[str, str, str], optional_bias: bool = False) -> tuple[Transform, Transform]:
    """Our `blocks.{i}.attn.qkv` weight and bias (rows q, k, v) from the linears `attn.<name>`."""
    return tuple(
        Transform(
            (f"blocks.{{i}}.attn.qkv.{p}",),
            tuple(f"{attn}.{n}.{p}" for n in names),
            lambda *t: torch.cat(t, dim=0),
            optional=optional_bias and p == "bias",
        )
        for p in ("weight", "bias")
    )


def as_rows(table: torch.Tensor) -> torch.Tensor:
    """A table of token rows `(N, D)` (or already `(1, N, D)`) as `(1, N, D)`."""
    return table.reshape(1, -1, table.shape[-1])


def split_position_table(position: torch.Tensor, cls_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the CLS row of an HF position table `(1, 1+N, D)` into the CLS token.

    Returns:
        `cls_token + pos[0]` as `(1, 1, D)` and the patch rows `(1, N, D)`.
    """
    position = position.reshape(1, -1, position.shape[-1])  # (1, 1+N, D)
    return cls_token.reshape(1, 1, -1) + position[:, :1], position[:, 1:].contiguous()
