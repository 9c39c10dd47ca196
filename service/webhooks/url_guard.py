"""The URL guard: which receivers a webhook may point to, checked when the
webhook is made and again, with the name resolved anew, at every send."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from service import errors


class AddressNotAllowed(Exception):
    """The URL's host is, or resolves to, an address webhooks may not reach."""


def allowed_address(address: str) -> bool:
    """Public unicast only: no loopback, private, link-local (169.254/16,
    the cloud metadata service), shared (100.64/10), multicast, reserved or
    unspecified address, also when written as IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not ip.is_multicast


def check_url_shape(url: str, allow_private: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of a webhook URL, or InvalidRequest: an absolute
    https URL (http too when private addresses are allowed) without
    credentials or fragment; a literal IP must be public unless allowed."""

    def bad(message: str) -> errors.InvalidRequest:
        return errors.invalid("$.url", message, f"$.url: {message}")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(f"not a valid URL ({exc})") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise bad("must be an https URL")
    host = parts.hostname
    if not host:
        raise bad("must name a host")
    if parts.username is not None or parts.password is not None:
        raise bad("must not carry credentials")
    if parts.fragment:
        raise bad("must not have a fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not allow_private:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and not allowed_address(host):
            raise bad("must not point to a private, loopback or link-local address")
    return parts.scheme, host, port


async def resolve_allowed(host: str, port: int, allow_private: bool, within_seconds: float) -> str:
    """The address to connect to: `host` resolved now, every address it
    resolves to checked (a name with one private address among public ones
    is refused: DNS may hand out either). Raises AddressNotAllowed."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=within_seconds
        )
    except (OSError, TimeoutError) as exc:
        raise AddressNotAllowed(f"{host} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise AddressNotAllowed(f"{host} does not resolve")
    if not allow_private:
        for address in addresses:
            if not allowed_address(address):
                raise AddressNotAllowed(f"{host} resolves to {address}, which is not public")
    # IPv4 first where a name has both (localhost is ::1 first on many hosts,
    # while a development receiver often listens on 127.0.0.1 only).
    return next((a for a in addresses if ":" not in a), addresses[0])


async def check_url(url: str, allow_private: bool, within_seconds: float = 5.0) -> None:
    """The whole check at creation: the shape, then the name resolved and
    its addresses checked (the dispatcher checks again at each send)."""
    _scheme, host, port = check_url_shape(url, allow_private)
    try:
        await resolve_allowed(host, port, allow_private, within_seconds)
    except AddressNotAllowed as exc:
        raise errors.invalid("$.url", str(exc), f"$.url: {exc}") from None
