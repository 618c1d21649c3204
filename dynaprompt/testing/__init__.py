"""Tools for testing dialogs and stores: a virtual clock, a collecting channel, and ``check_store``, the
conformance suite every store must pass."""

from dynaprompt.channels.base import ListChannel
from dynaprompt.clock import VirtualClock
from dynaprompt.testing.conformance import check_store

__all__ = ["ListChannel", "VirtualClock", "check_store"]
