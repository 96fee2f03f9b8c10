"""Projectors: map vision tokens of width `d_vit` to an LLM width `d_llm`.

The public name of `vlm_encoder.projectors`, where the code lives (`from projectors import
build_projector` and `from vlm_encoder.projectors import build_projector` are the same).

Dependency rule: `projectors` imports `vlm_encoder`, never the reverse. Inside `vlm_encoder`,
`projectors` builds only on the base modules (`output`, `pretrained`, `weights`, `specs`), and
`vlm` is its only user there, so `VisionLanguageModel` loads and builds projectors with plain
imports. `tests/test_imports.py` checks both rules, lazy imports included.
"""

from vlm_encoder.projectors import *  # noqa: F403
from vlm_encoder.projectors import __all__  # noqa: F401
