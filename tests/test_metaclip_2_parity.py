"""MetaCLIP 2 vs transformers' `metaclip_2` on tiny random models saved with `save_pretrained`
(every weight jittered): the vision tower layer by layer at its native size and a resized
non-square one, and a whole `MetaClip2Model` directory as a `ContrastiveModel` whose image
embeds, text embeds and logits are the reference's, with the text pooled at the first
`eos_token_id` = 2 (the XLM-R id of the real checkpoints, where CLIP would take the legacy
argmax); `info` and `eval` take the directory through the front door, and the real hub ids
fail offline in one line."""

from __future__ import annotations

import json

import pytest
import torch

from parity_helpers import close, perturb
from vlm_encoder import load_encoder
from vlm_encoder.cli import main
from vlm_encoder.converters import hf_metaclip_2
from vlm_encoder.specs.models import load_model

tf = pytest.importorskip("transformers")
from transformers import MetaClip2Config, MetaClip2Model, MetaClip2VisionConfig, MetaClip2VisionModel  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act="gelu")
# XLM-R's special ids, as facebook/metaclip-2-worldwide-*: <s> 0, <pad> 1, </s> 2, <unk> 3.
WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "circle", "square", "triangle", "shape"]
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=40,
            max_position_embeddings=16, bos_token_id=0, pad_token_id=1, eos_token_id=2, hidden_act="gelu")
SIZES = [(32, 32), (48, 24)]  # native 4x4 grid, and a resized non-square 6x3 grid
HUB_IDS = ["facebook/metaclip-2-worldwide-huge-quickgelu", "facebook/metaclip-2-worldwide-l14"]


def _tokenizer(directory) -> None:
    """A word-level fast tokenizer with XLM-R's special ids and `<s> ... </s>` template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>", model_max_length=TEXT["max_position_embeddings"])
    tok.save_pretrained(directory)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A whole `MetaClip2Model` with its tokenizer and image processor, saved."""
    directory = tmp_path_factory.mktemp("metaclip_2")
    torch.manual_seed(0)
    reference = perturb(MetaClip2Model(MetaClip2Config(vision_config=VISION, text_config=TEXT, projection_dim=16)))
    reference.save_pretrained(directory)
    _tokenizer(directory)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return reference, directory


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metaclip_2_vision")
    torch.manual_seed(1)
    reference = perturb(MetaClip2VisionModel(MetaClip2VisionConfig(**{**VISION, "hidden_act": "quick_gelu"})), seed=2)
    reference.save_pretrained(directory)
    return reference, directory


