"""Reports people would rather see than read: plots of a run."""
