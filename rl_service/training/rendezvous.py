"""The rendezvous store of every process group the service makes (learner ranks, weight broadcast).

torch's env:// rendezvous serves its TCPStore on every interface without authentication; ours
listens on the group's address only (loopback for a local job). Its own module because both the
learner engine and the weight broadcast group use it, and neither should import the other for it.
"""
from __future__ import annotations

import socket
from datetime import timedelta


def rendezvous_store(host: str, port: int, world_size: int, is_master: bool, timeout: timedelta):
    """A torch TCPStore whose server (on the master) listens on `host` only, not on all interfaces."""
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(max(128, world_size))
    # The store's server takes the descriptor over; the Python object must not close it.
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=listener.detach())
