"""Feature extraction at scale: a dataset's images -> encoder features in resumable,
checksummed safetensors shards (`run_extraction`), read back with `FeatureStore`.
See docs/extraction.md."""

from .config import KINDS, ExtractConfig
from .runner import ExtractSummary, run_extraction
from .sources import open_image_source
from .store import CachedFeatures, FeatureColumn, FeatureStore, ShardReadError

__all__ = [
    "KINDS",
    "CachedFeatures",
    "ExtractConfig",
    "ExtractSummary",
    "FeatureColumn",
    "FeatureStore",
    "ShardReadError",
    "open_image_source",
    "run_extraction",
]
