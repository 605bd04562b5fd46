"""The live dashboards: a web page that follows a run as it trains (``splittune dashboard RUN_DIR``) and the served
process's operator page (``splittune serve --dashboard``, whose state ``deploy/dashboard.py`` gathers). Both are
one page and its assets from ``static/`` (shipped in the package, no CDN), polling JSON endpoints that tests read too."""

from .http import DashboardError, Running, read_token, serve
from .run import RunView

__all__ = ["DashboardError", "Running", "RunView", "read_token", "serve"]
