"""Tools for testing dialogs: a virtual clock and a collecting channel."""

from dynaprompt.channels.base import ListChannel
from dynaprompt.clock import VirtualClock

__all__ = ["ListChannel", "VirtualClock"]
