"""s2v_fast: fast, faithful Wan2.2 Speech-to-Video inference."""

__version__ = "0.1.0"

__all__ = ["S2VPipeline", "S2VTransformer", "__version__"]


def __getattr__(name):  # lazy: `import s2v_fast` stays cheap and the CLI starts fast
    if name == "S2VTransformer":
        from .models.dit import S2VTransformer

        return S2VTransformer
    if name == "S2VPipeline":
        from .pipeline import S2VPipeline

        return S2VPipeline
    raise AttributeError(name)
