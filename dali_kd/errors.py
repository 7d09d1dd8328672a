"""The one error type for user mistakes: the CLI prints its message as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (config, flag, path, model name); never a bug in dali_kd."""


class TrainingStopped(Exception):
    """The run stopped itself for a reason it explains (e.g. a NaN loss); what was saved before stays valid."""
