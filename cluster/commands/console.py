"""`rayft console`: open the web console of a running `rayft serve` application in a browser.

The console is served by the application itself (`/console`, service/console.py); this command checks that the
application answers there and opens the page. The token is never put in the URL: the page asks for it.
"""

from __future__ import annotations

import argparse
import os

from storage.errors import RayftError


class ConsoleUnreachable(RayftError):
    """No rayft application answers at the given URL."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("console", help="open the web console of a running `rayft serve` (runs, registry, search, playground)")
    p.add_argument("--url", default=os.environ.get("RAYFT_API_URL", "http://127.0.0.1:8000"),
                   help="the application's base URL, as `rayft serve` printed it without /v1 (default: $RAYFT_API_URL, "
                        "else http://127.0.0.1:8000)")
    p.add_argument("--no-browser", action="store_true", help="print the console's URL instead of opening a browser")
    p.set_defaults(func=run)


def console_url(base_url: str) -> str:
    """The console's address for an application URL (with or without a trailing /v1)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return f"{base}/console"


def check_reachable(url: str) -> None:
    """The console page answers at `url` (it needs no token); ConsoleUnreachable naming the fix otherwise."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            if b"rayft console" not in response.read(4096):
                raise ConsoleUnreachable(f"{url} answers, but not with the rayft console: is --url a `rayft serve` application?")
    except urllib.error.HTTPError as err:
        raise ConsoleUnreachable(f"{url} answered HTTP {err.code}: is the application a rayft version with the console?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConsoleUnreachable(f"nothing answers at {url} ({reason}): start `rayft serve examples/serve.yaml` "
                                 "or pass the application's address with --url") from None


def run(args: argparse.Namespace) -> int:
    url = console_url(args.url)
    check_reachable(url)
    print(f"[rayft] console: {url} (sign in with the API token if the application has one)", flush=True)
    if not args.no_browser:
        import webbrowser

        if not webbrowser.open(url):
            print("[rayft] no browser found here: open the address above", flush=True)
    return 0
