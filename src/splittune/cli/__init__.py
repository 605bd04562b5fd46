"""The ``splittune`` command: one module per command family (``train``, ``serve``, ``study``, ``generate``,
``evaluate``, ``privacy``, ``catalog``), their commands registered here, in the order ``--help`` lists them, on the one typer app
of ``app.py``."""

from . import catalog, evaluate, generate, privacy, serve, study, train
from .app import app, main
from .dashboard import dashboard

for command, name in [(train.train, None), (train.compare, None), (study.bench, None), (serve.serve, None), (serve.certs, None),
                      (serve.health, None), (study.verify, None), (study.plan, None), (generate.export, None),
                      (generate.generate, None), (evaluate.evaluate, None), (catalog.models, None), (privacy.attack, None), (privacy.leak, None),
                      (privacy.privacy, None), (catalog.config_command, "config"), (catalog.fetch, None)]:
    app.command(name)(command)
app.command()(dashboard)  # splittune dashboard RUN_DIR: a run's live page

__all__ = ["app", "main"]
