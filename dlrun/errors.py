"""The exceptions that reach the user as one paragraph and a documented exit code, not a traceback."""


class UserError(Exception):
    """A mistake the user can fix (config, data, checkpoint): exit code 2."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became NaN or infinite and trainer.on_nonfinite=stop: exit code 3."""

    exit_code = 3


class OutOfMemory(UserError):
    """The device ran out of memory; the message names the batch size to lower: exit code 4."""

    exit_code = 4


class WriteFailed(UserError):
    """A checkpoint or metrics file could not be written (disk full, no permission): exit code 5."""

    exit_code = 5
