"""A hostile pickle for the safe-loading tests: unpickling it writes a marker file."""


class Payload:
    """What a hostile checkpoint would do: its unpickling opens (creates) `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
