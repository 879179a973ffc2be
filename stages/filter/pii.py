"""Masking of e-mail and IP addresses, with counts."""

from __future__ import annotations

import ipaddress
import re

from stages.filter.config import Pii

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
                   r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# Candidates with at least four groups (fewer colons would catch times and Python slices), then validated.
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){3,7}(?::|[0-9A-Fa-f]{1,4})"
                  r"(?:(?::[0-9A-Fa-f]{1,4})+)?(?![\w:])"
                  r"|(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:)+:(?:[0-9A-Fa-f]{1,4}:)*[0-9A-Fa-f]{1,4}(?![\w:])")


def _valid_v6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return s.count(":") >= 3


def mask(cfg: Pii, text: str) -> tuple[str, int, int]:
    """(masked text, e-mail addresses masked, IP addresses masked)."""
    emails = ips = 0
    if cfg.email:
        text, emails = EMAIL.subn(cfg.email_replacement, text)
    if cfg.ip:
        text, ips = IPV4.subn(cfg.ip_replacement, text)
        count = 0

        def _v6(m: re.Match) -> str:
            nonlocal count
            if _valid_v6(m.group(0)):
                count += 1
                return cfg.ip_replacement
            return m.group(0)

        text = IPV6.sub(_v6, text)
        ips += count
    return text, emails, ips
