"""One base for the errors a user can act on: a wrong config key, a cut past the last block, a refused token, a
damaged checkpoint. The CLI prints each as one ``error:`` line (no traceback) and exits 2; everything else is a
fault of ours and keeps its traceback. A leaf: it imports nothing, so every layer can derive from it."""


class SplittuneError(Exception):
    """A user-facing error: its text says what was wrong and what is allowed."""
