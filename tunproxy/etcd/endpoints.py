"""etcd endpoints as given on the command line (``--etcd-endpoints``), parsed once; pure."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..model import ConfigError

DEFAULT_PREFIX = "/coreos.com/network"  # flannel's --etcd-prefix


@dataclass(frozen=True)
class Endpoint:
    """One etcd endpoint: ``scheme`` http or https, ``host`` (IPv6 without brackets), ``port``."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        """True for https: the channel is TLS."""
        return self.scheme == "https"

    @property
    def url(self) -> str:
        """``scheme://host:port``, IPv6 in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def target(self) -> str:
        """The gRPC target."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoints(text: str, tls: bool = False) -> tuple[Endpoint, ...]:
    """``http://a:2379,https://b:2379``; a bare ``host:port`` is https if ``tls`` else http."""
    endpoints = []
    for part in str(text).replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        raw = part if "://" in part else f"{'https' if tls else 'http'}://{part}"
        try:
            url = urlsplit(raw)
            port = url.port or 2379
        except ValueError:
            raise ConfigError(f"etcd endpoint {part!r} is not a URL like http://192.0.2.100:2379") from None
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise ConfigError(f"etcd endpoint {part!r} is not a URL like http://192.0.2.100:2379")
        endpoints.append(Endpoint(url.scheme, url.hostname, port))
    if not endpoints:
        raise ConfigError("no etcd endpoints given (e.g. --etcd-endpoints http://192.0.2.100:2379)")
    return tuple(endpoints)
