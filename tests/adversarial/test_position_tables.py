"""Stale position tables: after any change to the learned position table, however it is
written (`.data`, an EMA written through `.data`, a fused optimizer step, `load_state_dict`,
`copy_`), a forward at a non-native size uses the table resampled from the current values.

Each case encodes at a non-native size first (where a cache would fill), changes the
weights, encodes again, and compares with a fresh encoder holding the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from vlm_encoder import VisionConfig, VisionEncoder
from vlm_encoder.layers import resample_pos_embed

TINY = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)
OTHER_SIZES = [(48, 40), (24, 56)]  # grids (6, 5) and (3, 7); native is (4, 4)


def tiny(seed: int = 0) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder(TINY).eval()


def encode(encoder: VisionEncoder, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(pixels, layers=(-1,)).patches(-1)


def fresh_copy(encoder: VisionEncoder) -> VisionEncoder:
    """A new encoder holding `encoder`'s current weights (nothing cached)."""
    fresh = VisionEncoder(encoder.config).eval()
    fresh.load_state_dict(encoder.state_dict())
    return fresh


def data_edit(encoder: VisionEncoder) -> None:
    encoder.pos_embed.data.add_(0.5)


def ema_through_data(encoder: VisionEncoder) -> None:
    online = tiny(seed=1)
    for ema, live in zip(encoder.parameters(), online.parameters()):
        ema.data.mul_(0.5).add_(live.data, alpha=0.5)


def fused_adamw_step(encoder: VisionEncoder) -> None:
    encoder.train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=0.1, fused=True)
    pixels = torch.randn(2, 3, 32, 32)
    encoder(pixels, layers=(-1,)).pooled.square().sum().backward()
    optimizer.step()
    encoder.eval()


def load_other_weights(encoder: VisionEncoder) -> None:
    encoder.load_state_dict(tiny(seed=2).state_dict())


def copy_under_no_grad(encoder: VisionEncoder) -> None:
    with torch.no_grad():
        encoder.pos_embed.copy_(torch.randn_like(encoder.pos_embed))


def swap_parameter(encoder: VisionEncoder) -> None:
    encoder.pos_embed = torch.nn.Parameter(torch.randn_like(encoder.pos_embed))


EDITS = [data_edit, ema_through_data, fused_adamw_step, load_other_weights, copy_under_no_grad, swap_parameter]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__)
def test_other_sizes_follow_every_kind_of_weight_update(edit):
    encoder = tiny()
    images = {size: torch.randn(2, 3, *size) for size in OTHER_SIZES}
    before = {size: encode(encoder, x) for size, x in images.items()}  # any cache fills here
    table_before = encoder.pos_embed.detach().clone()
    edit(encoder)
    assert not torch.equal(encoder.pos_embed.detach(), table_before), "the edit must change the table"
    reference = fresh_copy(encoder)
    for size, x in images.items():
        after = encode(encoder, x)
        assert torch.equal(after, encode(reference, x)), f"{size}: stale position table after {edit.__name__}"
        assert not torch.equal(after, before[size])


def test_position_embedding_is_the_current_table_resampled():
    encoder = tiny()
    c = encoder.config
    with torch.no_grad():
        first = encoder.position_embedding((6, 5))
        encoder.pos_embed.data.mul_(-1.0)  # `_version` unchanged
        second = encoder.position_embedding((6, 5))
        expected = resample_pos_embed(
            encoder.pos_embed, c.grid_size, (6, 5), antialias=c.pos_resample_antialias, mode=c.pos_resample_mode
        )
    assert torch.equal(second, expected)
    assert torch.equal(second, -first)  # the resampling is linear in the table


def test_resample_options_changed_on_the_config_take_effect():
    encoder = tiny()
    x = torch.randn(1, 3, 48, 40)
    bicubic = encode(encoder, x)
    encoder.config = encoder.config.replace(pos_resample_mode="bilinear")
    assert torch.equal(encode(encoder, x), encode(fresh_copy(encoder), x))
    assert not torch.equal(encode(encoder, x), bicubic)


def test_sincos_tables_follow_device_and_dtype():
    torch.manual_seed(0)
    encoder = VisionEncoder(TINY.replace(pos_embed="sincos")).eval()
    x = torch.randn(1, 3, 48, 40)
    first = encode(encoder, x)
    double = copy.deepcopy(encoder).double()
    assert encode(double, x.double()).dtype == torch.float64
    assert torch.equal(encode(encoder, x), first)
