"""TLS for the inference service: its certificate files, checked before anything loads, and the
warning for plain HTTP beyond loopback."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprompt.errors import ConfigError


@dataclass(frozen=True)
class TLSFiles:
    """The service's certificate (chain) and private key in PEM files, as ``flower-superlink`` takes
    them; with ``ca_certfile`` clients must also present a certificate that CA signed (mutual TLS)."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path | None = None

    @classmethod
    def from_options(
        cls, certfile: Path | None, keyfile: Path | None, ca_certfile: Path | None
    ) -> TLSFiles | None:
        """The files of ``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certfile``, or None (plain
        HTTP); ValueError naming the option when one is missing, unreadable or not a valid pair."""
        if certfile is None and keyfile is None:
            if ca_certfile is not None:
                raise ConfigError("--ssl-ca-certfile needs --ssl-certfile and --ssl-keyfile too")
            return None
        if certfile is None or keyfile is None:
            raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for option, path in (
            ("--ssl-certfile", certfile),
            ("--ssl-keyfile", keyfile),
            ("--ssl-ca-certfile", ca_certfile),
        ):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{option} {path} is not a file")
        files = cls(Path(certfile), Path(keyfile), Path(ca_certfile) if ca_certfile else None)
        files.server_context()  # a wrong pair or a bad file fails now, with its reason
        return files

    def server_context(self) -> ssl.SSLContext:
        """The server's SSL context; ValueError when the files do not make one."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
            if self.ca_certfile is not None:
                context.load_verify_locations(self.ca_certfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"the TLS files do not load (--ssl-certfile {self.certfile}, --ssl-keyfile {self.keyfile}"
                + (f", --ssl-ca-certfile {self.ca_certfile}" if self.ca_certfile else "")
                + f"): {exc}"
            ) from None
        return context

    def uvicorn_options(self) -> dict[str, Any]:
        """The keyword arguments that make uvicorn serve HTTPS with these files."""
        options: dict[str, Any] = {"ssl_certfile": str(self.certfile), "ssl_keyfile": str(self.keyfile)}
        if self.ca_certfile is not None:
            options |= {"ssl_ca_certs": str(self.ca_certfile), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plain_http_warning(host: str, tls: TLSFiles | None) -> str | None:
    """What to tell an operator who serves plain HTTP beyond loopback (None when TLS is on or the
    address is loopback): tokens and data would cross the network in the clear."""
    if tls is not None or is_loopback(host):
        return None
    return (
        f"serving plain HTTP on {host}: bearer tokens, token ids and logits cross the network unencrypted. "
        "Give --ssl-certfile and --ssl-keyfile (and clients backbone.ca_file), or listen on 127.0.0.1 "
        "behind a TLS proxy"
    )
