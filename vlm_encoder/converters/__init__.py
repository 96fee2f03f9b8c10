"""Converters from other libraries' checkpoints to `VisionEncoder`, one module per family.

Each Hugging Face module (`hf_clip`, `hf_siglip`, `hf_siglip2`, `hf_vit`, `hf_dinov2`) is a
pair of pure functions: `config_from_hf(hf_config) -> VisionConfig` and
`convert_state_dict(state_dict) -> dict` in our names, the latter the family's `TABLE` (HF
name -> ours, plus the few real transforms: fused qkv, the CLS position row) applied by one
walker, `hf_common.KeyTable.convert`. It is strict: every key of the reference must be
consumed or be on the family's explicit list of ignored keys (text tower, logit scale,
classifier, mask token); anything left over or missing raises `WeightsError` naming the keys. They never guess the
family from the keys: `vlm_encoder.load_encoder` chooses it from `config.json`'s `model_type`.

`open_clip_vit` and `timm_vit` load those libraries' towers (`load_open_clip`, `load_timm`);
`open_clip_clip` loads a whole open_clip CLIP (both towers, logit scale) as a
`ContrastiveModel` (`load_open_clip_contrastive`, `ContrastiveModel.from_open_clip`).
"""
