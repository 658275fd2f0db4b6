"""Channels: the unit of real-time features (Action Cable's and serverless-js's ``Channel``).

A channel subclass implements the hooks it needs and one public method per action::

    class ChatChannel(Channel):
        def subscribed(self, handle, params):
            handle.stream_from(f"chat_{params['room']}")

        def speak(self, handle, params, data):   # client: channel.perform("speak", {...})
            ...

One instance serves every connection, from every thread of the WSGI server: keep
per-subscription data in ``handle.state`` and per-connection data in
``handle.connection.state``, never on ``self``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from anycable_gevent.application.handles import ChannelHandle

Action = Callable[[ChannelHandle, dict[str, Any], dict[str, Any]], None]


class Channel:
    """Base class of channels; every hook is optional."""

    def subscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        """A client subscribes: start streams, or ``handle.reject()``. Confirmed unless rejected."""

    def unsubscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        """The subscription ends (the client unsubscribed or disconnected); ``handle.state`` is its last state.

        Streams stop by themselves; transmissions are not delivered.
        """

    def find_action(self, name: str) -> Action | None:
        """The method for action ``name``: a public method defined by a subclass, or ``None``.

        Hooks, private names, attributes and the methods of :class:`Channel` itself are
        never actions, so a client cannot call them.
        """
        if not name.isidentifier() or name.startswith("_") or hasattr(Channel, name):
            return None
        # a function defined on the class, not any callable attribute (``self.clock = time.time``)
        if not inspect.isfunction(getattr(type(self), name, None)):
            return None
        return getattr(self, name)  # type: ignore[no-any-return]
