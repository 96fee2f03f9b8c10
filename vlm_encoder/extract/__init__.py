"""Feature extraction at scale: a dataset's images -> encoder features in resumable,
checksummed safetensors shards (`run_extraction`, or the three tasks `plan_extraction`,
`ShardWorker` / `run_shard` and `finalize_extraction` under any engine), read back with
`FeatureStore`. See docs/extraction.md and docs/scale.md."""

from .config import KINDS, ExtractConfig
from .launch import run_extraction
from .sources import open_image_source
from .store import CachedFeatures, FeatureColumn, FeatureStore, ShardReadError
from .tasks import (
    ExtractPlan,
    ExtractSummary,
    ShardResult,
    ShardWorker,
    finalize_extraction,
    plan_extraction,
    run_shard,
)

__all__ = [
    "KINDS",
    "CachedFeatures",
    "ExtractConfig",
    "ExtractPlan",
    "ExtractSummary",
    "FeatureColumn",
    "FeatureStore",
    "ShardReadError",
    "ShardResult",
    "ShardWorker",
    "finalize_extraction",
    "open_image_source",
    "plan_extraction",
    "run_extraction",
    "run_shard",
]
