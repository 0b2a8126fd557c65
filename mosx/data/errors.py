"""Errors of the benchmark data builders."""


class MissingDataError(RuntimeError):
    """A source the benchmark needs is not installed; the message names the package to install."""
