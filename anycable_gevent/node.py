"""The node: what happens on connect, on each command, on disconnect and on broadcast.

It knows the other parts only through their interfaces (controller, broker, pub/sub,
hub). Connection-scoped methods run in that connection's greenlet, one at a time, so a
connection's commands and replies keep their order (SPEC §2.4).

Presence (SPEC §4.8): a subscription whose channel state names a presence stream
(``$p``) may join and leave that stream's presence set, by command or by RPC result.
The broker keeps the set; the node publishes each join/leave event to the presence
stream as a transient ``presence`` broadcast, so every subscriber (the sender too) sees
it. A connection's presence outlives it by ``presence_ttl``: one ticker keeps connected
sessions' presence alive, and the broker expires the rest (leave events again).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import gevent
from gevent.event import Event

from anycable_gevent import protocol
from anycable_gevent.broker.base import Broker
from anycable_gevent.config import Config
from anycable_gevent.controllers.base import (
    CommandResult,
    Connection,
    Controller,
    Presence,
    Status,
)
from anycable_gevent.disconnector import DisconnectQueue
from anycable_gevent.errors import BrokerError, ProtocolError
from anycable_gevent.hub import Hub, StreamSub
from anycable_gevent.metrics import Metrics
from anycable_gevent.pinger import Pinger
from anycable_gevent.protocol import Command, HistoryRequest, PresenceEvent, RemoteCommand, StreamMessage
from anycable_gevent.pubsub.base import PubSub
from anycable_gevent.repair import Sequencer
from anycable_gevent.session import Session, Subscription
from anycable_gevent.ticker import every

log = logging.getLogger(__name__)

#: Seconds a history request waits for the pub/sub to confirm new stream subscriptions.
SUBSCRIBE_WAIT = 5.0


def _merge(state: dict[str, str], changes: dict[str, str] | None) -> bool:
    """Apply state changes (an empty string deletes the key). True when something changed."""
    if not changes:
        return False
    for key, value in changes.items():
        if value == "":
            state.pop(key, None)
        else:
            state[key] = value
    return True


class Node:
    def __init__(
        self,
        cfg: Config,
        controller: Controller,
        broker: Broker,
        hub: Hub,
        pubsub: PubSub,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.controller = controller
        self.broker = broker
        self.hub = hub
        self.metrics = metrics
        self.pubsub = pubsub
        #: in-order delivery and gap repair of what comes from another process (Redis)
        self.sequencer: Sequencer | None = Sequencer(hub, broker, pubsub, metrics) if pubsub.is_multi_node else None
        self.sessions: dict[Session, None] = {}
        self.by_identifiers: dict[str, dict[Session, None]] = {}
        self.pinger = Pinger(
            cfg.ping_interval,
            cfg.ping_timestamp_precision,
            cfg.pong_timeout,
            cfg.enable_native_pings,
            self._no_pong,
        )
        self.disconnector = DisconnectQueue(controller, cfg.disconnect_rate, cfg.disconnect_backlog_size)
        self.resumable = broker.supports_sessions and cfg.sessions_ttl > 0
        self._toucher: gevent.Greenlet | None = None
        #: sessions whose snapshot waits for the committer (one broker call for all of them)
        self._to_commit: dict[Session, None] = {}
        self._commit_wakeup = Event()
        self._committer: gevent.Greenlet | None = None
        #: Connected sessions that joined a presence set (their presence is kept alive).
        self.present: dict[Session, None] = {}
        self._presence_ticker: gevent.Greenlet | None = None
        broker.presence_handler = self._publish_presence
        metrics.gauge("clients_num", lambda: len(self.sessions))
        metrics.gauge("clients_uniq_num", lambda: len(self.by_identifiers))
        metrics.gauge("broadcast_streams_num", lambda: hub.streams_count)
        metrics.gauge("disconnect_queue_size", lambda: self.disconnector.size)
        metrics.external(
            lambda: {
                "server_msg_total": hub.frames_sent,
                "data_sent_total": hub.bytes_sent,
            }
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the node's own background work (the other parts are started by the graph)."""
        self.disconnector.start()
        if self.sequencer is not None:
            self.sequencer.start()
        if self.resumable:
            # one ticker for every connection (no timer per connection)
            self._toucher = every(max(self.cfg.sessions_ttl / 2.0, 0.5), self._touch_sessions, "session keepalive")
            self._committer = gevent.spawn(self._commit_loop)
        if self.broker.supports_presence:
            self._presence_ticker = every(
                max(self.cfg.presence_ttl / 2.0, 0.5), self._touch_presence, "presence keepalive"
            )

    @property
    def background(self) -> int:
        """Background greenlets: fan-out, Disconnect pacing, broker expiry, the keepalives."""
        tickers = sum(g is not None for g in (self._toucher, self._presence_ticker, self._committer))
        repair = self.sequencer.background if self.sequencer is not None else 0
        return 2 + (self.broker.supports_sessions or self.broker.supports_presence) + tickers + repair

    def _touch_sessions(self) -> None:
        self.broker.touch_sessions([s.sid for s in self.sessions if s.ext and s.authenticated])

    def _touch_presence(self) -> None:
        self.broker.touch_presence([s.sid for s in self.present])

    def shutdown(self, deadline: float, restorable: bool = False) -> None:
        """Close every client, flush Disconnect calls and snapshots.

        Clients get ``server_restart`` and 1001, or with ``restorable`` only the 1001
        close frame: the official JS client forgets its session after a ``disconnect``
        message, so only then does it restore its session (without any RPC call) where
        it reconnects.
        """
        notice = None if restorable else protocol.disconnect(protocol.SERVER_RESTART, True)
        for session in tuple(self.sessions):
            session.close(protocol.CLOSE_GOING_AWAY, "Server restart", notice)
        while self.sessions and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.disconnector.drain(deadline)
        self.pinger.shutdown()
        try:
            self._commit_pending()
        except BrokerError as exc:
            log.warning("session snapshots not committed at shutdown error=%s", exc)
        for loop in (self._toucher, self._committer):
            if loop is not None:
                loop.kill(block=False)
        if self._presence_ticker is not None:
            self._presence_ticker.kill(block=False)
        if self.sequencer is not None:
            self.sequencer.shutdown()

    # ------------------------------------------------------------------ connections
    def connection(self, session: Session, identifier: str | None = None) -> Connection:
        env = session.env
        if identifier is not None:
            sub = session.subscriptions.get(identifier)
            env.istate = dict(sub.istate) if sub is not None else {}
        else:
            env.istate = None
        return Connection(session.sid, env, session.identifiers, session.query)

    def open(self, session: Session) -> bool:
        """Authenticate a new connection (restore first). False = it was closed."""
        self.sessions[session] = None
        interval: float | None = None
        pi = session.query.get("pi")
        if pi is not None:
            try:
                interval = float(int(pi))
            except ValueError:
                log.warning("ignoring invalid ping interval pi=%r", pi)
        ptp = session.query.get("ptp")
        self.pinger.add(session, interval, ptp if ptp in ("s", "ms", "ns") else None)
        if session.ext and self.resumable:
            old = session.env.headers.get("x-anycable-restore-sid") or session.query.get("sid") or ""
            if old and self._restore(session, old):
                return True
        return self._authenticate(session)

    def _authenticate(self, session: Session) -> bool:
        result = self.controller.connect(self.connection(session))
        if session.closed:
            self.metrics.inc("rpc_canceled_total")
            return False
        if result.status == Status.SUCCESS:
            session.identifiers = result.identifiers
            _merge(session.env.cstate, result.cstate)
            session.note_interest(result.interest)
            session.expires_at = result.expires_at
            session.authenticated = True
            self.by_identifiers.setdefault(session.identifiers, {})[session] = None
            for text in result.transmissions:
                session.write_text(text)
            self._commit(session)
            return True
        if result.status == Status.FAILURE:
            self.metrics.inc("failed_auths_total")
            for text in result.transmissions:
                session.write_text(text)
            session.close(protocol.CLOSE_NORMAL, "Auth Failed")
            return False
        log.warning("authentication error conn=%s error=%s", session.ref, result.error)
        session.close(protocol.CLOSE_INTERNAL_ERROR, "Auth Error")
        return False

    def _restore(self, session: Session, old_sid: str) -> bool:
        try:
            raw = self.broker.take_session(old_sid)
        except BrokerError as exc:  # the store is unreachable: authenticate as if nothing was kept
            log.warning("session not restored conn=%s error=%s", session.ref, exc)
            return False
        if raw is None:
            return False
        try:
            snap: dict[str, Any] = json.loads(raw)
            exp = int(snap.get("exp") or 0)
        except (ValueError, TypeError):
            log.warning("unreadable session snapshot conn=%s", session.ref)
            return False
        if exp and exp < time.time():
            log.debug("not restoring a session whose token expired sid=%s", session.sid)
            return False
        session.identifiers = snap.get("ids") or ""
        session.env.cstate.update(snap.get("cstate") or {})
        session.interest = bool(snap.get("disconnectable"))
        session.expires_at = exp
        session.authenticated = True
        istates = snap.get("istate") or {}
        for identifier, streams in (snap.get("subs") or {}).items():
            sub = Subscription(identifier)
            sub.istate.update(istates.get(identifier) or {})
            for stream in streams:
                sub.streams[stream] = self._join(session, identifier, stream, held=True)
            session.subscriptions[identifier] = sub
        self.by_identifiers.setdefault(session.identifiers, {})[session] = None
        session.write_text(protocol.welcome(session.sid, True, list(session.subscriptions)))
        self._commit(session)
        if any(sub.streams for sub in session.subscriptions.values()):
            session.hold_timer = gevent.spawn_later(self.cfg.restore_hold, self._release_all, session)
        log.debug("session restored sid=%s from=%s…", session.sid, old_sid[:4])
        return True

    def _release_all(self, session: Session) -> None:
        session.hold_timer = None
        for sub in session.subscriptions.values():
            for ss in sub.streams.values():
                self.hub.release(ss)

    def close(self, session: Session) -> None:
        """The connection is over (called once, by its reader greenlet).

        The session leaves :attr:`sessions` last: :meth:`shutdown` waits for that, so the
        broker calls made here (which may yield, with a networked broker) are over before
        the broker and its Redis connections are shut down.
        """
        try:
            self._close(session)
        finally:
            self.sessions.pop(session, None)

    def _close(self, session: Session) -> None:
        session.finish()
        self.pinger.remove(session)
        peers = self.by_identifiers.get(session.identifiers)
        if peers is not None:
            peers.pop(session, None)
            if not peers:
                del self.by_identifiers[session.identifiers]
        for sub in session.subscriptions.values():
            for ss in sub.streams.values():
                self._leave(ss)
        if session in self.present:
            del self.present[session]
            # kept for presence_ttl from now, so that a quick reconnect causes no leave/join
            try:
                self.broker.release_presence((session.sid,))
            except BrokerError as exc:  # it expires by itself all the same
                log.warning("presence not released sid=%s error=%s", session.sid, exc)
        if not session.authenticated:
            return
        if session.ext and self.resumable:
            if session.dirty or session in self._to_commit:
                self.end_batch(session)  # its last state, with a fresh expiry
            else:
                try:
                    self.broker.touch_sessions((session.sid,))
                except BrokerError as exc:
                    log.warning("session snapshot not touched sid=%s error=%s", session.sid, exc)
        mode = self.cfg.disconnect_mode
        if mode == "always" or (mode == "auto" and session.interest):
            istates = {ident: dict(sub.istate) for ident, sub in session.subscriptions.items()}
            self.disconnector.push(self.connection(session), list(session.subscriptions), istates)

    def _no_pong(self, session: Session) -> None:
        self.metrics.inc("no_pong_disconnects_total")
        session.close(protocol.CLOSE_NORMAL, "No Pong", protocol.disconnect(protocol.NO_PONG, True))

    def _commit(self, session: Session) -> None:
        """The session's state changed: its snapshot is committed at the end of the batch.

        A client that sends many commands at once (a page subscribing to hundreds of
        channels) costs one snapshot per batch of frames, not one per command: the
        reader calls :meth:`end_batch` when it has no more buffered input.
        """
        if session.ext and self.resumable and session.authenticated:
            session.dirty = True

    def end_batch(self, session: Session) -> None:
        """Hand the session's snapshot to the committer (all of one loop turn in one call)."""
        session.dirty = False
        self._to_commit[session] = None
        self._commit_wakeup.set()

    def _commit_loop(self) -> None:
        while True:
            self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            try:
                self._commit_pending()
            except BrokerError as exc:
                log.warning("session snapshots not committed error=%s", exc)
            except Exception:
                log.exception("committing session snapshots failed")

    def _commit_pending(self) -> None:
        batch, self._to_commit = self._to_commit, {}
        if batch:
            self.broker.commit_sessions([(s.sid, s.dump()) for s in batch])

    def _join(self, session: Session, identifier: str, stream: str, held: bool = False) -> StreamSub:
        first = stream not in self.hub.streams
        ss = self.hub.join(session, identifier, stream, held)
        if first:
            self.pubsub.subscribe(stream)
            if self.sequencer is not None:
                self.sequencer.track(stream)
        return ss

    def _leave(self, ss: StreamSub) -> None:
        stream = ss.stream
        self.hub.leave(ss)
        if stream not in self.hub.streams:
            self.pubsub.unsubscribe(stream)
            if self.sequencer is not None:
                self.sequencer.untrack(stream)

    # ------------------------------------------------------------------ commands
    def handle_frame(self, session: Session, raw: str | bytes) -> None:
        """Decode and run one client frame. Bad frames are dropped and counted."""
        self.metrics.inc("client_msg_total")
        try:
            cmd = protocol.decode_command(raw)
        except ProtocolError as exc:
            self.metrics.inc("failed_client_msg_total")
            log.debug("dropping malformed frame sid=%s error=%s", session.sid, exc)
            return
        if cmd is None:
            return
        handler = self._commands.get(cmd.command)
        if handler is None:
            self.metrics.inc("failed_client_msg_total")
            log.debug("unknown command sid=%s command=%r", session.sid, cmd.command[:40])
            return
        handler(self, session, cmd)

    def _subscribe(self, session: Session, cmd: Command) -> None:
        identifier = cmd.identifier
        if not identifier or identifier in session.subscriptions:
            self.metrics.inc("failed_client_msg_total")
            log.debug("already subscribed sid=%s identifier=%s", session.sid, identifier)
            return
        limit = self.cfg.max_subscriptions
        if limit and len(session.subscriptions) >= limit:
            self.metrics.inc("subscriptions_refused_total")
            log.debug("subscription limit reached sid=%s limit=%d", session.sid, limit)
            session.write_text(protocol.reject(identifier))
            return
        if not protocol.encodable_identifier(identifier):
            self.metrics.inc("failed_client_msg_total")
            log.debug("identifier with an unpaired surrogate sid=%s", session.sid)
            session.write_text(protocol.reject(identifier))
            return
        result = self.controller.subscribe(self.connection(session, identifier), identifier)
        if session.closed:
            return
        session.note_interest(result.interest)
        if result.status == Status.ERROR:
            # the identifier is the client's (up to --max_message_size): bounded in the log
            log.warning("subscribe error conn=%s identifier=%s error=%s", session.ref, identifier[:200], result.error)
            return
        history = cmd.history if cmd.history is not None and not cmd.history.empty else None
        if result.status == Status.SUCCESS:
            sub = Subscription(identifier)
            session.subscriptions[identifier] = sub
            self._apply(session, sub, result, held=history is not None)
            self._commit(session)
            if history is not None and identifier in session.subscriptions:
                self._history(session, sub, history)
            if cmd.presence is not None and identifier in session.subscriptions:
                self._join_presence(session, sub, cmd.presence)
        else:
            self._apply(session, None, result)

    def _unsubscribe(self, session: Session, cmd: Command) -> None:
        sub = session.subscriptions.get(cmd.identifier)
        if sub is None:
            self.metrics.inc("failed_client_msg_total")
            return
        result = self.controller.unsubscribe(self.connection(session, cmd.identifier), cmd.identifier)
        session.note_interest(result.interest)
        if result.status == Status.ERROR:
            log.warning("unsubscribe error conn=%s error=%s", session.ref, result.error)
            return
        result.stop_streams = True
        stream = sub.istate.get(protocol.PRESENCE_STATE_KEY)
        self._apply(session, sub, result)
        session.subscriptions.pop(cmd.identifier, None)
        self._commit(session)
        if stream:
            # Unsubscribing leaves the presence set too (after the streams: the leaver is not told).
            self._presence_change(session, stream, protocol.PRESENCE_LEAVE)

    def _perform(self, session: Session, cmd: Command) -> None:
        sub = session.subscriptions.get(cmd.identifier)
        if sub is None or not isinstance(cmd.data, str):
            self.metrics.inc("failed_client_msg_total")
            return
        result = self.controller.perform(self.connection(session, cmd.identifier), cmd.identifier, cmd.data)
        session.note_interest(result.interest)
        if result.status == Status.ERROR:
            log.warning("perform error conn=%s error=%s", session.ref, result.error)
            return
        if self._apply(session, sub, result):
            self._commit(session)

    def _history_command(self, session: Session, cmd: Command) -> None:
        sub = session.subscriptions.get(cmd.identifier)
        if sub is None or cmd.history is None or cmd.history.empty:
            self.metrics.inc("failed_client_msg_total")
            log.debug("history request ignored sid=%s", session.sid)
            return
        self._history(session, sub, cmd.history)

    def _whisper(self, session: Session, cmd: Command) -> None:
        sub = session.subscriptions.get(cmd.identifier)
        stream = sub.istate.get(protocol.WHISPER_STATE_KEY) if sub is not None else None
        if not stream or not cmd.has_data:
            self.metrics.inc("failed_client_msg_total")
            return
        msg = StreamMessage(stream=stream, data=protocol.dumps(cmd.data), exclude_socket=session.sid, transient=True)
        try:
            self.broker.publish([msg])
        except BrokerError as exc:
            log.debug("whisper dropped sid=%s error=%s", session.sid, exc)

    def _join_command(self, session: Session, cmd: Command) -> None:
        sub = session.subscriptions.get(cmd.identifier)
        if sub is None or cmd.presence is None or not self._join_presence(session, sub, cmd.presence):
            self.metrics.inc("failed_client_msg_total")

    def _leave_command(self, session: Session, cmd: Command) -> None:
        sub = session.subscriptions.get(cmd.identifier)
        stream = sub.istate.get(protocol.PRESENCE_STATE_KEY) if sub is not None else None
        if not stream or not self._presence_change(session, stream, protocol.PRESENCE_LEAVE):
            self.metrics.inc("failed_client_msg_total")

    def _presence_command(self, session: Session, cmd: Command) -> None:
        """Who is present: ``{"type":"info","total":N,"records":[…]}``, or ``error``."""
        sub = session.subscriptions.get(cmd.identifier)
        stream = sub.istate.get(protocol.PRESENCE_STATE_KEY) if sub is not None else None
        if not stream:
            self.metrics.inc("failed_client_msg_total")
            log.debug("presence request ignored (no presence stream) sid=%s", session.sid)
            return
        # Go ignores these options (SPEC §13.2); honoured here as its docs describe them.
        data = cmd.data
        with_records = not (isinstance(data, dict) and data.get("return_records") is False)
        try:
            info = self.broker.presence_info(stream)
        except BrokerError as exc:
            log.debug("presence info failed sid=%s error=%s", session.sid, exc)
            session.write_text(protocol.presence_error(cmd.identifier))
            return
        session.write_text(protocol.presence_info(cmd.identifier, info, with_records))

    def _ping(self, session: Session, cmd: Command) -> None:
        session.write_text(protocol.PONG)

    def _pong(self, session: Session, cmd: Command) -> None:
        return None  # liveness only: the reader already noted the frame

    _commands: dict[str, Callable[[Node, Session, Command], None]] = {
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "message": _perform,
        "history": _history_command,
        "whisper": _whisper,
        "join": _join_command,
        "leave": _leave_command,
        "presence": _presence_command,
        "ping": _ping,
        "pong": _pong,
    }

    # ------------------------------------------------------------------ results
    def _apply(self, session: Session, sub: Subscription | None, result: CommandResult, held: bool = False) -> bool:
        """Apply a command result in SPEC §3.9 order. True when streams or state changed."""
        changed = False
        if sub is not None:
            if result.stop_streams:
                changed = bool(sub.streams)
                for ss in sub.streams.values():
                    self._leave(ss)
                sub.streams.clear()
            else:
                for stream in result.stopped_streams:
                    if stream in sub.streams:
                        self._leave(sub.streams.pop(stream))
                        changed = True
            limit = self.cfg.max_subscription_streams
            new: list[str] = []
            for stream in result.streams:
                if stream not in sub.streams:
                    if limit and len(sub.streams) >= limit:
                        self.metrics.inc("streams_refused_total")
                        log.warning(
                            "stream not started: subscription at --max_subscription_streams=%d conn=%s",
                            limit,
                            session.ref,
                        )
                        continue
                    sub.streams[stream] = self._join(session, sub.identifier, stream, held)
                    new.append(stream)
                    changed = True
            if new:
                # the client is told it is subscribed only once this worker gets the
                # stream's live messages (a no-op for a stream it already follows)
                self.pubsub.wait_subscribed(new, SUBSCRIBE_WAIT)
            changed = _merge(sub.istate, result.istate) or changed
        changed = _merge(session.env.cstate, result.cstate) or changed
        for text in result.transmissions:
            session.write_text(text)
        if result.presence is not None and sub is not None:
            self._rpc_presence(session, sub, result.presence)
        if result.disconnect:
            session.close(protocol.CLOSE_NORMAL, "Command Failed")
        return changed

    # ------------------------------------------------------------------ presence
    def _join_presence(self, session: Session, sub: Subscription, presence: dict[str, Any]) -> bool:
        """Join ``sub``'s presence stream as ``presence["id"]``. False = ignored."""
        stream = sub.istate.get(protocol.PRESENCE_STATE_KEY)
        pid = presence.get("id")
        if not stream or not isinstance(pid, str) or not pid:
            log.debug("presence join ignored sid=%s identifier=%s", session.sid, sub.identifier)
            return False
        return self._presence_change(session, stream, protocol.PRESENCE_JOIN, pid, presence.get("info"))

    def _rpc_presence(self, session: Session, sub: Subscription, presence: Presence) -> None:
        """SPEC §3.9 step 7: a join or leave asked for by the backend (``info`` already decoded)."""
        stream = sub.istate.get(protocol.PRESENCE_STATE_KEY)
        if not stream:
            log.debug("RPC presence ignored (no presence stream) sid=%s identifier=%s", session.sid, sub.identifier)
        elif presence.type == protocol.PRESENCE_JOIN and presence.id:
            self._presence_change(session, stream, protocol.PRESENCE_JOIN, presence.id, presence.info)
        elif presence.type == protocol.PRESENCE_LEAVE:
            self._presence_change(session, stream, protocol.PRESENCE_LEAVE)
        else:
            log.debug("RPC presence ignored sid=%s type=%r", session.sid, presence.type[:20])

    def _presence_change(self, session: Session, stream: str, kind: str, pid: str = "", info: Any = None) -> bool:
        """Join or leave ``stream``'s presence set; publish the event it causes. False = refused."""
        try:
            if kind == protocol.PRESENCE_JOIN:
                event = self.broker.presence_join(stream, session.sid, pid, info)
                self.present[session] = None
            else:
                event = self.broker.presence_leave(stream, session.sid)
        except BrokerError as exc:
            log.debug("presence %s refused sid=%s error=%s", kind, session.sid, exc)
            return False
        if event is not None:
            self._publish_presence(stream, event)
        return True

    def _publish_presence(self, stream: str, event: PresenceEvent) -> None:
        """Every subscriber of the presence stream gets ``{"type":"presence",…}`` (not stored)."""
        msg = StreamMessage(
            stream=stream,
            data=event.to_json(),
            transient=True,
            broadcast_type=protocol.PRESENCE_TYPE,
        )
        try:
            self.broker.publish([msg])
        except BrokerError as exc:
            log.warning("presence event not published stream=%s error=%s", stream[:100], exc)

    # ------------------------------------------------------------------ history
    def _history(self, session: Session, sub: Subscription, req: HistoryRequest) -> None:
        """Answer a history request: messages not yet delivered, then confirm (or reject).

        Live messages for the identifier's streams are held while the reply is built
        and merged after it, so nothing is sent twice and offsets stay in order.
        """
        identifier = sub.identifier
        subs = list(sub.streams.items())
        if not subs:
            session.write_text(protocol.confirm_history(identifier))
            return
        hub = self.hub
        for _, ss in subs:
            hub.hold(ss)
        # Read history only once live messages of these streams reach this worker:
        # a message published in between is then in the history or held live (or both,
        # deduplicated), never in neither.
        self.pubsub.wait_subscribed([stream for stream, _ in subs], SUBSCRIBE_WAIT)
        plans: list[tuple[StreamSub, list[StreamMessage], int]] = []
        try:
            for stream, ss in subs:
                position = req.streams.get(stream) if req.streams else None
                if position is not None:
                    msgs = self.broker.history_from(stream, position.epoch, position.offset)
                    plans.append((ss, msgs, position.offset))
                elif req.since > 0:
                    plans.append((ss, self.broker.history_since(stream, req.since), 0))
                else:
                    plans.append((ss, [], 0))
        except BrokerError as exc:  # HistoryError, or the store is unreachable
            log.debug("history rejected sid=%s reason=%s", session.sid, exc)
            session.write_text(protocol.reject_history(identifier))
            for _, ss in subs:
                hub.release(ss)
            return
        if session.closed:
            return
        limit = self.cfg.max_history_messages
        if limit and sum(len(msgs) for _, msgs, _ in plans) > limit:
            # all or nothing: the client gets history_not_found and goes on live
            self.metrics.inc("history_refused_total")
            log.info("history reply over --max_history_messages=%d conn=%s", limit, session.ref)
            session.write_text(protocol.reject_history(identifier))
            for _, ss in subs:
                hub.release(ss)
            return
        for ss, msgs, known in plans:
            self._send_history(session, ss, msgs, known)
        session.write_text(protocol.confirm_history(identifier))
        for ss, _, _ in plans:
            hub.release(ss, ss.pos or None)

    @staticmethod
    def _send_history(session: Session, ss: StreamSub, msgs: list[StreamMessage], known: int) -> None:
        """Send what this subscription has not had yet and advance its position."""
        lo, pos = ss.lo, ss.pos
        prefix = ss.group.prefix
        frame = protocol.ws_frame
        frames = [frame(prefix + m.tail()) for m in msgs if not (lo and lo <= m.offset <= pos)]  # not yet delivered
        if frames:
            session.write(b"".join(frames))  # one write for the whole reply
        if msgs:
            first, last = msgs[0].offset, msgs[-1].offset
            if not lo or first < lo:
                ss.lo = first
            if last > ss.pos:
                ss.pos = last
            if ss.group.epoch == "":
                ss.group.epoch = msgs[0].epoch
        if known > ss.pos:
            ss.pos = known

    # ------------------------------------------------------------------ broadcasts
    def handle_publication(self, publication: protocol.Publication) -> None:
        """A publication that only this node got (HTTP, redisx): the broker registers it
        once and publishes it to every node.

        Raises:
            BrokerError: not accepted (the broadcaster answers 503 or leaves it pending).
        """
        if isinstance(publication, RemoteCommand):
            self.pubsub.broadcast_command(publication)
            self.metrics.inc("remote_commands_total")
            return
        self.broker.publish(publication)
        self.metrics.inc("publications_total", len(publication))

    def handle_fanout(self, publication: protocol.Publication) -> None:
        """A publication that every node got (legacy Redis pub/sub): delivered to this
        node's clients only, without offsets (nothing registers it)."""
        if isinstance(publication, RemoteCommand):
            self.metrics.inc("remote_commands_total")
            self.handle_remote_command(publication)
            return
        for msg in publication:
            self.handle_pubsub(msg)

    def handle_pubsub(self, msg: StreamMessage) -> None:
        """A message arriving from pub/sub: fan it out (in offset order, gaps repaired)."""
        self.metrics.inc("broadcast_msg_total")
        if self.sequencer is not None:
            self.sequencer.accept(msg)
        else:
            self.hub.enqueue(msg)

    def handle_resubscribed(self, streams: Collection[str]) -> None:
        """The pub/sub connection was lost and is back: check these streams for gaps."""
        if self.sequencer is not None:
            self.sequencer.resync(streams)

    def handle_remote_command(self, cmd: RemoteCommand) -> None:
        if cmd.command != "disconnect":
            return
        for session in tuple(self.by_identifiers.get(cmd.identifier) or ()):
            session.close(
                protocol.CLOSE_NORMAL,
                "Closed remotely",
                protocol.disconnect(protocol.REMOTE, cmd.reconnect),
            )

    # ------------------------------------------------------------------ reads
    def note_activity(self, session: Session) -> None:
        session.awaiting_pong = 0.0
