"""A whole HF `CLIPModel` directory through the front door: `eval` / `info` / `load_model(need=
"contrastive")` read both towers (`converters.hf_clip_text.load_contrastive`) with the
reference's image embeds, text embeds and logits for captions tokenized by CLIP's BPE, also
under the legacy `eos_token_id = 2` every OpenAI CLIP on the hub carries (HF then pools at the
largest id, which is CLIP's end token); an image-tower command still gets the tower with its
projection; a text tower the package does not express leaves `info` describing the image tower."""

from __future__ import annotations

import json

import pytest
import torch

from parity_helpers import close, perturb
from vlm_encoder.cli import main
from vlm_encoder.specs.models import load_model

tf = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
# CLIP's BPE: 49,408 ids, start 49,406, end 49,407 (the largest). OpenAI's configs say 0 / 1 / 2.
BPE_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=49408,
                max_position_embeddings=77)
TEXT_IDS = {"legacy": dict(bos_token_id=0, pad_token_id=1, eos_token_id=2),
            "current": dict(bos_token_id=49406, pad_token_id=49407, eos_token_id=49407)}
CAPTIONS = ["a photo of a cat", "a red circle on a blue square", "dog"]


def _save(directory, text: dict) -> CLIPModel:
    torch.manual_seed(0)
    reference = perturb(CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16)))
    reference.save_pretrained(directory)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return reference


@pytest.fixture(scope="module", params=sorted(TEXT_IDS))
def whole(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"clip_{request.param}")
    return _save(directory, {**BPE_TEXT, **TEXT_IDS[request.param]}), directory, request.param


def test_a_clip_directory_is_a_contrastive_model_with_the_references_outputs(whole):
    reference, directory, ids = whole
    loaded = load_model(str(directory), need="contrastive")
    assert loaded.kind == "contrastive" and loaded.info["family"] == "clip"
    model = loaded.model
    tokens = model.text.tokenizer()(CAPTIONS).input_ids
    assert int(tokens.max()) == 49407  # every caption ends with CLIP's end token, the largest id
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(pixels, tokens)
        theirs = reference(input_ids=tokens, pixel_values=pixels)
    close(f"clip contrastive ({ids} ids)", ours.image_embeds, theirs.image_embeds, "image embeds")
    close(f"clip contrastive ({ids} ids)", ours.text_embeds, theirs.text_embeds, "text embeds")
    close(f"clip contrastive ({ids} ids)", ours.logits_per_image(), theirs.logits_per_image, "logits", atol=1e-4)


def test_an_image_tower_command_still_gets_the_tower_with_its_projection(whole):
    reference, directory, _ = whole
    loaded = load_model(str(directory), need="vision")
    assert loaded.kind == "encoder" and loaded.model.config.embed_dim == 16
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = loaded.model.project(loaded.model(pixels).pooled)
        theirs = reference.get_image_features(pixel_values=pixels)
    close("clip tower projection", ours, getattr(theirs, "pooler_output", theirs), "image features")


def test_info_and_eval_take_the_directory(whole, capsys):
    _, directory, _ = whole
    assert main(["info", str(directory), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["kind"] == "contrastive" and description["contrastive"]["embed_dim"] == 16
    code = main(["eval", str(directory), "--data", "builtin:shapes", "--data-option", "num_test=8", "--data-option",
                 "canvas=32", "--split", "test", "--json", "--cpu", "--templates", "a {} shape", "--no-progress",
                 "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert 0.0 <= json.loads(captured.out)["i2t_R@1"] <= 1.0


def test_a_legacy_text_tower_off_clips_vocabulary_is_refused_by_eval_and_described_by_info(tmp_path, capsys):
    """eos 2 means argmax pooling: the same rule as pooling at the end token only for CLIP's BPE."""
    _save(tmp_path, {**BPE_TEXT, "vocab_size": 99, **TEXT_IDS["legacy"]})
    with pytest.raises(ValueError, match="legacy argmax pooling.*this vocabulary has 99"):
        load_model(str(tmp_path), need="contrastive")
    assert main(["info", str(tmp_path), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["kind"] == "encoder" and "legacy argmax" in description["source"]["text_tower"]


def test_eval_help_names_a_clip_directory(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "HF CLIP or MetaCLIP 2 directory or hub id" in " ".join(capsys.readouterr().out.split())
