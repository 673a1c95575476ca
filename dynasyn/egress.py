"""Outgoing HTTP to endpoints that a workflow or a page request names (both untrusted).

Checking the URL is not enough: a name can resolve to a metadata address (or re-resolve to one after the
check: DNS rebinding), a reply can redirect there, and a reply can be endless, compressed a thousandfold or
dripped a byte at a time. So the client made here resolves the host itself when it connects and connects to
the address it checked, follows no redirect, reads at most ``max_bytes`` of an uncompressed reply, and stops
at an overall deadline (httpx's timeouts are per read: a slow drip would never hit them). Environment
proxies are not used (the proxy, not this check, would pick the address).
"""

from __future__ import annotations

import ipaddress
import socket
import time

from .errors import DynASynError

# metadata services outside the link-local range (Alibaba Cloud; AWS over IPv6)
METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("100.100.100.200", "fd00:ec2::254")))
NAT64 = ipaddress.ip_network("64:ff9b::/96")
MAX_REPLY_BYTES = 4 << 20


class RefusedEgress(DynASynError):
    """The request would reach a forbidden address or its reply broke the limits; the message says which."""


def _embedded_ipv4(ip) -> list:
    """The IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64), which the network may reach."""
    if ip.version != 6:
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [a for a in found if a is not None]


def forbidden_address(ip) -> bool:
    """Link-local (cloud metadata), multicast, unspecified or reserved, directly or inside an IPv6 address.
    Loopback is allowed (``::1`` counts as reserved to ``ipaddress``; ``localhost`` resolves to it)."""
    if ip.is_loopback:
        return False
    return any(a.is_link_local or a.is_multicast or a.is_unspecified or a.is_reserved or a in METADATA_ADDRESSES
               for a in [ip, *_embedded_ipv4(ip)])


def checked_addresses(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to now; refused when any of them is forbidden."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        import httpcore2

        raise httpcore2.ConnectError(f"cannot resolve {host}: {e}") from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if any(forbidden_address(ipaddress.ip_address(a.split("%")[0])) for a in addresses):
        raise RefusedEgress(f"The endpoint host {host} resolves to a link-local / metadata / reserved address; "
                            "it is never called.")
    return addresses


def guarded_client(deadline: float, max_bytes: int = MAX_REPLY_BYTES):
    """An ``httpx2.Client`` (the openai client's) under the rules above; ``deadline`` is a ``time.monotonic()`` value."""
    import httpcore2
    import httpx2

    def left(timeout, expired):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise expired("the overall deadline passed")
        return remaining if timeout is None else min(timeout, remaining)

    class DeadlineStream(httpcore2.NetworkStream):
        def __init__(self, stream):
            self._stream = stream

        def read(self, max_bytes, timeout=None):
            return self._stream.read(max_bytes, left(timeout, httpcore2.ReadTimeout))

        def write(self, buffer, timeout=None):
            self._stream.write(buffer, left(timeout, httpcore2.WriteTimeout))

        def close(self):
            self._stream.close()

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                         left(timeout, httpcore2.ConnectTimeout)))

        def get_extra_info(self, info):
            return self._stream.get_extra_info(info)

    class CheckedBackend(httpcore2.SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            error = None
            for address in checked_addresses(host, port):  # connect to what was checked: no second lookup
                try:
                    return DeadlineStream(super().connect_tcp(address, port, left(timeout, httpcore2.ConnectTimeout),
                                                              local_address, socket_options))
                except httpcore2.ConnectError as e:
                    error = e
            raise error or httpcore2.ConnectError(f"{host} has no address")

        def connect_unix_socket(self, *args, **kwargs):
            raise RefusedEgress("Unix sockets are never called.")

    class CappedStream(httpx2.SyncByteStream):
        def __init__(self, stream):
            self._stream = stream

        def __iter__(self):
            read = 0
            for chunk in self._stream:
                read += len(chunk)
                if read > max_bytes:
                    raise RefusedEgress(f"The endpoint's reply is larger than {max_bytes >> 20} MiB; it is not read.")
                yield chunk

        def close(self):
            self._stream.close()

    class GuardedTransport(httpx2.HTTPTransport):
        def __init__(self):  # HTTPTransport's own pool would use the stock backend: only ours is made
            self._pool = httpcore2.ConnectionPool(ssl_context=httpx2.create_ssl_context(),
                                                  network_backend=CheckedBackend())

        def handle_request(self, request):
            request.headers["Accept-Encoding"] = "identity"  # a compressed reply could inflate past any cap
            response = super().handle_request(request)
            if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
                response.close()
                raise RefusedEgress("The endpoint sent a compressed reply although asked not to; it is not read.")
            return httpx2.Response(status_code=response.status_code, headers=response.headers,
                                   stream=CappedStream(response.stream), extensions=response.extensions)

    return httpx2.Client(transport=GuardedTransport(), follow_redirects=False, trust_env=False)


def refusal(error: BaseException) -> RefusedEgress | None:
    """The ``RefusedEgress`` behind an error (the openai client wraps what the transport raises), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RefusedEgress):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
