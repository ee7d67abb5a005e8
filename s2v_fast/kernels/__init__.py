# The FP8 attention module registers attention backend "fp8" when imported (opt-in: never
# picked by "auto"); import it here so the backend name is always known.
try:
    from . import fp8_attention as _fp8_attention  # noqa: F401
except Exception:  # pragma: no cover - e.g. a torch without float8 dtypes
    pass
