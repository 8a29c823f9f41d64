#!/usr/bin/env python3
"""Serve pyrestserver's WSGI application with waitress.

Usage (same flags as pyrestserver itself):

    python tests/wsgi_door.py --path P --listen 127.0.0.1:0 --no-auth [...]

The application is built by ``pyrestserver.app_from_argv(argv)`` from the full
argument list; this script only takes the host and port from ``--listen`` and
serves the application with waitress (8 worker threads).  Once the socket is
bound it prints ``start server on HOST:PORT`` (with the real port, also for
port 0) on stderr, like pyrestserver's built-in server does.  SIGTERM and
SIGINT stop it cleanly with exit status 0.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pyrestserver  # noqa: E402


def listen_address(argv, default=":8000"):
    """The value of the last --listen flag (``--listen X`` or ``--listen=X``)."""
    value = default
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--listen" and i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--listen="):
            value = arg[len("--listen="):]
        i += 1
    return value


def split_host_port(value):
    if value.startswith("unix:"):
        raise SystemExit("wsgi_door: unix sockets are not supported, use HOST:PORT")
    host, sep, port = value.rpartition(":")
    if not sep:
        raise SystemExit(f"wsgi_door: invalid --listen value {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port or 0)


def format_address(host, port):
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    host, port = split_host_port(listen_address(argv))
    app = pyrestserver.app_from_argv(argv)

    import waitress

    server = waitress.create_server(
        app,
        host=host,
        port=port,
        threads=8,
        # pass every request header through unchanged (the application decides
        # what a proxy header means, e.g. --proxy-auth-username)
        clear_untrusted_proxy_headers=False,
        # restic pack files are ~16 MiB by default and at most 128 MiB
        max_request_body_size=8 * 1024 ** 3,
        asyncore_use_poll=True,
    )

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    address = format_address(server.effective_host, server.effective_port)
    sys.stderr.write(f"start server on {address}\n")
    sys.stderr.flush()
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        server.close()
        sys.stderr.write("shutdown cleanly\n")
        sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
