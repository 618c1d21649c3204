"""Tools for testing dialogs: a virtual clock and a collecting channel."""

from dynaprompt.channels.base import ListChannel
from dynaprompt.clock import VirtualClock
from dynaprompt.testing.conformance import check_store

__all__ = ["ListChannel", "VirtualClock", "check_store"]
