"""Which addresses the server really listens on, and a warning when that is beyond this
machine with no API key: anyone who can reach the port can then use the model."""

from __future__ import annotations

import ipaddress
import logging

logger = logging.getLogger("bento_llm")


def listening_addresses() -> list[str]:
    """The local addresses of this process's listening TCP sockets (BentoML's workers
    inherit the one it bound, so this is what `--host` or the service config chose)."""
    import psutil

    try:
        connections = psutil.Process().net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    return sorted({c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN and c.laddr})


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def warn_if_exposed(api_key_set: bool) -> None:
    exposed = [a for a in listening_addresses() if not is_loopback(a)]
    if exposed and not api_key_set:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this port can use the model. "
            "Set BENTO_LLM_API_KEY (or --arg api_key=...), or serve on 127.0.0.1 (the default).",
            ", ".join(exposed),
        )
