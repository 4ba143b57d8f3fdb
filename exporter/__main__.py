"""Command line: `procfleet-exporter [--config FILE] [--listen HOST:PORT] [--hostname NAME]`.

process-exporter's flag spellings (`-config.path`, `-web.listen-address`, `-children=false`,
...) are accepted too, or refused saying why: see exporter/pecompat.py.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import secrets
import sys

from exporter.pecompat import CompatError, translate
from procfleet import __version__
from procfleet.configcheck import ConfigError
from procfleet.hostnames import hostname_problem
from procfleet.logs import add_log_level_flag, setup_logging
from procfleet.netaddr import ListenError, is_loopback, parse_listen
from procfleet.serve import HEAD_TIMEOUT, raise_file_limit, serve
from procfleet.webconfig import add_web_config_flag
from procfleet.webconfig import load as load_web_config

# Named by module, as everywhere: __spec__, since __name__ is "__main__" under `python -m`.
log = logging.getLogger(__spec__.name if __spec__ else __name__)


def _thread_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64, got {text!r}")
    return int(text)


def _head_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 300:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 1 to 300, got {text!r}")
    return value


def _rate_interval(text: str) -> float:
    from exporter.config import interval_problem

    try:
        value: object = float(text)
    except ValueError:
        value = text
    why = interval_problem(value)
    if why:
        raise argparse.ArgumentTypeError(why)
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procfleet-exporter",
        description="Per-host process exporter: Prometheus metrics of process groups at "
                    "/metrics and fresh JSON lookups at /process/{pid}.",
        epilog="Flags beat the config file; the file beats built-in defaults. "
               "'procfleet-exporter token' prints a new bearer token and its config lines. "
               "process-exporter's flags work too (-config.path, -web.listen-address, "
               "-children, -gather-smaps, -remove-empty-groups, -procfs /proc, "
               "-threads=false, -recheck=false): see README.md.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML configuration (default: built-in defaults, see "
                             "config/exporter.yml)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="address to serve on (default 127.0.0.1:9256; loopback because "
                             "command lines are sensitive)")
    parser.add_argument("--hostname", metavar="NAME",
                        help="host name this exporter reports (default: the system's)")
    add_log_level_flag(parser)
    parser.add_argument("--allow-unauthenticated-nonloopback", action="store_true",
                        help="serve on a non-loopback address without a token (command lines "
                             "and metrics are then readable by anyone who can connect)")
    parser.add_argument("--threads", type=_thread_count, default=4, metavar="N",
                        help="request worker threads, 1 to 64 (default 4)")
    parser.add_argument("--head-timeout", type=_head_timeout, default=HEAD_TIMEOUT,
                        metavar="SECONDS",
                        help="close a connection that has not sent a complete request this "
                             f"long after opening, 1 to 300 (default {HEAD_TIMEOUT:g})")
    parser.add_argument("--rate-interval", type=_rate_interval, metavar="SECONDS",
                        help="window of the live rates (cpu_percent_recent, read/write bytes "
                             "per second): how often every process's counters are read, "
                             "1 to 300 (default 5, or rates.interval_seconds from the file)")
    add_web_config_flag(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def token_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="procfleet-exporter token",
        description="Print a new random bearer token once, and the config lines that hold "
                    "only its SHA-256.")
    parser.parse_args(argv)
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token (shown once; give it to the query service and Prometheus): {token}")
    print("exporter config:")
    print("auth:")
    print(f"  token_sha256: {digest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:
        return token_command(argv[1:])
    parser = build_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    try:
        compat = translate(argv, known)
    except CompatError as exc:
        print(f"procfleet-exporter: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(compat.argv)
    # Imported here so `--help` and `token` work even where psutil cannot load.
    from exporter.app import create_app
    from exporter.config import Config, load

    try:
        config = load(args.config) if args.config else Config()
        listen = parse_listen(args.listen) if args.listen else None
        web = load_web_config(args.web_config_file) if args.web_config_file else None
    except (ConfigError, ListenError) as exc:
        print(f"procfleet-exporter: {exc}", file=sys.stderr)
        return 2
    why = hostname_problem(args.hostname) if args.hostname is not None else None
    if why is not None:
        print(f"procfleet-exporter: --hostname {why}", file=sys.stderr)
        return 2
    config = config.with_overrides(listen=listen, hostname=args.hostname,
                                   metrics=compat.metrics,
                                   rate_interval=args.rate_interval)
    host, port = config.listen
    if (not config.auth.enabled and not (web is not None and web.users)
            and not is_loopback(host) and not args.allow_unauthenticated_nonloopback):
        print(f"procfleet-exporter: refusing to serve on {host}:{port} without a token: "
              "command lines are sensitive. Set auth.token_sha256 (see "
              "'procfleet-exporter token') or basic_auth_users (--web.config.file), "
              "listen on loopback, or pass "
              "--allow-unauthenticated-nonloopback.", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log_level)
    log.info("starting exporter version %s for host %s (config: %s, token auth: %s, "
             "web config: %s, TLS: %s, basic auth: %s)",
             __version__, config.hostname, config.source,
             "on" if config.auth.enabled else "off", web.source if web else "none",
             "on" if web and web.tls else "off", "on" if web and web.users else "off")
    for note in compat.notes:
        log.info("process-exporter flag %s", note)
    raise_file_limit()
    app = create_app(config, web=web)
    try:
        serve(app, host, port, logger=log, name="procfleet-exporter", threads=args.threads,
              head_timeout=args.head_timeout, web=web)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc.strerror or exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
