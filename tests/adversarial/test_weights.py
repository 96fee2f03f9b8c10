"""Adversarial checkpoints: code-running pickles, remote-code configs, broken or hostile
safetensors, and state dicts with missing, extra, prefixed or no keys, through every loader.

What each must get: a `WeightsError` (or `ValueError` / `FileNotFoundError`) of one line that
names the file and the problem; nothing from the file ever runs; memory stays bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from projectors import Projector, build_projector, load_llava_mm_projector
from vlm_encoder import VisionConfig, VisionEncoder, WeightsError, load_encoder
from vlm_encoder.contrastive import ContrastiveModel
from vlm_encoder.text import TextConfig, TextEncoder
from vlm_encoder.weights import MAX_TENSORS, load_state_dict_strict, read_state_dict, strip_prefixes

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

from vlm_encoder.converters.open_clip_vit import load_open_clip
from vlm_encoder.converters.timm_vit import load_timm

TINY = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, embed_dim=16)
HF_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
TIMM_NAME = "vit_base_patch16_224"
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
OPEN_CLIP_ARCH = "vlmadv-ViT"
OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1},
}


class RunsShell:
    """Unpickling this calls `os.system` (the classic malicious checkpoint)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def one_line_naming(err: BaseException, path: object) -> str:
    """The error's text, after checking it is one line and names `path`."""
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text, text
    return text


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _open_clip_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{OPEN_CLIP_ARCH}.json"
    path.write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(path)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip")
    tf.CLIPVisionModel(tf.CLIPVisionConfig(**HF_VISION)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("own")
    VisionEncoder(TINY).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        k: v.contiguous() for k, v in timm.create_model(TIMM_NAME, pretrained=False, **TIMM_KWARGS).state_dict().items()
    }


@pytest.fixture(scope="module")
def open_clip_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in open_clip.create_model(OPEN_CLIP_ARCH).state_dict().items()}


@pytest.fixture(scope="module")
def projector_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("projector")
    build_projector("mlp2x_gelu", 32, 48).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def contrastive_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("contrastive")
    text = TextEncoder(TextConfig(context_length=8, width=32, depth=1, num_heads=4))
    ContrastiveModel(
        VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=4)), text, 16
    ).save_pretrained(directory)
    return directory


@pytest.fixture()
def torch_load_calls(monkeypatch):
    """Every `torch.load` call's keyword arguments; fails at once on an unsafe one."""
    calls: list[dict] = []
    real = torch.load

    def guarded(*args, **kwargs):
        calls.append(kwargs)
        assert kwargs.get("weights_only") is True, f"torch.load called without weights_only=True: {kwargs}"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    return calls


@pytest.fixture()
def no_network_no_remote_code(monkeypatch):
    """Sockets and transformers' dynamic module loader fail loudly if anything calls them."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)

    def no_dynamic(*args, **kwargs):
        raise AssertionError(f"remote code loader called: {args!r}")

    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and hasattr(module, "get_class_from_dynamic_module"):
            monkeypatch.setattr(module, "get_class_from_dynamic_module", no_dynamic)


def evil_pickle(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A torch checkpoint (plain weights plus one `os.system` call) that would create `marker`."""
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": RunsShell(f"touch {marker}")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


def clone(directory: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(directory, target)
    return target


# ------------------------------------------------- 1. pickles that would run code
def assert_refused_unsafe(err: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    text = one_line_naming(err.value, path)
    assert "posix.system" in text or "os.system" in text, text
    assert "weights_only" in text
    assert not marker.exists(), "the pickle's os.system call ran"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_read_state_dict_refuses_code_and_names_the_global(tmp_path, torch_load_calls, legacy):
    marker = tmp_path / "PWNED"
    path = evil_pickle(tmp_path / "evil.pth", marker, legacy=legacy)
    with pytest.raises(WeightsError) as err:
        read_state_dict(path)
    assert_refused_unsafe(err, path, marker)
    assert torch_load_calls, "the pickle was not read through torch.load(weights_only=True)"


def test_plain_pickle_with_stack_global_is_named(tmp_path):
    import pickle

    marker = tmp_path / "PWNED"
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"hook": RunsShell(f"touch {marker}")}, protocol=4))
    with pytest.raises(WeightsError) as err:
        read_state_dict(path)
    assert_refused_unsafe(err, path, marker)


