"""Schedules: how clients take turns with the server, as policy objects the training loop and the server both read."""
