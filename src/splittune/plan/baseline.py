"""What an empty party process holds, measured in a fresh process (not the caller's: a test session, a
notebook): it imports what a party process imports (the CLI, the run package, gRPC) and, given a config on stdin,
builds the run's data as a client does (its tokenizer and examples). Building the data peaks above what
stays resident after it, so a client's peak is the larger of that high-water mark and what stays plus its
weights and work."""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys


def _peak() -> int:
    """This process's own high-water mark (``ru_maxrss`` would count the pages of a large parent, copied before
    ``exec``: a bench process holding many models made every prediction gigabytes too large)."""
    from splittune.device import peak_rss

    return peak_rss()


def _resident() -> int:
    """The resident set now (Linux; elsewhere the high-water mark stands in)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak()


@functools.lru_cache(maxsize=8)
def runtime_bytes(config_yaml: str | None = None) -> dict[str, int]:
    """``server``: a party process's resident bytes before any weights load; ``client``: the same once the
    client's data is built (when ``config_yaml``, a dumped RunConfig, is given), and ``client_peak``: the
    high-water mark of building it."""
    # a party process is the CLI's: the child imports it first (this package sits below the CLI and never imports it)
    command = [sys.executable, "-c", "import splittune.cli; from splittune.plan.baseline import main; main()"]
    out = subprocess.run(command, input=config_yaml or "", capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"measuring a party process's baseline failed: {out.stderr[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _warm_up() -> None:
    """A first forward and backward allocates what every later one reuses (the thread pools' stacks, the
    matrix libraries' buffers, autograd's engine): a party process holds it before its first step ends."""
    import torch

    linear = torch.nn.Linear(256, 512)
    x = torch.randn(4, 64, 256, requires_grad=True)
    q = linear(x).view(4, 64, 8, 64).transpose(1, 2)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).float().logsumexp(-1).sum().backward()
    torch.optim.AdamW(linear.parameters()).step()


def main() -> None:
    import splittune.channels.grpc  # noqa: F401
    import splittune.deploy.service  # noqa: F401
    import splittune.run  # noqa: F401

    import gc

    _warm_up()
    gc.collect()
    server = _resident()
    text = sys.stdin.read()
    if text.strip():
        import yaml

        from splittune.config import validate
        from splittune.models.zoo import resolve_model
        from splittune.run import client_tasks

        cfg = validate(yaml.safe_load(text))
        tasks = client_tasks(cfg, resolve_model(cfg.model).tokenizer())  # noqa: F841  (held, as a client holds them)
        gc.collect()
    print(json.dumps({"server": server, "client": _resident(), "client_peak": _peak()}))

