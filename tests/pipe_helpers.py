"""Pipe helpers shared by the verifier tests (test_rewards.py, test_worker_protocol.py)."""

from __future__ import annotations

import fcntl
import struct
import termios


def unread(fd: int) -> int:
    """Bytes waiting in the pipe whose read end is ``fd``."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
