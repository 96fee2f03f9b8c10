"""Engines that run an extraction's shards beyond one launch: each a small adapter over the three
tasks of `vlm_encoder.extract.tasks` (plan once on the driver, run shards anywhere, finalize).

    from vlm_encoder.extract.engines import RayEngine
    summary = RayEngine(workers=2).run(config)    # vlm-encoder extract ... --engine ray --workers 2

The local engine is `run_extraction(config)` itself. Importing this package imports no engine:
each adapter imports its engine when it runs, and refuses in one line (`EngineUnavailable`)
when the engine's extra is not installed. See docs/scale.md.
"""

from .base import ENGINES, EngineUnavailable, require_engine
from .ray import RayEngine, ray_dataset
from .spark import SparkEngine, spark_dataframe

__all__ = ["ENGINES", "EngineUnavailable", "RayEngine", "SparkEngine", "ray_dataset", "require_engine",
           "spark_dataframe"]
