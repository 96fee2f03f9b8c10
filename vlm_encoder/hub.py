"""Share a model on the Hugging Face Hub: `push_to_hub` writes what `save_pretrained` writes
plus a model card (`README.md`), and uploads the folder with `huggingface_hub`'s
`create_repo` + `create_commit` (one commit of a `CommitOperationAdd` per file). `from_pretrained(repo_id)` reads it back through
the hub cache, like any repo.

The card states the architecture, the source checkpoint (when the model was converted from
one), the layer convention, the preprocessing, and the training config and metrics when
given.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

LIBRARY = "vlm-encoder"
LAYER_CONVENTION = (
    "Layer `i` is the output of block `i` (0-based); negative indices count from the end "
    "(`-1` is the last block). Tokens are the raw block outputs unless `norm=True`. In HF terms "
    "layer `i` is `hidden_states[i + 1]` (`hidden_states[0]` is the embeddings)."
)


def _json(data: Any) -> str:
    return "```json\n" + json.dumps(data, indent=2, sort_keys=True, default=str) + "\n```"


def _towers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """`(name, VisionEncoder)` for every image tower of `model`."""
    from .encoder import VisionEncoder

    if isinstance(model, VisionEncoder):
        return [("encoder", model)]
    vision = getattr(model, "vision", None)  # ContrastiveModel
    if isinstance(vision, VisionEncoder):
        return [("vision", vision)]
    encoders = getattr(model, "encoders", None) or ([model.encoder] if hasattr(model, "encoder") else [])
    return [(f"encoder_{i}" if len(encoders) > 1 else "encoder", e) for i, e in enumerate(encoders)]


def model_card(
    model: torch.nn.Module,
    *,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
) -> Any:
    """The `huggingface_hub.ModelCard` for `model` (any of the package's model classes).

    Args:
        model: `VisionEncoder`, `ContrastiveModel`, `VisionLanguageModel` or `Projector`.
        training: The training config (e.g. the run's `config.yaml` as a dict).
        metrics: Evaluation results (name -> value).
        base_model: The hub id it was made from (default: the source of a converted tower).
    """
    from huggingface_hub import ModelCard, ModelCardData

    kind = type(model).__name__
    towers = _towers(model)
    sources = [getattr(e, "source_info", None) or {} for _, e in towers]
    base_model = base_model or next((s["source"] for s in sources if _is_hub_id(s.get("source"))), None)
    data = ModelCardData(library_name=LIBRARY, tags=[LIBRARY, kind], base_model=base_model)
    lines = [f"# {kind}", "", f"A `{kind}` of [{LIBRARY}], loaded with `{kind}.from_pretrained(repo_id)`.", ""]
    lines += ["## Architecture", ""]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        lines += [_json(config.to_dict()), ""]
    for (name, encoder), source in zip(towers, sources):
        c = encoder.config
        lines.append(
            f"- `{name}`: ViT, width {c.width}, {c.depth} blocks, {c.num_heads} heads, patch {c.patch_size}, "
            f"image {c.image_size[0]}x{c.image_size[1]}, pool `{c.pool}`"
            + (f"; converted from `{source.get('source')}` ({source.get('family', source.get('model_type'))})"
               if source else "")
        )
    if towers:
        lines += ["", "## Layer convention", "", LAYER_CONVENTION, ""]
    lines += ["## Preprocessing", ""]
    processors = [(n, e.get_image_processor()) for n, e in towers]
    processors = [(n, p) for n, p in processors if p is not None]
    if processors:
        for name, processor in processors:
            lines += [f"`{name}` (saved as `processor_config.json`):", "", _json(processor.to_dict()), ""]
    else:
        lines += ["None recorded: this model carries no image processor.", ""]
    if training:
        lines += ["## Training", "", _json(dict(training)), ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()] + [""]
    lines += [f"[{LIBRARY}]: https://pypi.org/project/{LIBRARY}/", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _is_hub_id(source: Any) -> bool:
    return isinstance(source, str) and source.count("/") == 1 and not os.path.exists(source) and ":" not in source


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    *,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> Any:
    """Upload `model` with a model card to the hub repo `repo_id` (created if missing).

    What is uploaded is exactly what `model.save_pretrained` writes, plus `README.md`
    (`model_card`), in one commit.

    Args:
        model: Any of the package's model classes.
        repo_id: `owner/name`.
        training, metrics, base_model: For the card (see `model_card`).
        private, token, revision, commit_message: As `huggingface_hub.HfApi.create_commit`.
        api: The `HfApi` to use (default `HfApi(token=token)`; pass one with another
            `endpoint` for a private hub).

    Returns:
        `create_commit`'s `CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        model_card(model, training=training, metrics=metrics, base_model=base_model).save(folder / "README.md")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # One `CommitOperationAdd` per file of the folder, in one `create_commit`: the upload is
        # exactly this list (nothing filtered or added by a pattern).
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {type(model).__name__} with {LIBRARY}",
        )
