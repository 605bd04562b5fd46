"""After training: ``export`` (one PEFT adapter) and ``generate`` (through the same split)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import console, fail, human_bytes, quiet_libraries, shows_warnings, user_errors
from .options import ClientId, ReplyTimeout, Server, TapMaxBytes, TlsCa, TlsCert, TlsKey, TokenFile, grpc_client


def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out: Path = typer.Option(..., "--out", "-o", help="where to write the PEFT adapter"),
    merge: bool = typer.Option(False, "--merge", help="also write full weights with the adapters merged (out/merged)"),
    client: Optional[int] = typer.Option(None, "--client", min=0, help="export this client's personalised model instead of the global one"),
    force: bool = typer.Option(False, "--force", help="write into --out even when it already holds files"),
) -> None:
    """Write one standard PEFT adapter for the whole model, with its tokenizer (AutoPeftModelForCausalLM loads it)."""
    quiet_libraries()
    from ..export import export_run

    try:
        info = export_run(run_dir, out, merge=merge, client=client, force=force)
    except user_errors() as err:
        fail(str(err))
    console.print(f"wrote a PEFT adapter to [bold green]{out}[/]: {info['lora_tensors']} LoRA tensors"
                  + (f" on {info['target_modules']} in blocks {info['layers']}" if info.get("lora_tensors") else "")
                  + f", with its tokenizer; its base: {escape(info['base_model'])}")
    if merge:
        console.print(f"merged full weights in [bold green]{out / 'merged'}[/]")


@shows_warnings
def generate(
    run_dir: Path = typer.Argument(..., help="a finished run directory (splittune train --out DIR)"),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="a prompt (repeat for several)"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="prompts, one per line ('-': standard input)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate at most per prompt"),
    greedy: bool = typer.Option(False, "--greedy", help="always the most likely token (the default unless --temperature, "
                                "--top-p or --top-k is given)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="sample with this temperature (> 0)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="sample from the smallest set of tokens holding this probability"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="sample from the k most likely tokens (0: all)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="make sampling reproducible"),
    stop: list[str] = typer.Option([], "--stop", help="stop when the completion ends with this text (repeat for several)"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they come (one prompt at a time)"),
    raw: bool = typer.Option(False, "--raw", help="send the prompt as it is (no chat template for an instruction run)"),
    batch: bool = typer.Option(False, "--batch", help="generate for every prompt in one left-padded batch"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per prompt: prompt, completion, token ids, bytes each "
                                 "way, time to first token"),
    client: Optional[int] = typer.Option(None, "--client", min=0, help="generate with this client's personalised model"),
    compare_base: bool = typer.Option(False, "--compare-base", help="also generate with the base model (before fine-tuning) "
                                      "through the same split, and show both completions side by side"),
    server: Server = None,
    client_id: ClientId = "anonymous",
    token_file: TokenFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    reply_timeout: ReplyTimeout = 600.0,
    record_tap: Optional[Path] = typer.Option(None, "--record-tap", help="record what the in-process server sees (the prompt's "
                                              "and every token's activations) into DIR, as `serve --record-tap` does"),
    tap_max_bytes: TapMaxBytes = "1GiB",
) -> None:
    """Generate text with a run's fine-tuned model through the same split: the text stays here, the server runs its part."""
    quiet_libraries()
    import json as _json

    from ..generation import load_split

    sampling = temperature is not None or top_p is not None or top_k is not None
    try:
        if greedy and sampling:
            raise _usage_error("--greedy decodes without sampling; drop it to sample with --temperature/--top-p/--top-k")
        prompts = list(prompt) + _read_prompts(prompt_file)
        if not prompts:
            raise _usage_error("give a prompt: --prompt TEXT or --prompt-file FILE")
        if max_new_tokens < 1:
            raise _usage_error(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if stream and (batch or as_json or compare_base):
            raise _usage_error("--stream prints one prompt's tokens as they come; it does not combine with --batch, --json "
                               "or --compare-base")
        if record_tap is not None and server is not None:
            raise _usage_error("--record-tap records the in-process server; a deployed server's operator records with "
                               "`splittune serve --record-tap DIR`")
        channel = grpc_client(server, client_id, token_file, tls_ca, tls_cert, tls_key, reply_timeout)() if server else None
        recording = None
        if record_tap is not None:
            from ..taps.recording import Recording

            recording = Recording(record_tap, ("server",), tap_max_bytes, truth=False)
        try:
            split = load_split(run_dir, channel=channel, client=client, serve_through=recording.attach if recording else None)
        except BaseException:
            if channel is not None:  # the split did not take it over: close it here, not at exit
                channel.close()
            raise
    except user_errors() as err:
        fail(str(err))
    options = dict(raw=raw, max_new_tokens=max_new_tokens, greedy=not sampling, temperature=1.0 if temperature is None else temperature,
                   top_p=top_p if top_p is not None else 1.0, top_k=top_k or 0, seed=seed, stop=stop or None, batch=batch)
    try:
        with split:
            if stream:
                from transformers import TextStreamer

                for text in prompts:
                    console.print(f"[bold]{escape(text)}[/]", highlight=False)
                    split.complete([text], streamer=TextStreamer(split.tokenizer, skip_prompt=True, skip_special_tokens=True),
                                   **options)
                return
            results = split.complete(prompts, **options)
        bases = None
        if compare_base:
            base_channel = grpc_client(server, client_id, token_file, tls_ca, tls_cert, tls_key, reply_timeout)() if server else None
            with load_split(run_dir, channel=base_channel, client=client, base=True) as base_split:
                bases = base_split.complete(prompts, **options)
    except user_errors() as err:
        fail(str(err))
    finally:
        if recording is not None:
            recording.close()
    if bases is not None and not as_json:
        return _side_by_side(results, bases)
    for i, r in enumerate(results):
        if as_json:
            print(_json.dumps({**r.to_json(), **({"base_completion": bases[i].completion} if bases else {})}), flush=True)
        else:
            console.print(f"[bold]{escape(r.prompt)}[/]", highlight=False)
            console.print(escape(r.completion), highlight=False)
            ttft = f", first token after {r.time_to_first_token_s * 1000:.0f} ms" if r.time_to_first_token_s is not None else ""
            console.print(f"[dim]{len(r.token_ids)} tokens in {r.seconds:.2f} s{ttft}; {human_bytes(r.bytes_up)} up, "
                          f"{human_bytes(r.bytes_down)} down in {r.messages} crossings[/]", highlight=False)


def _side_by_side(results, bases) -> None:
    """Each prompt with the base model's and the fine-tuned model's completions: two columns on a terminal wide
    enough, labelled lines otherwise (a pipe, a log)."""
    from rich.table import Table

    for r, b in zip(results, bases):
        console.print(f"[bold]{escape(r.prompt)}[/]", highlight=False)
        if console.is_terminal and console.width >= 80:
            table = Table(show_header=True, header_style="bold", expand=True)
            table.add_column("base model")
            table.add_column("fine-tuned")
            table.add_row(escape(b.completion), escape(r.completion))
            console.print(table)
        else:
            console.print(f"base model: {escape(b.completion)}", highlight=False, soft_wrap=True)
            console.print(f"fine-tuned: {escape(r.completion)}", highlight=False, soft_wrap=True)


def _usage_error(message: str) -> Exception:
    from ..config import ConfigError

    return ConfigError(message)


def _read_prompts(path: Path | None) -> list[str]:
    """One prompt per non-empty line of ``path`` ('-': standard input)."""
    if path is None:
        return []
    from ..config import ConfigError

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompt-file {path}: cannot read it ({err})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompt-file {path} holds no prompt (one per line)")
    return prompts
