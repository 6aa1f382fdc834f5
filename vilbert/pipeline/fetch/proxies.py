"""Which forward proxy a request goes through: `--proxy URL`, else the environment's `HTTPS_PROXY` /
`HTTP_PROXY` (and their lower-case forms), for every host that `NO_PROXY` does not name.

The environment is read once, when the downloader starts, with the standard library's rules
(`urllib.request.getproxies_environment` / `proxy_bypass_environment`: lower case wins, `NO_PROXY` takes
host suffixes, `host:port` and `*`). A proxy URL is `http://[user:password@]host:port` (or `https://`);
anything else is a usage error naming where it came from.

Through a proxy the proxy resolves names, so the address policy cannot judge where a name leads: it
judges address literals (refused before anything is sent) and the socket to the proxy itself, which the
user chose and which is therefore allowed even on a private network (`docs/security.md`).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from yarl import URL

from vilbert.errors import UsageError

__all__ = ["ProxyChoice", "redact_proxy"]

_SCHEMES = ("http", "https")
_VALID = "valid: http://[user:password@]host:port (or https://)"


@dataclass(frozen=True)
class ProxyChoice:
    """The proxies of a run, and which one (if any) a URL goes through.

    Attributes:
        explicit: The `--proxy` URL, used for http and https alike; None: the environment's.
        by_scheme: The environment's proxy per URL scheme (`http`, `https`).
        no_proxy: The environment's `NO_PROXY` list, as given ('' when unset).
    """

    explicit: URL | None = None
    by_scheme: dict[str, URL] = field(default_factory=dict)
    no_proxy: str = ""

    @classmethod
    def from_environment(cls, proxy: str | None = None, environ: Mapping[str, str] | None = None) -> ProxyChoice:
        """`proxy` (the `--proxy` option) if given, else the proxy variables of `environ` (default `os.environ`).

        Raises:
            UsageError: A proxy URL that is not `http(s)://host[:port]`.
        """
        found = _environment_proxies(os.environ if environ is None else environ)
        explicit = _parse(proxy, "--proxy") if proxy else None
        by_scheme = {} if explicit else {s: _parse(found[s], f"{s.upper()}_PROXY") for s in _SCHEMES if found.get(s)}
        return cls(explicit, by_scheme, found.get("no", ""))

    def for_url(self, url: URL) -> URL | None:
        """The proxy `url` goes through, or None for a direct connection."""
        proxy = self.explicit or self.by_scheme.get(url.scheme)
        if proxy is None or not url.raw_host:
            return None
        if self.no_proxy and urllib.request.proxy_bypass_environment(_netloc(url), {"no": self.no_proxy}):
            return None
        return proxy

    def proxies(self) -> tuple[URL, ...]:
        """Every proxy a request of this run may go through."""
        return (self.explicit,) if self.explicit else tuple(dict.fromkeys(self.by_scheme.values()))


def redact_proxy(proxy: str | None) -> str | None:
    """`proxy` with any password replaced by `***`, for reports and logs."""
    if not proxy:
        return proxy
    try:
        url = URL(proxy)
    except (ValueError, TypeError):
        return "***"
    return str(url.with_password("***")) if url.password else proxy


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """`getproxies_environment`'s rules (lower case wins over upper case) on `environ`."""
    found: dict[str, str] = {}
    for upper_first in (True, False):  # the lower-case pass overwrites
        for name, value in environ.items():
            lower = name.lower()
            if value and lower.endswith("_proxy") and (name.isupper() if upper_first else name.islower()):
                found[lower[: -len("_proxy")]] = value
    return found


def _parse(text: str, origin: str) -> URL:
    try:
        url = URL(text if "://" in text else f"http://{text}")  # curl's habit: a bare host:port is http
        url.port  # noqa: B018 - raises ValueError for a bad port
    except (ValueError, TypeError) as err:
        raise UsageError(f"{origin}={redact_proxy(text)!r} is not a proxy URL ({err}); {_VALID}") from None
    if url.scheme not in _SCHEMES or not url.raw_host:
        raise UsageError(f"{origin}={redact_proxy(text)!r} is not a proxy URL; {_VALID}")
    return url


def _netloc(url: URL) -> str:
    return url.raw_host if url.explicit_port is None else f"{url.raw_host}:{url.explicit_port}"
