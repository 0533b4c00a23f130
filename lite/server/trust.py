"""Who may talk to the server from a browser: the Host and Origin rules (no web page can drive it).

DNS rebinding: a page on evil.example rebinds its name to 127.0.0.1; the browser then sends
`Host: evil.example:PORT` to this server and lets the page read the answers. So the Host must name
this server: a loopback name or address, the address it is bound to, or a name given with
`--allowed-host` (Ollama's fix after CVE-2024-28224 checks the Host the same way). An IP literal
cannot be rebound, so on a non-loopback bind (which takes an API key) any IP literal is accepted.

Cross-site writes: any page may POST a "simple" request (text/plain, a form, multipart) without a
preflight. Such requests carry the page's `Origin`; only the server's own origin (the page at `/`)
and the origins given with `--cors-origin` are served.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def split_host(host: str) -> str:
    """`name:port`, `[v6]:port` or a bare name -> the lower-case name or address (no brackets, no dot at the end)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def ip_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback_name(name: str) -> bool:
    ip = ip_literal(name)
    return ip.is_loopback if ip is not None else (name in LOOPBACK_NAMES or name.endswith(".localhost"))


@dataclass(frozen=True)
class Trust:
    """The Host and Origin rules of one server: where it is bound, the extra names and origins allowed."""

    bound: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()  # names, "*.example.com", or "*" (any Host: the check is off)
    cors_origins: tuple[str, ...] = ()  # "http://host:port", or "*" (any origin may call it)
    own_names: tuple[str, ...] = field(default_factory=tuple)  # this machine's names (non-loopback binds)

    @classmethod
    def for_bind(cls, bound: str, allowed_hosts: list[str] | tuple[str, ...] = (),
                 cors_origins: list[str] | tuple[str, ...] = ()) -> "Trust":
        bound = split_host(bound)
        names: tuple[str, ...] = ()
        if not is_loopback_name(bound):
            hostname = socket.gethostname().lower()
            names = (hostname, hostname.split(".")[0] + ".local")
        return cls(bound, tuple(split_host(h) if h != "*" else h for h in allowed_hosts),
                   tuple(normal_origin(o) or o for o in cors_origins), names)

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request's Host header names this server (no Host at all: not a browser, allowed)."""
        if host is None or "*" in self.allowed_hosts:
            return True
        name = split_host(host)
        if not name:
            return False
        if is_loopback_name(name) or name == self.bound or name in self.own_names:
            return True
        if ip_literal(name) is not None and not is_loopback_name(self.bound):
            return True  # an address cannot be rebound; a non-loopback bind is behind its API key
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.allowed_hosts)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a request's Origin header is the server's own origin or one given to --cors-origin."""
        normal = normal_origin(origin)
        if normal is None:
            return False  # "null" (a sandboxed frame, a file:// page) or garbage
        if host is not None and normal in (f"http://{host.strip().lower()}", f"https://{host.strip().lower()}"):
            return True
        return "*" in self.cors_origins or normal in self.cors_origins

    def is_cross_origin(self, origin: str, host: str | None) -> bool:
        """An allowed origin that is not the server's own: its answers need CORS headers."""
        normal = normal_origin(origin)
        return normal is not None and normal not in (f"http://{(host or '').strip().lower()}",
                                                     f"https://{(host or '').strip().lower()}")


def normal_origin(origin: str) -> str | None:
    """`scheme://host[:port]`, lower-case, or None for `null` and anything that is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
