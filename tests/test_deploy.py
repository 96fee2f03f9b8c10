"""Deploy: `torch.export.export` of the encoder with a fixed layer set (EncoderOutput is a
pytree), and the ONNX export (`vlm-encoder export-onnx`) checked against onnxruntime."""

from __future__ import annotations

import io

import pytest
import torch

from vlm_encoder.config import VisionConfig
from vlm_encoder.encoder import VisionEncoder
from vlm_encoder.output import EncoderOutput

TINY = dict(image_size=(32, 32), patch_size=8, width=32, depth=2, num_heads=2)


class FixedLayers(torch.nn.Module):
    def __init__(self, encoder: VisionEncoder, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder, self.layers = encoder, layers

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        return self.encoder(pixel_values, layers=self.layers, norm=True)


@pytest.mark.parametrize(
    "config",
    [dict(), dict(class_token=False, pool="map", num_register_tokens=0), dict(num_register_tokens=2, embed_dim=16)],
    ids=["cls", "map", "registers"],
)
def test_torch_export_returns_encoder_output(config):
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(**TINY, **config)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    program = torch.export.export(FixedLayers(encoder, (0, -1)), (pixels,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)  # the pytree context serialises too
    buffer.seek(0)
    for module in (program.module(), torch.export.load(buffer).module()):
        got = module(pixels)
        want = encoder(pixels, layers=(0, -1), norm=True)
        assert isinstance(got, EncoderOutput)
        assert got.layers == (0, 1) and got.grid_size == (4, 4) and got.num_blocks == 2
        for a, b in zip(got.patch_tokens, want.patch_tokens):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.pooled, want.pooled, rtol=0, atol=1e-6)
        assert (got.cls_tokens is None) == (want.cls_tokens is None)
        assert (got.register_tokens is None) == (want.register_tokens is None)


def test_encoder_output_pytree_round_trip():
    out = EncoderOutput(
        layers=(1,), patch_tokens=(torch.ones(1, 4, 2),), cls_tokens=None, register_tokens=None,
        grid_size=(2, 2), pooled=torch.zeros(1, 2), attentions=None, num_blocks=3,
    )
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    # The tensors (and the absent fields' Nones) are leaves; the static fields ride in the spec.
    assert [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)] == [out.patch_tokens[0], out.pooled]
    assert not any(isinstance(leaf, (int, tuple)) for leaf in leaves)
    back = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert back.layers == (1,) and back.grid_size == (2, 2) and back.num_blocks == 3
    assert back.patches(-2) is out.patch_tokens[0]


def _run_onnx(path, pixels):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"pixel_values": pixels.numpy()})))


@pytest.mark.parametrize(
    "config",
    [dict(), dict(class_token=False, pool="map"), dict(num_register_tokens=2, embed_dim=16, act="quick_gelu")],
    ids=["cls", "map", "registers_projection"],
)
def test_onnx_equals_torch(config, tmp_path):
    pytest.importorskip("onnx")
    from vlm_encoder.export.onnx import export_onnx

    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(**TINY, **config)).eval()
    path = export_onnx(encoder, tmp_path / "enc.onnx", (0, -1), norm=True)
    pixels = torch.randn(3, 3, 32, 32)  # another batch size than the traced one
    got = _run_onnx(path, pixels)
    assert list(got) == ["layer_0", "layer_1", "pooled"]
    with torch.no_grad():
        want = encoder(pixels, layers=(0, -1), norm=True)
        for i in (0, 1):
            assert abs(got[f"layer_{i}"] - want.tokens(i).numpy()).max() <= 1e-4
        assert abs(got["pooled"] - encoder.project(want.pooled).numpy()).max() <= 1e-4


def test_export_onnx_command(tmp_path, capsys):
    pytest.importorskip("onnx")
    from vlm_encoder.cli import main

    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(**TINY))
    encoder.save_pretrained(tmp_path / "enc")
    out = tmp_path / "enc.onnx"
    assert main(["export-onnx", str(tmp_path / "enc"), "--layers", "0", "--image-size", "48x32", "--out", str(out)]) == 0
    assert "layer_0" in capsys.readouterr().out
    pixels = torch.randn(2, 3, 48, 32)
    got = _run_onnx(out, pixels)
    assert list(got) == ["layer_0"]  # no pooled: the last block did not run
    with torch.no_grad():
        want = encoder.eval()(pixels, layers=(0,)).tokens(0).numpy()
    assert got["layer_0"].shape == (2, 1 + 6 * 4, 32) and abs(got["layer_0"] - want).max() <= 1e-4
