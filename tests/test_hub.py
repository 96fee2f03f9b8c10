"""`push_to_hub` for every model class, offline.

`push_to_hub` builds huggingface_hub `CommitOperationAdd`s for the folder `save_pretrained`
wrote plus `README.md`; the two `HfApi` calls that would reach a server, `create_repo` and
`create_commit`, are replaced by a fake that lays the commit out as huggingface_hub caches a
repo (`snapshots/<commit>/` + `refs/main`). `from_pretrained(repo_id)` then reads it back.
"""

from __future__ import annotations

import hashlib
import shutil

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import transformers as tf
import yaml

from vlm_encoder import ContrastiveModel, VisionConfig, VisionEncoder, VisionLanguageModel
from vlm_encoder.hub import model_card
from vlm_encoder.projectors import Projector, build_projector
from vlm_encoder.text import TextConfig, TextEncoder

TINY = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
TINY_TEXT = dict(vocab_size=49408, context_length=12, width=32, depth=1, num_heads=2)


class FakeHub:
    """What the hub would hold after the calls: repos created, and each commit's files in
    the hub-cache layout under `cache`."""

    def __init__(self, cache):
        self.cache, self.repos, self.commits = cache, [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"{api.endpoint}/{repo_id}", endpoint=api.endpoint)

    def create_commit(self, api, repo_id, operations, **kwargs):
        paths = sorted(op.path_in_repo for op in operations)
        commit = hashlib.sha1(repr((repo_id, len(self.commits), paths)).encode()).hexdigest()
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        for op in operations:
            assert isinstance(op, huggingface_hub.CommitOperationAdd)
            (snapshot / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, snapshot / op.path_in_repo)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        self.commits.append((repo_id, paths, kwargs))
        return huggingface_hub.CommitInfo(
            commit_url=f"{api.endpoint}/{repo_id}/commit/{commit}", commit_message=kwargs.get("commit_message", ""),
            commit_description="", oid=commit,
        )


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(fake.cache))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_commit",
        lambda api, repo_id, operations, **kw: fake.create_commit(api, repo_id, operations, **kw),
    )
    return fake


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _models():
    torch.manual_seed(0)
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=48, n_layer=1, n_head=4, n_positions=128))
    return {
        "encoder": (VisionEncoder, VisionEncoder(VisionConfig(**TINY))),
        "contrastive": (
            ContrastiveModel,
            ContrastiveModel(VisionEncoder(VisionConfig(**TINY)), TextEncoder(TextConfig(**TINY_TEXT)), 16),
        ),
        "projector": (Projector, build_projector("mlp2x_gelu", (32,), 48)),
        "vlm": (
            VisionLanguageModel,
            VisionLanguageModel(VisionEncoder(VisionConfig(**TINY)), build_projector("mlp2x_gelu", (32,), 48), lm,
                                63, (-2,), "patch"),
        ),
    }


@pytest.mark.parametrize("kind", ["encoder", "contrastive", "projector", "vlm"])
def test_push_to_hub_and_back(kind, hub):
    cls, model = _models()[kind]
    repo_id = f"someone/tiny-{kind}"
    info = model.push_to_hub(repo_id, metrics={"top1": 0.5}, training={"lr": 1e-3}, private=True)
    assert hub.repos == [(repo_id, {"private": True, "exist_ok": True, "repo_type": "model"})]
    (pushed, paths, _), = hub.commits
    assert pushed == repo_id
    assert "README.md" in paths and any(p.endswith("config.json") for p in paths)
    back = cls.from_pretrained(repo_id)  # the hub id, through the cache
    _same_weights(back, model)
    card = huggingface_hub.ModelCard.load(hub.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
                                          / info.oid / "README.md")
    assert card.data.library_name == "vlm-encoder"
    assert yaml.safe_load(card.content.split("---")[1])["library_name"] == "vlm-encoder"
    assert "| top1 | 0.5 |" in card.text and '"lr": 0.001' in card.text
    if kind != "projector":
        assert "## Layer convention" in card.text


def test_card_names_the_source_and_preprocessing(tmp_path):
    hf_config = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=32, patch_size=8)
    tf.CLIPVisionModel(hf_config).save_pretrained(tmp_path / "hf")
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "hf")
    from vlm_encoder import load_encoder

    encoder = load_encoder(tmp_path / "hf")
    text = model_card(encoder, base_model="openai/clip-vit-base-patch32").text
    assert "converted from" in text and str(tmp_path / "hf") in text
    assert "processor_config.json" in text and '"mean"' in text
    assert "## Training" not in text and "## Metrics" not in text
    card = model_card(encoder, base_model="openai/clip-vit-base-patch32")
    assert card.data.base_model == "openai/clip-vit-base-patch32"
