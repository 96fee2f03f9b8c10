"""The connectors of whole Llama 4, PerceptionLM and Molmo2 checkpoints (their towers: `hf_llama4`,
`hf_perception_lm`, `hf_molmo2`; both parts: `load_vision_side`). Each reads the checkpoint's `config.json` and only the shards that hold
the connector's tensors, and builds the projector with the state-dict loader beside its kind
(`projectors.llama4_adapter`, `projectors.mlp_pool`, `projectors.molmo_pool`). The math, the
reference and the token budget of each are documented there.

They live here, not in `projectors`, because reading a checkpoint goes through `loading`, which
`projectors` must not reach (it reaches the VLM through the model specs).
"""

from __future__ import annotations

import os
from typing import Any

from ..loading import CONFIG_FILE, PREPROCESSOR_FILE, read_config_file, read_weights
from ..projectors import llama4_adapter, mlp_pool, molmo_pool
from ..projectors.base import Projector
from ..specs.files import SourceFiles
from ..weights import naming


def load_llama4_connector(source: str | os.PathLike, *, revision: str | None = None) -> Projector:
    """The connector of a whole Llama 4 checkpoint (a directory or hub repo id): the shuffle
    ratio from its `config.json`, the three weights from the shards that hold them.

    Raises:
        ValueError: A `model_type` other than `llama4`.
        FileNotFoundError: Missing files (a hub id not cached offline says so).
        WeightsError: The connector's keys are not exactly the reference's.
    """
    files = SourceFiles(os.fspath(source), revision)
    config = read_config_file(files.get(CONFIG_FILE))
    if config.get("model_type") != "llama4":
        raise ValueError(f"{files.source}: model_type={config.get('model_type')!r} is not a Llama 4 VLM; "
                         "expected 'llama4'")
    from transformers import Llama4Config

    ratio = float(Llama4Config.from_dict(config).vision_config.pixel_shuffle_ratio)
    scale_factor = round(1 / ratio)
    if scale_factor * ratio != 1:
        raise ValueError(f"{files.source}: pixel_shuffle_ratio={ratio} is not 1/s for an integer s")
    prefixes = (llama4_adapter.ADAPTER_PREFIX, llama4_adapter.PROJECTOR_PREFIX)
    tensors, _, read = read_weights(files, None, lambda key: key.startswith(prefixes))
    with naming(f"{files.source} ({', '.join(read)})"):
        state = {_unprefixed(k, prefixes): v for k, v in tensors.items()}
        return llama4_adapter.load_llama4_projector(state, scale_factor)


def load_perception_lm_connector(source: str | os.PathLike, *, revision: str | None = None) -> Projector:
    """The connector of a whole PerceptionLM checkpoint (a directory or hub repo id):
    `projector_pooling_ratio` from its `config.json`, the projector's weights from the shards
    that hold them.

    Raises:
        ValueError: A `model_type` other than `perception_lm`.
        FileNotFoundError: Missing files (a hub id not cached offline says so).
        WeightsError: The connector's keys are not exactly the reference's.
    """
    files = SourceFiles(os.fspath(source), revision)
    config = read_config_file(files.get(CONFIG_FILE))
    if config.get("model_type") != "perception_lm":
        raise ValueError(f"{files.source}: model_type={config.get('model_type')!r} is not a PerceptionLM; "
                         "expected 'perception_lm'")
    ratio = config.get("projector_pooling_ratio", 1)
    tensors, _, read = read_weights(files, None, lambda key: key.startswith(mlp_pool.PROJECTOR_PREFIXES))
    with naming(f"{files.source} ({', '.join(read)})"):
        state = {_unprefixed(k, mlp_pool.PROJECTOR_PREFIXES): v for k, v in tensors.items()}
        return mlp_pool.load_perception_lm_projector(state, int(ratio))


def load_molmo2_connector(source: str | os.PathLike, *, revision: str | None = None) -> Projector:
    """The adapter of a whole Molmo2 checkpoint (a directory or hub repo id): heads and layers
    from its `config.json`'s `adapter_config`, `pooling_size` from `preprocessor_config.json`
    (Molmo2ImageProcessor's `[2, 2]` without one), the weights from the shards that hold them.

    Returns:
        The projector; its input streams are the tower's `vision_feature_layer` layers, in the
        config's order (`vision_feature_layers` gives them).

    Raises:
        ValueError: A `model_type` other than `molmo2`, or an activation other than SiLU.
        FileNotFoundError: Missing files (a hub id not cached offline says so).
        WeightsError: The adapter's keys are not exactly the reference's.
    """
    files = SourceFiles(os.fspath(source), revision)
    config = read_config_file(files.get(CONFIG_FILE))
    if config.get("model_type") != "molmo2":
        raise ValueError(f"{files.source}: model_type={config.get('model_type')!r} is not a Molmo2; expected 'molmo2'")
    adapter = molmo2_adapter_config(config)
    if adapter.hidden_act != "silu":
        raise ValueError(f"{files.source}: adapter hidden_act={adapter.hidden_act!r}; "
                         "only 'silu' (Molmo2's SwiGLU) is supported")
    processor = files.get(PREPROCESSOR_FILE, required=False)
    pool_size = tuple((read_config_file(processor) if processor else {}).get("pooling_size", (2, 2)))
    parts = ("image_pooling_2d.", "image_projector.")
    adapter_keys = tuple(p + m for p in molmo_pool.ADAPTER_PREFIXES for m in parts)
    tensors, _, read = read_weights(files, None, lambda key: key.startswith(adapter_keys))
    with naming(f"{files.source} ({', '.join(read)})"):
        state = {_unprefixed(k, molmo_pool.ADAPTER_PREFIXES): v for k, v in tensors.items()}
        return molmo_pool.load_molmo2_adapter(
            state, num_layers=len(adapter.vision_feature_layer), num_heads=adapter.num_attention_heads,
            pool_size=pool_size,
        )




def molmo2_adapter_config(config: dict[str, Any]) -> Any:
    """transformers' `Molmo2AdapterConfig` of a whole Molmo2 `config.json` (released key names read)."""
    from transformers import Molmo2Config

    return Molmo2Config.from_dict(dict(config)).adapter_config


def _unprefixed(key: str, prefixes: tuple[str, ...]) -> str:
    """`key` without the first of `prefixes` it starts with."""
    return key[len(next(p for p in prefixes if key.startswith(p))):]
