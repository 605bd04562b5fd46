"""Schedules: how clients take turns with the server, as policy objects the runner and the server both read."""
