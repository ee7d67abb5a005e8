# The dispatcher registers every attention backend (``fp8`` included) when imported; import it
# here so that the backend table is complete whichever kernel module is imported first.
from . import attention as _attention  # noqa: F401
