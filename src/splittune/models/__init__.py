"""Models: references (zoo), detected architecture specs, the split plan, per-party weights, adapters."""