def _ids(batch: int = 3, length: int = 10) -> torch.Tensor:
    """Captions `<s> w.. </s> <pad>..` of different lengths, with the id 2 nowhere else and
    larger ids after it (CLIP's legacy argmax would pool elsewhere)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.full((batch, length), 1)
    for row, n in enumerate((4, 7, 2)[:batch]):
        ids[row, 0], ids[row, n + 1] = 0, 2
        ids[row, 1 : n + 1] = torch.randint(3, TEXT["vocab_size"], (n,), generator=g)
    return ids


@pytest.mark.parametrize("size", SIZES, ids=["native", "resized"])
@pytest.mark.parametrize("which", ["tower", "whole"])
def test_every_vision_layer_matches(which, size, request):
    reference, directory = request.getfixturevalue(which)
    encoder = load_encoder(directory).eval()
    vision = reference.vision_model if which == "whole" else reference
    px = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = vision(px, output_hidden_states=True, interpolate_pos_encoding=size != (32, 32))
        out = encoder(px, layers="all")
        pooled = encoder(px).pooled
    assert out.grid_size == (size[0] // 8, size[1] // 8) and len(ref.hidden_states) == 3
    case = f"metaclip_2 {which} {size}"
    for i in range(2):
        close(case, out.tokens(i), ref.hidden_states[i + 1], f"layer {i}")
        close(case, out.cls(i), ref.hidden_states[i + 1][:, 0], f"layer {i} CLS")
    close(case, pooled, ref.pooler_output, "pooled")


def test_vision_config_and_strict_keys(tower):
    reference, _ = tower
    config = hf_metaclip_2.config_from_hf(reference.config)
    assert config.act == "quick_gelu" and config.class_token and config.norm_pre and config.embed_dim is None
    from vlm_encoder.weights import WeightsError

    state = reference.state_dict()
    state["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="extra"):
        hf_metaclip_2.convert_state_dict(state)


def test_whole_model_is_a_contrastive_model_with_the_references_embeds_and_logits(whole):
    reference, directory = whole
    loaded = load_model(str(directory), need="contrastive")
    model = loaded.model
    assert loaded.kind == "contrastive" and loaded.info["family"] == "metaclip_2"
    assert model.text.config.eot_token_id == 2 and model.text.config.pad_token_id == 1
    ids = _ids()
    mask = (ids != 1).long()
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = reference(input_ids=ids, pixel_values=px, attention_mask=mask)
        ours = model(px, ids, mask)
        logits = ours.logits_per_image()
    close("metaclip_2 contrastive", ours.image_embeds, ref.image_embeds, "image embeds")
    close("metaclip_2 contrastive", ours.text_embeds, ref.text_embeds, "text embeds")
    close("metaclip_2 contrastive", logits, ref.logits_per_image, "logits per image")
    # The pooled position is the first id 2, not the largest id (CLIP's legacy rule).
    assert not torch.equal(model.text.eot_positions(ids), ids.argmax(dim=-1))


def test_the_tokenizer_is_the_checkpoints_and_feeds_the_reference(whole):
    reference, directory = whole
    model = load_model(str(directory), need="contrastive").model
    tokenizer = model.text.tokenizer()
    batch = tokenizer(["a photo of the cat", "a red circle shape"])
    assert batch.input_ids.shape == (2, TEXT["max_position_embeddings"])
    assert batch.input_ids[0, :7].tolist() == [0, 4, 5, 6, 7, 8, 2] and batch.input_ids[0, 7:].eq(1).all()
    with torch.no_grad():
        ref = reference.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask).pooler_output
        ours = model.encode_text(batch.input_ids, batch.attention_mask, normalize=False)
    close("metaclip_2 contrastive", ours, ref, "text features from the tokenizer")


def test_a_contrastive_save_round_trips(whole, tmp_path):
    _, directory = whole
    model = load_model(str(directory), need="contrastive").model
    model.save_pretrained(tmp_path / "saved")
    back = load_model(str(tmp_path / "saved"), need="contrastive").model
    ids, px = _ids(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = model(px, ids), back(px, ids)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)
    assert back.text.config.tokenizer == model.text.config.tokenizer


def test_info_and_eval_take_the_directory(whole, capsys):
    _, directory = whole
    assert main(["info", str(directory), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["kind"] == "contrastive" and description["contrastive"]["embed_dim"] == 16
    code = main(["eval", str(directory), "--data", "builtin:shapes", "--data-option", "num_test=8", "--data-option",
                 "canvas=32", "--split", "test", "--json", "--cpu", "--templates", "a {} shape", "--no-progress",
                 "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(captured.out)
    assert 0.0 <= metrics["i2t_R@1"] <= metrics["i2t_R@10"] <= 1.0


def test_the_legacy_eos_2_is_pooled_by_id_but_a_list_is_refused():
    config = hf_metaclip_2.text_config_from_hf(MetaClip2Config(text_config=TEXT, vision_config=VISION))
    assert config.eot_token_id == 2 and config.sot_token_id == 0
    with pytest.raises(ValueError, match="one end id"):
        hf_metaclip_2.text_config_from_hf({"model_type": "metaclip_2_text_model", **TEXT, "eos_token_id": [2, 3]})


@pytest.mark.parametrize("name", HUB_IDS)
@pytest.mark.parametrize("command", ["info", "eval"])
def test_real_hub_ids_fail_offline_in_one_line(name, command, empty_cache, capsys):
    argv = [command, name] + (["--data", "builtin:shapes", "--cpu"] if command == "eval" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and not captured.out, captured.err
    assert lines[0].startswith(f"vlm-encoder {command}: error: {name}: config.json not in the Hugging Face cache")


def test_a_hub_id_of_the_cached_whole_model_loads_as_contrastive(whole, tmp_path, monkeypatch):
    """A hub id's converter comes from its cached `config.json`: the tiny directory stands in for
    facebook/metaclip-2-worldwide-huge-quickgelu in a hub cache layout (tokenizer read from the
    cached snapshot)."""
    import shutil

    import huggingface_hub.constants

    _, directory = whole
    snapshot = tmp_path / "hub" / "models--facebook--metaclip-2-worldwide-huge-quickgelu" / "snapshots" / ("0" * 40)
    shutil.copytree(directory, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model(HUB_IDS[0], need="contrastive")
    assert loaded.kind == "contrastive" and loaded.info["family"] == "metaclip_2"
    assert loaded.model.text.tokenizer()(["a cat"]).input_ids[0, :4].tolist() == [0, 4, 8, 2]
