"""Schedules: how clients take turns with the server, and how their adapters are combined (stage 7)."""
