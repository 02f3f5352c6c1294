"""The factory: a pipeline file runs pocketlm's stages in order, each as its own command, skips those whose
inputs did not change, and writes a report (`pocketlm run PIPELINE.yaml`).

    from pocketlm.pipeline import load_pipeline, run_pipeline
    result = run_pipeline(load_pipeline("recipes/pipelines/quickstart.yaml"))
    print(result.ran, result.report)
"""

from .runner import RunResult, StageFailed, StageResult, check_pipeline, read_lock, run_pipeline
from .spec import Pipeline, PipelineError, Stage, load_pipeline
from .stages import STAGE_TYPES

__all__ = ["Pipeline", "PipelineError", "RunResult", "STAGE_TYPES", "Stage", "StageFailed", "StageResult",
           "check_pipeline", "load_pipeline", "read_lock", "run_pipeline"]
