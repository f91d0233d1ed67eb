"""longrope-convert: LongRoPE long-context checkpoints from Hugging Face Llama models.

The public API (longrope_convert.api, documented in README's "Python API" section) is loaded on first use, so
that `import longrope_convert.<module>` stays as light as that module:

    from longrope_convert import convert_checkpoint, search_factors, evaluate_checkpoint, push_checkpoint, export_gguf
"""

__version__ = "0.1.0"

API = ("convert_checkpoint", "plan_job", "run_job", "search_factors", "evaluate_checkpoint", "push_checkpoint",
       "export_gguf", "evaluation_tables", "JobPlan", "JobResult", "ConversionResult", "SearchSettings",
       "SearchOutcome", "EvaluationResult", "PushResult", "FactorSet", "Progress", "Status", "no_progress", "quiet",
       "ANALYTIC_METHODS", "DEFAULT_INIT", "DEFAULT_SPACE", "SEARCH_PRESETS", "SEARCH_SPACES", "RULER_TASKS",
       "DEFAULT_OBJECTIVE", "SEARCH_OBJECTIVES", "DEFAULT_NEEDLE_TASK",
       "EVAL_DIR", "LongRoPEError")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'longrope_convert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
