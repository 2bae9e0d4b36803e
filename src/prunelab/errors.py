"""The one exception type users see: a problem with their input, named in one line."""


class PrunelabError(ValueError):
    """Bad input (unknown name, value out of range, corrupt file, ...).

    The message names the problem and, where there is a closed set, the allowed values.
    The CLI prints it as one line and exits with status 2.
    """


class TrainingDiverged(PrunelabError):
    """Training reached a non-finite loss: the settings (usually the learning rate) are at fault.

    A subclass so that a caller running many configurations can record the run as diverged and go on.
    """


def unknown(kind: str, name: str, allowed) -> PrunelabError:
    """Error for a name that is not in a registry, listing the allowed names."""
    return PrunelabError(f"unknown {kind} {name!r}; choose from: {', '.join(sorted(allowed))}")
