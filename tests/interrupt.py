"""A run killed before a given step, then started again: what every exact-resume test does."""

import pytest

from splittune.parties.client.pipeline import Client


def crash_at(monkeypatch, step: int) -> None:
    """From now on (within ``monkeypatch``), a client dies just before its step ``step``."""
    real = Client.train_step

    def train_step(self, s, batches):
        if s == step:
            raise KeyboardInterrupt(f"killed before step {s}")
        return real(self, s, batches)

    monkeypatch.setattr(Client, "train_step", train_step)


def killed_then_resumed(monkeypatch, step: int, run):
    """``run()`` killed before ``step``, then ``run()`` again (the same command resumes it); returns what that returns."""
    with monkeypatch.context() as m:
        crash_at(m, step)
        with pytest.raises(KeyboardInterrupt):
            run()
    return run()
