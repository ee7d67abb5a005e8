"""User-facing errors.

Every problem a user can fix (bad input file, wrong size, missing checkpoint file, out of memory)
is raised as :class:`S2VError` with a one-line message that names the problem and the fix. The CLI
prints the message and exits with code 2; ``--debug`` shows the traceback.
"""


class S2VError(Exception):
    """A problem the user can fix; the message is one line: what is wrong and what to do."""


class InputError(S2VError):
    """Bad user input: image, audio, pose video, sizes, frame counts, output path."""


class CheckpointError(S2VError):
    """A checkpoint directory or file is missing, incomplete or does not match the model."""
