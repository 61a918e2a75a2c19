import socket

import pytest

import netguard


def test_guard_refuses_a_public_address_before_any_packet():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(netguard.NetworkBlocked, match="only loopback"):
            sock.connect(("8.8.8.8", 443))
    finally:
        sock.close()


def test_guard_refuses_name_resolution_of_a_remote_host():
    with pytest.raises(netguard.NetworkBlocked):
        socket.getaddrinfo("huggingface.co", 443)


def test_guard_allows_loopback():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect(server.getsockname())
    finally:
        client.close()
        server.close()
