"""Deployment: the server process behind gRPC (TLS, tokens, limits, health), addresses and test certificates."""
