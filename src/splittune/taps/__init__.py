"""Taps, a leaf: what an observer of a run sees (the server, the aggregator, an eavesdropper), recorded on disk as it
crosses (``recording``) in a format anyone can read back (``tap``). A run writes them; the attacks above the run read
them."""
