"""GPU checks, run where a CUDA device exists (`pytest -m gpu tests/test_gpu.py`; skipped
elsewhere, and left out of `make test`): the encoder and losses on CUDA against the CPU, and
the Trainer's CUDA paths (fused AdamW, bf16, fp16 with CUDA's gradient scaler, torch.compile)
with exact resume."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def gpu_config(tmp_path, **changes):
    from test_train import tiny_config

    return tiny_config(tmp_path, **changes)


def test_encoder_on_cuda_matches_the_cpu():
    from vlm_encoder import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("vit_base_patch16_224").eval()
    pixels = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        cpu = encoder(pixels, layers=(4, -1))
        cuda = encoder.cuda()(pixels.cuda(), layers=(4, -1))
    for a, b in zip(cpu.cls_tokens, cuda.cls_tokens):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cuda.pooled.cpu(), cpu.pooled, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(encoder(pixels.cuda()).pooled).all()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_loss_on_cuda_matches_open_clip_and_stays_linear(kind):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    from vlm_encoder.contrastive import ClipLoss, SigLipLoss

    ours = ClipLoss(chunk_size=1024) if kind == "clip" else SigLipLoss(chunk_size=1024)
    theirs = open_clip_loss.ClipLoss() if kind == "clip" else open_clip_loss.SigLipLoss()
    image = torch.nn.functional.normalize(torch.randn(4096, 512, device="cuda"), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(4096, 512, device="cuda"), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    a = ours(image, text, scale, bias)
    (ga,) = torch.autograd.grad(a, image)
    b = theirs(image, text, scale, bias) if kind == "siglip" else theirs(image, text, scale)
    (gb,) = torch.autograd.grad(b, image)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-3)

    def peak(batch: int) -> int:
        x = torch.nn.functional.normalize(torch.randn(batch, 512, device="cuda"), dim=-1).requires_grad_()
        y = torch.nn.functional.normalize(torch.randn(batch, 512, device="cuda"), dim=-1).requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ours(x, y, scale, bias).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(16384), peak(65536)
    assert large < 6 * small  # 4x the batch: linear growth (quadratic would be 16x)


def test_trainer_on_cuda_uses_fused_adamw_and_bf16(tmp_path):
    from vlm_encoder.train import Trainer

    trainer = Trainer(gpu_config(tmp_path, max_steps=3, mixed_precision="bf16"))
    assert trainer.parts.device.type == "cuda"
    assert all(group.get("fused") for group in trainer.parts.optimizer.optimizer.param_groups)
    result = trainer.fit()
    assert not result.skipped_steps
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_fp16_on_cuda_resumes_bitwise(tmp_path):
    from train_helpers import run_killed_after

    from vlm_encoder.train import Trainer

    changes = dict(max_steps=6, checkpoint_every=2, keep_checkpoints=5, mixed_precision="fp16")
    full = Trainer(gpu_config(tmp_path / "full", **changes))
    full.fit()
    assert isinstance(full.accelerator.scaler, torch.amp.GradScaler)
    AcceleratorState._reset_state(True)
    run_killed_after(gpu_config(tmp_path / "cut", **changes), 3)
    AcceleratorState._reset_state(True)
    resumed = Trainer(gpu_config(tmp_path / "cut", **changes))
    resumed.fit()
    assert resumed.accelerator.scaler.get_scale() == full.accelerator.scaler.get_scale()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_compiled_training_matches_eager(tmp_path):
    from vlm_encoder.train import Trainer

    eager = Trainer(gpu_config(tmp_path / "eager", max_steps=3))
    eager_result = eager.fit()
    AcceleratorState._reset_state(True)
    compiled = Trainer(gpu_config(tmp_path / "compiled", max_steps=3, compile=True))
    compiled_result = compiled.fit()
    assert compiled_result.step == eager_result.step == 3
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3, msg=name)


def test_position_table_follows_a_fused_adamw_step_on_cuda():
    """A CUDA fused AdamW step writes the parameters without bumping `_version`: a forward
    at a non-native size afterwards must still use the current table (docs/guarantees.md)."""
    from vlm_encoder import VisionConfig, VisionEncoder

    torch.manual_seed(0)
    config = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)
    encoder = VisionEncoder(config).cuda().eval()
    other = torch.randn(2, 3, 48, 40, device="cuda")
    with torch.no_grad():
        before = encoder(other).patches(-1)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=0.1, fused=True)
    encoder.train()
    encoder(torch.randn(2, 3, 32, 32, device="cuda")).pooled.square().sum().backward()
    optimizer.step()
    encoder.eval()
    fresh = VisionEncoder(config).cuda().eval()
    fresh.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        after = encoder(other).patches(-1)
        assert torch.equal(after, fresh(other).patches(-1))
    assert not torch.equal(after, before)
