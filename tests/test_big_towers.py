"""Big towers on small memory: loading a tower holds one copy of its weights.

Every loader builds the tower on the `meta` device and assigns the file's tensors to it
(`weights.build_and_load`), so no random initialisation is ever allocated beside the weights.
Each load runs in its own process, so its peak RSS (`ru_maxrss`) is that load's: the growth
over the process's peak after its imports must stay under 1.3x the weights' bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_encoder import VisionEncoder
from vlm_encoder.config import VisionConfig
from vlm_encoder.vlm import VisionLanguageModel

BOUND = 1.3

# Run in a fresh process: import everything, note the peak RSS, load, note it again.
_LOAD = r"""
import json, resource, sys
import torch
import vlm_encoder
from vlm_encoder import VisionEncoder, load_encoder
from vlm_encoder.converters.timm_vit import load_timm
how, source = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if how == "from_pretrained":
    model = VisionEncoder.from_pretrained(source)
elif how == "load_encoder":
    model = load_encoder(source)
else:  # timm:NAME with a checkpoint file
    model = load_timm(how.split(":", 1)[1], checkpoint=source)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"growth": (after - before) * 1024, "weights": nbytes}))
"""


def _load_growth(how: str, source: Path) -> tuple[int, int]:
    """(peak RSS growth in bytes, weight bytes) of loading `source` by `how` in a new process."""
    done = subprocess.run([sys.executable, "-c", _LOAD, how, str(source)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["growth"], result["weights"]


def _write_tower(directory: Path, width: int, depth: int) -> Path:
    config = VisionConfig(image_size=224, patch_size=16, width=width, depth=depth, num_heads=width // 64)
    VisionEncoder(config).save_pretrained(directory)
    return directory


def _check(how: str, source: Path) -> None:
    growth, nbytes = _load_growth(how, source)
    assert growth < BOUND * nbytes, (
        f"{how}: loading {nbytes / 2**20:.0f} MiB of weights grew the peak RSS by {growth / 2**20:.0f} MiB "
        f"({growth / nbytes:.2f}x, bound {BOUND}x)")


@pytest.fixture(scope="module")
def small_tower(tmp_path_factory) -> Path:
    # ~30M parameters (width 512, depth 10): big enough that the weights dominate the allocator's noise.
    return _write_tower(tmp_path_factory.mktemp("tower30m"), width=512, depth=10)


@pytest.mark.parametrize("how", ["from_pretrained", "load_encoder"])
def test_loading_holds_one_copy(small_tower: Path, how: str) -> None:
    _check(how, small_tower)


@pytest.mark.slow
def test_timm_checkpoint_holds_one_copy(tmp_path: Path) -> None:
    """`timm:NAME` with a checkpoint builds timm's model (for its architecture) and ours on `meta`."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    path = tmp_path / "vit_small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    _check("timm:vit_small_patch16_224", path)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["from_pretrained", "load_encoder"])
def test_300m_tower_holds_one_copy(tmp_path_factory, how: str) -> None:
    """A ViT-L-sized random tower (width 1024, depth 24: ~300M parameters, 1.2 GB in float32)."""
    directory = tmp_path_factory.getbasetemp() / "tower300m"
    if not (directory / "model.safetensors").is_file():
        torch.manual_seed(0)
        _write_tower(directory, width=1024, depth=24)
    _check(how, directory)


@pytest.mark.parametrize("device_map", ["auto", "cpu"])
def test_vlm_language_model_placed_by_transformers(tmp_path: Path, device_map: str) -> None:
    """`device_map` reaches transformers' `from_pretrained` for the LM (on this CPU-only machine
    everything lands on the CPU); the loaded model runs and gives the saved model's logits."""
    from test_vlm import make_vlm, prompt

    vlm = make_vlm("llama", kind="mlp2x_gelu", layers=(-2,))
    vlm.save_pretrained(tmp_path / "vlm")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm", device_map=device_map)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    ids, pixels = torch.tensor([prompt(), prompt()]), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixels).logits, vlm.eval()(ids, pixels).logits, rtol=0, atol=0)
