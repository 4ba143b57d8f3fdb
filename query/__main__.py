"""Command line: `procfleet-query [--config FILE] [--listen HOST:PORT] [--log-level LEVEL]`
and `… keygen`.

Serves the query service with waitress until SIGTERM; SIGHUP re-reads the file's discovery
keys and every discovery source. A configuration problem prints the message (every problem
by key path) and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import signal
import sys
from collections.abc import Sequence

from procfleet import __version__
from procfleet.configcheck import ConfigError
from procfleet.logs import add_log_level_flag, setup_logging
from procfleet.netaddr import ListenError, is_loopback, parse_listen
from procfleet.serve import raise_file_limit, serve
from procfleet.webconfig import add_web_config_flag
from procfleet.webconfig import load as load_web_config
from query import config as query_config
from query.app import create_app
from query.auth import key_hash, new_key
from query.config import PERMISSIONS
from query.discovery import Discovery, DiscoveryError
from query.fanout import Fanout

# Named by module, as everywhere: __spec__, since __name__ is "__main__" under `python -m`.
log = logging.getLogger(__spec__.name if __spec__ else __name__)

USAGE_ERROR = 2
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procfleet-query",
        description="Serve the procfleet query service: GET /node/{target}/process/{pid} "
                    "across the exporters of the fleet.")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML configuration (default: built-in, the local exporter at "
                             "http://127.0.0.1:9256 known as this host's name, auth off)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="address to serve on; beats the file's listen "
                             f"(default {query_config.DEFAULT_LISTEN})")
    add_log_level_flag(parser)
    parser.add_argument("--allow-unauthenticated-nonloopback", action="store_true",
                        help="serve on a non-loopback address even when auth is disabled")
    parser.add_argument("--allow-insecure-config", action="store_true",
                        help="load a --config file that users other than root and this "
                             "service's user could change (or, holding a token, read), "
                             "with a warning; refused otherwise")
    add_web_config_flag(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    keygen = commands.add_parser(
        "keygen", help="print a new API key once and the configuration lines for it",
        description="Print a new random API key (shown only this once) and the lines to add "
                    "under auth.api_keys; the configuration keeps only its SHA-256 hash.")
    keygen.add_argument("--name", required=True, help="a name for the key, e.g. grafana")
    keygen.add_argument("--permission", action="append", required=True, choices=PERMISSIONS,
                        help="a permission to grant; repeat for several")
    return parser


def keygen(name: str, permissions: Sequence[str]) -> str:
    """The text `keygen` prints: the key in a comment, then YAML for auth.api_keys.

    The entry is indented as it goes under `  api_keys:` (inside `auth:`), as in
    config/query.yml, so the output pastes, or `sed '/^  api_keys:$/r FILE'` inserts, as is.
    """
    key = new_key()
    granted = ", ".join(dict.fromkeys(permissions))
    return (f"# New API key {name!r}, shown only this once (the configuration keeps its hash):\n"
            f"#   {key}\n"
            f"# Goes under \"  api_keys:\" in auth: of the query service configuration:\n"
            f"    - name: {name}\n"
            f"      sha256: \"{key_hash(key)}\"\n"
            f"      permissions: [{granted}]\n")


def _fail(message: str) -> int:
    print(f"procfleet-query: {message}", file=sys.stderr)
    return USAGE_ERROR


# The cycle collector's thresholds (CPython's default: 700, 10, 10). A broadcast to 10,000
# exporters keeps ~200,000 objects alive at once (a kept-alive connection per exporter, the
# answers), so the default ran a full collection over all of them once or twice per broadcast:
# a third of its CPU (bench/bench_query_fanout.py at 10,000: 1.49 -> 1.05 s of CPU with these).
# Reference counting still frees everything at once; only cycles wait longer.
GC_THRESHOLDS = (50_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keygen":
        if not _NAME_RE.fullmatch(args.name):
            return _fail("--name must be a plain word (letters, digits, '-', '_', '.')")
        sys.stdout.write(keygen(args.name, args.permission))
        return 0

    try:
        config = (query_config.load(args.config, allow_insecure=args.allow_insecure_config)
                  if args.config else query_config.default_config())
        web = load_web_config(args.web_config_file) if args.web_config_file else None
    except ConfigError as exc:
        return _fail(str(exc))
    setup_logging(args.log_level or config.log_level)
    listen = args.listen or config.listen
    try:
        host, port = parse_listen(listen)
    except ListenError as exc:
        return _fail(f"--listen: {exc}")
    if not config.auth.enabled and not (web is not None and web.users) \
            and not is_loopback(host) and not args.allow_unauthenticated_nonloopback:
        return _fail(f"authentication is disabled, so refusing to listen on {listen} (not "
                     "loopback); enable auth, or pass --allow-unauthenticated-nonloopback")
    if not config.auth.enabled and not (web is not None and web.users):
        log.warning("authentication is disabled: every client may query every process")

    raise_file_limit()
    try:
        discovery = Discovery.from_config(config)
    except DiscoveryError as exc:
        return _fail(f"invalid discovery in {config.source}:\n  - {exc}")
    log.info("configuration loaded", extra={"fields": {
        "source": config.source, "exporters": len(discovery.fleet.exporters),
        "auth": "on" if config.auth.enabled else "off",
        "web_config": web.source if web else "none", "tls": "on" if web and web.tls else "off",
        "basic_auth": "on" if web and web.users else "off"}})
    config_path, allow_insecure = args.config, args.allow_insecure_config
    discovery.start(load_config=(lambda: query_config.load(
        config_path, allow_insecure=allow_insecure)) if config_path else None)
    # The handler only sets a flag; the discovery thread does the work, off every request.
    signal.signal(signal.SIGHUP, lambda signum, frame: discovery.request_reload())
    try:
        with Fanout.from_config(config) as fanout:
            app = create_app(config, discovery=discovery, fanout=fanout, web=web)
            gc.set_threshold(*GC_THRESHOLDS)
            try:
                serve(app, host, port, logger=log, name="procfleet-query",
                      threads=config.threads, head_timeout=config.head_timeout, web=web,
                      pausable=True)  # the app pauses callers of open circuits (app.py)
            except OSError as exc:
                log.error("cannot listen", extra={"fields": {"listen": listen, "reason": exc}})
                return 1
    finally:
        discovery.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
