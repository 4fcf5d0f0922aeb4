"""`ticketguard serve`: answer predictions for a model file over HTTP (ticketguard-predict/1)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from ticketguard.cli._common import (
    arch_arg_option,
    check_arch,
    check_dataset,
    device_option,
    library_errors,
    parse_kwargs,
)


def _raise_file_limit(wanted: int) -> None:
    """Let the process hold `wanted` open files (sockets), within the hard limit, if it can."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or not allowed: the connection cap still holds, accept() may back off


@click.command()
@click.argument("model_file", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0 picks a free one).",
)
@click.option(
    "--arch",
    default=None,
    callback=check_arch,
    help="Architecture when the file records none (registry, torchvision or package.module:factory).",
)
@arch_arg_option
@click.option(
    "--dataset",
    default=None,
    callback=check_dataset,
    metavar="DATASET",
    help="Dataset the model takes (input shape, pixel normalization for images) when the file "
    "records none.",
)
@device_option
@click.option(
    "--max-batch",
    default=1024,
    show_default=True,
    type=click.IntRange(1),
    help="Most samples one request may hold.",
)
@click.option("--verbose", is_flag=True, help="Log one line per request to stderr.")
@library_errors
def serve(
    model_file: str,
    host: str,
    port: int,
    arch: str | None,
    arch_arg: tuple[str, ...],
    dataset: str | None,
    device: str,
    max_batch: int,
    verbose: bool,
) -> None:
    """Serve MODEL's predictions over HTTP until Ctrl-C.

    MODEL is any file ticketguard reads (nothing in it is executed). The protocol is
    ticketguard-predict/1 (docs/serve-protocol.md): GET /info describes the model; POST /predict takes {"inputs": [...]} (model-ready floats, N x C x H x W) or
    {"images": [base64 PNG, ...]} and answers {"labels": [...]}. Images need the pixel
    normalization, which comes from the dataset (recorded in the file, or --dataset).

    The server holds under load: a listen backlog of 1024, at most 512 connections and 4
    requests predicted at once, headers within 10 s and bodies within 30 s, and a body cap
    implied by the input shape and --max-batch, checked before the body is read (see "Limits"
    in docs/serve-protocol.md).

    \b
    Examples:
      ticketguard serve runs/digits/final.ticket --port 8000
      ticketguard serve stolen.pth --arch resnet20 --dataset cifar10 --host 0.0.0.0
      curl -s localhost:8000/info
    """
    from ticketguard.verify.server import MAX_CONNECTIONS, make_server, service_from_file

    kwargs = parse_kwargs(arch_arg, "--arch-arg") if arch_arg else None
    service = service_from_file(
        model_file,
        arch=arch,
        arch_kwargs=kwargs,
        dataset=dataset,
        device=device,
        max_batch=max_batch,
    )
    # Every connection up to the cap, plus the model's and Python's own files.
    _raise_file_limit(MAX_CONNECTIONS + 256)
    try:
        server = make_server(service, host, port, verbose=verbose)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.ClickException(f"cannot listen on {host}:{port}: {reason}") from None

    # SIGTERM and Ctrl-C ask the loop to stop; raising from the handler instead could land in
    # any frame (a transport's __del__ swallows it) and leave the server running.
    def stop(signum: int, frame: Any) -> None:
        server.request_stop()

    # Installed before the address is printed: a client may signal as soon as it reads it.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    c, h, w = service.input_shape
    click.echo(
        f"serving {model_file} ({service.architecture}, input {c}x{h}x{w}, {service.num_classes} classes) "
        f"at {server.url} — POST /predict, GET /info; Ctrl-C stops"
    )
    sys.stdout.flush()

    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
    # Connection threads may still be blocked on kept-alive sockets, and torch's C++ worker
    # threads alive: tearing the interpreter down around them can abort the process (SIGABRT,
    # "terminate called without an active exception"). Nothing is left to save, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
