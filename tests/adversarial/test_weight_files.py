"""Which weight file a directory loads, and configs that do not fit their weights.

1. A directory holding several weight layouts (single or sharded, safetensors or torch
   pickle), each with different weights: `load_encoder` reads the one transformers'
   `CLIPVisionModel.from_pretrained` reads, for every combination.
2. A `config.json` asking for an absurd model (width 16384, depth 48) beside small
   weights: refused naming the weight file, before the model is allocated (peak RSS of a
   subprocess, under an address-space limit so a regression fails instead of swapping).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from vlm_encoder import VisionConfig, VisionEncoder, WeightsError, load_encoder

from test_weights import HF_VISION  # noqa: E402  (the same tiny CLIP tower)
LAYOUTS = ("safetensors", "safetensors_sharded", "bin", "bin_sharded")
PATCH_KEY = "embeddings.patch_embedding.weight"  # CLIPVisionModel in memory and as saved (transformers 5)


# ------------------------------------------------------------------ 1. which file is loaded
def write_layout(directory: Path, layout: str, state: dict[str, torch.Tensor]) -> None:
    """Write `state` into `directory` as transformers names `layout`'s files."""
    sharded = layout.endswith("_sharded")
    suffix = ".safetensors" if layout.startswith("safetensors") else ".bin"
    stem = "model" if suffix == ".safetensors" else "pytorch_model"

    def write(tensors: dict[str, torch.Tensor], name: str) -> None:
        if suffix == ".safetensors":
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / name)

    if not sharded:
        write(state, stem + suffix)
        return
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}{suffix}"
        write({k: state[k] for k in part}, name)
        weight_map.update({k: name for k in part})
    (directory / f"{stem}{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def layout_states() -> dict[str, dict[str, torch.Tensor]]:
    """One CLIP vision state dict per layout, all different."""
    config = tf.CLIPVisionConfig(**HF_VISION)
    states = {}
    for seed, layout in enumerate(LAYOUTS):
        torch.manual_seed(seed)
        states[layout] = {k: v.contiguous() for k, v in tf.CLIPVisionModel(config).state_dict().items()}
    return states


COMBINATIONS = [c for n in range(1, len(LAYOUTS) + 1) for c in itertools.combinations(LAYOUTS, n)]


@pytest.mark.parametrize("present", COMBINATIONS, ids=lambda c: "+".join(c))
def test_the_file_loaded_is_the_one_transformers_loads(present, layout_states, tmp_path):
    tf.CLIPVisionConfig(**HF_VISION).save_pretrained(tmp_path)
    for layout in present:
        write_layout(tmp_path, layout, layout_states[layout])
    theirs = tf.CLIPVisionModel.from_pretrained(tmp_path).state_dict()[PATCH_KEY]  # what transformers picks
    ours = load_encoder(tmp_path).patch_embed.proj.weight.detach()
    picked = [layout for layout in LAYOUTS if torch.equal(layout_states[layout][PATCH_KEY], theirs)]
    assert len(picked) == 1 and picked[0] in present
    assert torch.equal(ours, theirs), f"transformers loads {picked[0]}; we loaded another of {present}"


# ------------------------------------------------------------------ 2. absurd configs
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from vlm_encoder import WeightsError, load_encoder

    with open("/proc/self/status") as handle:
        vm = next(int(line.split()[1]) for line in handle if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**30, resource.RLIM_INFINITY))  # a regression fails, fast
    load_encoder(sys.argv[1])  # a directory that fits: lazy imports happen here, not below
    report = {}
    for directory in sys.argv[2:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_encoder(directory)
            outcome = "loaded"
        except WeightsError as err:
            outcome = "WeightsError: " + str(err)
        except BaseException as err:  # MemoryError, RuntimeError from the allocator
            outcome = type(err).__name__ + ": " + str(err)[:300]
        growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        report[directory] = {"outcome": outcome, "growth_mb": growth_mb}
    print(json.dumps(report))
    """
)


def absurd(config: dict, width_key: str, depth_key: str, mlp_key: str) -> dict:
    return {**config, width_key: 16384, depth_key: 48, mlp_key: 65536}


@pytest.mark.slow  # a subprocess importing torch and transformers: ~10 s on 2 busy cores
def test_absurd_config_is_refused_before_the_model_is_allocated(tmp_path):
    """Our format and an HF CLIP directory, each with a config.json asking for ~200 GB."""
    torch.manual_seed(0)
    own = tmp_path / "own"
    VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)).save_pretrained(own)
    fits = tmp_path / "fits"
    shutil.copytree(own, fits)
    config = json.loads((own / "config.json").read_text())
    (own / "config.json").write_text(json.dumps(absurd(config, "width", "depth", "mlp_dim")))
    hf = tmp_path / "hf"
    tf.CLIPVisionModel(tf.CLIPVisionConfig(**HF_VISION)).save_pretrained(hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(absurd(config, "hidden_size", "num_hidden_layers", "intermediate_size")))
    script = tmp_path / "load.py"
    script.write_text(MEMORY_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(fits), str(own), str(hf)], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for directory in (own, hf):
        outcome = report[str(directory)]["outcome"]
        assert outcome.startswith("WeightsError: "), outcome
        assert str(directory / "model.safetensors") in outcome and "shape mismatches" in outcome, outcome
        assert "\n" not in outcome
        assert report[str(directory)]["growth_mb"] < 200, report


@pytest.mark.parametrize("kind", ["own", "hf"])
def test_a_config_that_does_not_fit_is_checked_on_meta(kind, tmp_path, monkeypatch):
    """In process, with a merely oversized config (width 512, depth 4: ~50 MB if a regression
    allocated it): the model is built on the meta device and refused, naming the file."""
    built_on = []
    reset = VisionEncoder.reset_parameters
    monkeypatch.setattr(
        VisionEncoder, "reset_parameters", lambda self: (built_on.append(self.patch_embed.proj.weight.device), reset(self))
    )
    torch.manual_seed(0)
    directory = tmp_path / kind
    if kind == "own":
        VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)).save_pretrained(directory)
        keys = ("width", "depth", "mlp_dim")
    else:
        tf.CLIPVisionModel(tf.CLIPVisionConfig(**HF_VISION)).save_pretrained(directory)
        keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **dict(zip(keys, (512, 4, 2048)))}))
    built_on.clear()
    with pytest.raises(WeightsError, match="shape mismatches") as err:
        load_encoder(directory)
    assert str(directory / "model.safetensors") in str(err.value)
    assert built_on == [torch.device("meta")]


def test_loaded_weights_are_owned_plain_cpu_tensors(tmp_path):
    """`assign=True` loading: float32 parameters that require grad, not sharing memory, even
    from a float16 file, and equal to the file."""
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4))
    encoder.half().save_pretrained(tmp_path)
    loaded = VisionEncoder.from_pretrained(tmp_path)
    pointers = set()
    for name, param in loaded.named_parameters():
        assert param.device.type == "cpu" and param.dtype == torch.float32 and param.requires_grad, name
        assert param.is_contiguous() and param.data_ptr() not in pointers, name
        pointers.add(param.data_ptr())
    for (name, a), b in zip(encoder.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.float(), b), name
