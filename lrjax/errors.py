"""Exceptions for user errors: the CLI prints them as one line and exits non-zero."""


class LrjaxError(Exception):
    """A problem the user can fix (bad input, bad flag, missing file); never a bug in lrjax."""


class DataError(LrjaxError):
    """Missing, corrupt or unexpected dataset files, or a dataset that cannot be loaded offline."""


class ConfigError(LrjaxError):
    """An invalid configuration value."""


class CheckpointError(LrjaxError):
    """A checkpoint that cannot be read."""


class TrainingDiverged(LrjaxError):
    """The training loss became NaN or infinite."""


class WriteError(LrjaxError):
    """A write that the filesystem refused (full, read-only, no permission, over quota); what was
    written before it is intact and the same command resumes once the cause is fixed."""

    def __init__(self, message: str, path=None, errno: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno
