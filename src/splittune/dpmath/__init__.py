"""The privacy math the pipeline stands on, a leaf: noise mechanisms and their calibration (``mechanisms``), privacy
accountants (``accounting``, ``budget``), leakage metrics (``metrics``) and secure aggregation (``secagg``). The cut's
defenses, the parties and the run import it; it imports nothing above the wire."""