def test_load_encoder_hf_dir_with_evil_pytorch_model_bin(hf_clip_dir, tmp_path, torch_load_calls):
    directory = clone(hf_clip_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    path = evil_pickle(directory / "pytorch_model.bin", marker)
    with pytest.raises(WeightsError) as err:
        load_encoder(directory)
    assert_refused_unsafe(err, path, marker)


def test_load_encoder_own_dir_with_evil_checkpoint(own_dir, tmp_path, torch_load_calls):
    marker = tmp_path / "PWNED"
    path = evil_pickle(tmp_path / "evil.pth", marker)
    with pytest.raises(WeightsError) as err:
        load_encoder(own_dir, checkpoint=path)
    assert_refused_unsafe(err, path, marker)


def test_load_timm_with_evil_checkpoint(tmp_path, torch_load_calls):
    marker = tmp_path / "PWNED"
    path = evil_pickle(tmp_path / "evil.pth", marker)
    with pytest.raises(WeightsError) as err:
        load_timm(TIMM_NAME, checkpoint=str(path), **TIMM_KWARGS)
    assert_refused_unsafe(err, path, marker)


def test_load_open_clip_with_evil_checkpoint(tmp_path, torch_load_calls):
    marker = tmp_path / "PWNED"
    path = evil_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(WeightsError) as err:
        load_open_clip(OPEN_CLIP_ARCH, checkpoint=str(path))
    assert_refused_unsafe(err, path, marker)
    with pytest.raises(WeightsError) as err:
        load_encoder(f"open_clip:{OPEN_CLIP_ARCH}", checkpoint=path)
    assert_refused_unsafe(err, path, marker)


def test_llava_mm_projector_with_evil_bin(tmp_path, torch_load_calls):
    marker = tmp_path / "PWNED"
    path = evil_pickle(tmp_path / "mm_projector.bin", marker)
    with pytest.raises(WeightsError) as err:
        load_llava_mm_projector(path)
    assert_refused_unsafe(err, path, marker)


@pytest.mark.parametrize("loader", ["encoder", "projector", "contrastive"])
def test_from_pretrained_reads_only_safetensors(
    loader, own_dir, projector_dir, contrastive_dir, tmp_path, torch_load_calls
):
    """A pickle renamed to model.safetensors is not a safetensors file: refused unread."""
    directory = clone(
        {"encoder": own_dir, "projector": projector_dir, "contrastive": contrastive_dir}[loader], tmp_path
    )
    cls = {"encoder": VisionEncoder, "projector": Projector, "contrastive": ContrastiveModel}[loader]
    marker = tmp_path / "PWNED"
    weights = evil_pickle(directory / "model.safetensors", marker)
    with pytest.raises(WeightsError) as err:
        cls.from_pretrained(directory)
    one_line_naming(err.value, weights)
    assert not marker.exists()
    assert not torch_load_calls, "from_pretrained fell back to torch.load"


# ------------------------------------------------- 2. remote code in configs
REMOTE_HOOKS = {
    "auto_map": {"AutoModel": "evil_code.EvilModel", "AutoConfig": "evil_code.EvilConfig"},
    "trust_remote_code": True,
    "custom_pipelines": {"feature-extraction": {"impl": "evil_code.EvilPipeline"}},
}


def plant_code(directory: Path, marker: Path) -> None:
    """A module the config points at; importing it creates `marker`."""
    (directory / "evil_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nEvilModel = EvilConfig = object\n"
    )


def edit_config(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_hf_dir_remote_code_hooks_are_ignored(hf_clip_dir, tmp_path, no_network_no_remote_code):
    directory = clone(hf_clip_dir, tmp_path)
    marker = tmp_path / "IMPORTED"
    plant_code(directory, marker)
    edit_config(directory / "config.json", **REMOTE_HOOKS)
    encoder = load_encoder(directory)
    reference = load_encoder(hf_clip_dir)
    for key, value in reference.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    assert not marker.exists()
    assert "evil_code" not in sys.modules


@pytest.mark.parametrize("model_type", ["evil_model", "clip_custom", None])
def test_hf_dir_custom_model_type_is_refused(hf_clip_dir, tmp_path, no_network_no_remote_code, model_type):
    directory = clone(hf_clip_dir, tmp_path)
    marker = tmp_path / "IMPORTED"
    plant_code(directory, marker)
    edit_config(directory / "config.json", model_type=model_type, **REMOTE_HOOKS)
    with pytest.raises(ValueError, match="not supported; supported: .*clip") as err:
        load_encoder(directory)
    one_line_naming(err.value, directory / "config.json")
    assert not marker.exists()


def test_preprocessor_config_remote_code_is_ignored_or_refused(hf_clip_dir, tmp_path, no_network_no_remote_code):
    directory = clone(hf_clip_dir, tmp_path)
    marker = tmp_path / "IMPORTED"
    plant_code(directory, marker)
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": 32,
        "auto_map": {"AutoImageProcessor": "evil_code.EvilProcessor"},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    assert load_encoder(directory).image_processor is not None
    processor["image_processor_type"] = "EvilProcessor"
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ValueError, match="EvilProcessor"):
        load_encoder(directory)
    assert not marker.exists()


def test_own_format_config_with_remote_hooks_is_refused(own_dir, tmp_path, no_network_no_remote_code):
    directory = clone(own_dir, tmp_path)
    marker = tmp_path / "IMPORTED"
    plant_code(directory, marker)
    edit_config(directory / "config.json", **REMOTE_HOOKS)
    with pytest.raises((ValueError, TypeError), match="auto_map"):
        VisionEncoder.from_pretrained(directory)
    assert not marker.exists()


def test_hf_text_tower_with_remote_code_is_refused(tmp_path, no_network_no_remote_code):
    from vlm_encoder.text import HFTextConfig, HFTextEncoder

    directory = tmp_path / "text"
    directory.mkdir()
    marker = tmp_path / "IMPORTED"
    plant_code(directory, marker)
    (directory / "config.json").write_text(json.dumps({"model_type": "evil_text", "hidden_size": 32, **REMOTE_HOOKS}))
    config = HFTextConfig(str(directory), pooling="mean", context_length=8)
    with pytest.raises(ValueError, match="trust_remote_code|custom code|evil_text"):
        HFTextEncoder(config)
    with pytest.raises(ValueError, match="trust_remote_code|custom code|evil_text"):
        HFTextEncoder(config, load_weights=False)
    assert not marker.exists()


# ------------------------------------------------- 3. broken or hostile safetensors
def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def with_header(header: dict | bytes, data: bytes = b"") -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


GOOD = {"a": torch.arange(16.0).reshape(4, 4), "b": torch.ones(3)}
GOOD_HEADER = {
    "a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
    "b": {"dtype": "F32", "shape": [3], "data_offsets": [64, 76]},
}
GOOD_DATA = safetensors_bytes(GOOD)[-76:]
BROKEN = {
    "half": lambda: safetensors_bytes(GOOD)[: len(safetensors_bytes(GOOD)) // 2],
    "4_bytes": lambda: b"\x10\x00\x00\x00",
    "header_cut": lambda: safetensors_bytes(GOOD)[:20],
    "data_cut": lambda: safetensors_bytes(GOOD)[:-10],
    "length_2_40": lambda: struct.pack("<Q", 2**40) + safetensors_bytes(GOOD)[8:],
    "length_2_64": lambda: struct.pack("<Q", 2**64 - 1) + safetensors_bytes(GOOD)[8:],
    "unknown_dtype": lambda: with_header({**GOOD_HEADER, "a": {**GOOD_HEADER["a"], "dtype": "X99"}}, GOOD_DATA),
    "shape_past_data": lambda: with_header({**GOOD_HEADER, "a": {**GOOD_HEADER["a"], "shape": [400, 400]}}, GOOD_DATA),
    "offsets_past_end": lambda: with_header(
        {**GOOD_HEADER, "b": {**GOOD_HEADER["b"], "data_offsets": [64, 10**12]}}, GOOD_DATA
    ),
    "overlapping": lambda: with_header({**GOOD_HEADER, "b": {**GOOD_HEADER["b"], "data_offsets": [0, 12]}}, GOOD_DATA),
    "list_header": lambda: with_header(b"[1, 2, 3]"),
    "not_utf8": lambda: with_header(b"\xff\xfe{}"),
    "bad_json": lambda: with_header(b"{" + b" " * 40),
    "html": lambda: b"<!doctype html><html>404 not found</html>",
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_safetensors_is_one_line_error_naming_the_file(case, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(BROKEN[case]())
    with pytest.raises(WeightsError) as err:
        read_state_dict(path)
    one_line_naming(err.value, path)


@pytest.mark.parametrize("case", ["half", "length_2_40", "offsets_past_end"])
def test_broken_safetensors_through_the_loaders(case, own_dir, hf_clip_dir, projector_dir, tmp_path):
    blob = BROKEN[case]()
    for name, directory, load in [
        ("own", own_dir, VisionEncoder.from_pretrained),
        ("own_via_load_encoder", own_dir, load_encoder),
        ("hf", hf_clip_dir, load_encoder),
        ("projector", projector_dir, Projector.from_pretrained),
    ]:
        target = clone(directory, tmp_path, name)
        (target / "model.safetensors").write_bytes(blob)
        with pytest.raises(WeightsError) as err:
            load(target)
        one_line_naming(err.value, target / "model.safetensors")
    checkpoint = tmp_path / "ckpt.safetensors"
    checkpoint.write_bytes(blob)
    for load in (
        lambda: load_timm(TIMM_NAME, checkpoint=str(checkpoint), **TIMM_KWARGS),
        lambda: load_open_clip(OPEN_CLIP_ARCH, checkpoint=str(checkpoint)),
    ):
        with pytest.raises(WeightsError) as err:
            load()
        one_line_naming(err.value, checkpoint)


def test_header_limits_are_named(tmp_path):
    huge = tmp_path / "huge_header.safetensors"
    with open(huge, "wb") as handle:  # a 100 MB header, sparse on disk
        handle.write(struct.pack("<Q", 100 * 2**20) + b'{"__metadata__": {"k": "')
        handle.truncate(8 + 100 * 2**20)
    with pytest.raises(WeightsError, match="MAX_HEADER_BYTES") as err:
        read_state_dict(huge)
    one_line_naming(err.value, huge)

    flood = tmp_path / "flood.safetensors"
    entry = '"t{}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
    flood.write_bytes(with_header(("{" + ",".join(entry.format(i) for i in range(MAX_TENSORS + 1)) + "}").encode()))
    with pytest.raises(WeightsError, match="MAX_TENSORS") as err:
        read_state_dict(flood)
    one_line_naming(err.value, flood)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, struct, sys
    from pathlib import Path
    import torch
    from vlm_encoder.weights import MAX_HEADER_BYTES, WeightsError, read_state_dict

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    folder = Path(sys.argv[1])
    files = []
    big = folder / "big_header.safetensors"  # a 100 MB JSON header (sparse)
    with open(big, "wb") as handle:
        handle.write(struct.pack("<Q", 100 * 2**20) + b'{"__metadata__": {"k": "')
        handle.truncate(8 + 100 * 2**20)
    files.append(big)
    claim = folder / "claims_2_40.safetensors"
    claim.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    files.append(claim)
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    flood = "{" + ",".join(entry.format(i) for i in range(200_000)) + "}"  # 10 MB of empty tensors
    body = flood.encode()
    (folder / "flood.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    files.append(folder / "flood.safetensors")
    text = "x" * (MAX_HEADER_BYTES - 200)  # the largest header allowed, all metadata
    body = json.dumps({"__metadata__": {"k": text}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    body += b" " * (-len(body) % 8)
    (folder / "largest_allowed.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + bytes(4))
    files.append(folder / "largest_allowed.safetensors")
    del text, body, flood
    base = peak_mb()
    outcome = {}
    for path in files:
        try:
            outcome[path.name] = sorted(read_state_dict(path))
        except WeightsError as err:
            outcome[path.name] = str(err)
    print(json.dumps({"growth_mb": peak_mb() - base, "outcome": outcome}))
    """
)


def test_hostile_headers_keep_memory_bounded(tmp_path):
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outcome = report["outcome"]
    assert "MAX_HEADER_BYTES" in outcome["big_header.safetensors"]
    assert "MAX_HEADER_BYTES" in outcome["claims_2_40.safetensors"]
    assert "MAX_TENSORS" in outcome["flood.safetensors"]
    assert outcome["largest_allowed.safetensors"] == ["w"]
    assert report["growth_mb"] < 200, report


def test_truncated_torch_pickle_is_one_line_error(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError) as err:
            read_state_dict(path)
        one_line_naming(err.value, path)


def test_pickles_that_are_not_state_dicts(tmp_path):
    path = tmp_path / "x.pth"
    for obj, match in [
        (torch.zeros(3), "state dict"),
        ([torch.zeros(3)], "state dict"),
        ({"a": 1}, "no tensors"),
        ({1: torch.zeros(3)}, "strings"),
    ]:
        torch.save(obj, path)
        with pytest.raises(WeightsError, match=match) as err:
            read_state_dict(path)
        one_line_naming(err.value, path)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd, k: {**sd, k: torch.zeros(7)}, r"shape mismatches: .*\(7,\)"),
        (lambda sd, k: {**sd, k: sd[k].to(torch.int64)}, "dtype.*int64"),
        (lambda sd, k: {**sd, k: sd[k].bool()}, "dtype.*bool"),
        (lambda sd, k: {**sd, k: sd[k].to(torch.complex64)}, "dtype.*complex64"),
    ],
    ids=["shape", "int64", "bool", "complex"],
)
def test_shapes_and_dtypes_that_do_not_fit_the_config(own_dir, tmp_path, change, match):
    directory = clone(own_dir, tmp_path)
    state = load_file(str(own_dir / "model.safetensors"))
    save_file(change(state, "blocks.0.norm1.bias"), str(directory / "model.safetensors"))
    for load in (VisionEncoder.from_pretrained, load_encoder):
        with pytest.raises(WeightsError, match=match) as err:
            load(directory)
        one_line_naming(err.value, directory / "model.safetensors")
        assert "blocks.0.norm1.bias" in str(err.value)


def test_float64_and_half_weights_are_cast_not_refused(own_dir, tmp_path):
    directory = clone(own_dir, tmp_path)
    state = load_file(str(own_dir / "model.safetensors"))
    save_file({k: v.double() for k, v in state.items()}, str(directory / "model.safetensors"))
    loaded = VisionEncoder.from_pretrained(directory)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_config_that_does_not_fit_the_weights(own_dir, hf_clip_dir, tmp_path):
    own = clone(own_dir, tmp_path, "own")
    edit_config(own / "config.json", width=64)
    with pytest.raises(WeightsError, match="shape mismatches") as err:
        VisionEncoder.from_pretrained(own)
    one_line_naming(err.value, own / "model.safetensors")
    hf = clone(hf_clip_dir, tmp_path, "hf")
    edit_config(hf / "config.json", hidden_size=64, num_hidden_layers=3)
    with pytest.raises(WeightsError) as err:
        load_encoder(hf)
    one_line_naming(err.value, hf / "model.safetensors")


# ------------------------------------------------- 4. keys: missing, extra, prefixed, empty
def own_files(own_dir: Path):
    state = load_file(str(own_dir / "model.safetensors"))

    def write_and_load(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> tuple[Path, object]:
        directory = tmp_path / f"own{len(list(tmp_path.iterdir()))}"
        shutil.copytree(own_dir, directory)
        save_file(tensors, str(directory / "model.safetensors"))
        return directory / "model.safetensors", lambda: VisionEncoder.from_pretrained(directory)

    return state, write_and_load


def hf_files(hf_clip_dir: Path):
    state = load_file(str(hf_clip_dir / "model.safetensors"))

    def write_and_load(tmp_path: Path, tensors):
        directory = tmp_path / f"hf{len(list(tmp_path.iterdir()))}"
        shutil.copytree(hf_clip_dir, directory)
        save_file(tensors, str(directory / "model.safetensors"))
        return directory / "model.safetensors", lambda: load_encoder(directory)

    return state, write_and_load


def checkpoint_files(state, load):
    def write_and_load(tmp_path: Path, tensors):
        path = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}.safetensors"
        save_file(tensors, str(path))
        return path, lambda: load(str(path))

    return state, write_and_load


def projector_files(projector_dir: Path):
    state = load_file(str(projector_dir / "model.safetensors"))

    def write_and_load(tmp_path: Path, tensors):
        directory = tmp_path / f"proj{len(list(tmp_path.iterdir()))}"
        shutil.copytree(projector_dir, directory)
        save_file(tensors, str(directory / "model.safetensors"))
        return directory / "model.safetensors", lambda: Projector.from_pretrained(directory)

    return state, write_and_load


LOADERS = ["own", "hf", "timm", "open_clip", "projector"]


@pytest.fixture()
def loader(request, own_dir, hf_clip_dir, timm_state, open_clip_state, projector_dir):
    name = request.param
    if name == "own":
        return own_files(own_dir)
    if name == "hf":
        return hf_files(hf_clip_dir)
    if name == "timm":
        return checkpoint_files(timm_state, lambda p: load_timm(TIMM_NAME, checkpoint=p, **TIMM_KWARGS))
    if name == "open_clip":
        return checkpoint_files(open_clip_state, lambda p: load_open_clip(OPEN_CLIP_ARCH, checkpoint=p))
    return projector_files(projector_dir)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("loader", LOADERS, indirect=True)
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_training_wrapper_prefixes_are_stripped(loader, prefix, tmp_path):
    state, write_and_load = loader
    _, load_plain = write_and_load(tmp_path, state)
    _, load_prefixed = write_and_load(tmp_path, {prefix + k: v for k, v in state.items()})
    same_weights(load_prefixed(), load_plain())


@pytest.mark.parametrize("loader", LOADERS, indirect=True)
def test_prefix_collision_is_an_error_not_a_silent_overwrite(loader, tmp_path):
    state, write_and_load = loader
    key = min(state)
    path, load = write_and_load(tmp_path, {**state, "module." + key: torch.zeros_like(state[key])})
    with pytest.raises(WeightsError, match="collide") as err:
        load()
    one_line_naming(err.value, path)
    assert key in str(err.value)


@pytest.mark.parametrize("loader", LOADERS, indirect=True)
def test_empty_state_dict(loader, tmp_path):
    _, write_and_load = loader
    path, load = write_and_load(tmp_path, {})
    with pytest.raises(WeightsError) as err:
        load()
    one_line_naming(err.value, path)


@pytest.mark.parametrize("loader", LOADERS, indirect=True)
def test_extra_key_is_listed(loader, tmp_path):
    state, write_and_load = loader
    path, load = write_and_load(
        tmp_path, {**state, "visual.surprise.weight": torch.zeros(2), "surprise_head": torch.zeros(2)}
    )
    with pytest.raises(WeightsError) as err:
        load()
    text = one_line_naming(err.value, path)
    assert "surprise" in text


@pytest.mark.parametrize("loader", LOADERS, indirect=True)
def test_every_missing_key_is_named(loader, tmp_path):
    """Drop each key in turn (text-tower keys of an open_clip file are ignored on purpose)."""
    state, write_and_load = loader
    keys = [
        k
        for k in sorted(state)
        if not (
            k.startswith(
                (
                    "transformer.",
                    "token_embedding",
                    "ln_final",
                    "text_projection",
                    "positional_embedding",
                    "logit_scale",
                    "attn_mask",
                )
            )
        )
    ]
    assert keys
    unnamed = []
    for key in keys:
        path, load = write_and_load(tmp_path, {k: v for k, v in state.items() if k != key})
        try:
            load()
        except WeightsError as err:
            text = one_line_naming(err, path)
            # The message names the dropped key, or the converted name it feeds.
            # Named as in the file, or (renaming converters) as the key it feeds in our layout.
            if key.rsplit(".", 1)[-1] not in text and "missing keys: " not in text:
                unnamed.append((key, text))
        else:
            pytest.fail(f"{key!r} missing but the load succeeded")
    assert not unnamed, unnamed


def test_strip_prefixes_and_strict_load_on_in_memory_dicts():
    encoder = VisionEncoder(TINY)
    state = encoder.state_dict()
    with pytest.raises(WeightsError, match="collide"):
        strip_prefixes({"a": torch.zeros(1), "module.a": torch.zeros(1)})
    with pytest.raises(WeightsError, match="not tensors: cls_token"):
        load_state_dict_strict(encoder, {**state, "cls_token": None})
    with pytest.raises(WeightsError, match="empty"):
        load_state_dict_strict(encoder, {})
    with pytest.raises(WeightsError, match="missing keys: cls_token"):
        load_state_dict_strict(encoder, {k: v for k, v in state.items() if k != "cls_token"})


# ------------------------------------------------- atomic saves
class Interrupted(RuntimeError):
    pass


def interrupted_save_model(model, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the process "dies"
    raise Interrupted("killed mid-save")


@pytest.mark.parametrize("existing", [False, True], ids=["new_dir", "existing_dir"])
def test_interrupted_save_leaves_nothing_half_written(existing, tmp_path, monkeypatch):
    from vlm_encoder import pretrained

    target = tmp_path / "model"
    old = VisionEncoder(TINY)
    if existing:
        old.save_pretrained(target)
        (target / "notes.txt").write_text("kept")
    monkeypatch.setattr(pretrained, "save_model", interrupted_save_model)
    with pytest.raises(Interrupted):
        VisionEncoder(TINY).save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model"] if existing else []), "staging files left behind"
    if existing:
        same_weights(VisionEncoder.from_pretrained(target), old)
        assert (target / "notes.txt").read_text() == "kept"
    monkeypatch.undo()
    new = VisionEncoder(TINY)
    new.save_pretrained(target)
    same_weights(VisionEncoder.from_pretrained(target), new)
    assert target.stat().st_mode & 0o755 == 0o755  # not left private like a temporary directory


def test_safetensors_tensors_are_read_aligned_as_torch_allocates(tmp_path):
    # safetensors hands out 8-byte aligned buffers; MKL's small-row GEMMs on AMD CPUs give other
    # bits on them, so a reloaded model would not equal the saved one bit for bit.
    from vlm_encoder.weights import ALIGNMENT, read_safetensors

    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(3, 5 + i) for i in range(6)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    read, names = read_safetensors(tmp_path / "w.safetensors")
    assert sorted(names) == sorted(tensors)
    for name, value in read.items():
        assert value.data_ptr() % ALIGNMENT == 0, name
        assert torch.equal(value, tensors[name])
