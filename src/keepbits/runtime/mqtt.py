"""Payloads over MQTT: a sink that publishes each payload as one message, and a receiver that
subscribes and decodes (``--sink mqtt://HOST:PORT/TOPIC``, ``keepbits receive --mqtt URL``).

Needs ``paho-mqtt`` (``pip install 'keepbits[mqtt]'``). Addresses are
``mqtt://[USER:PASSWORD@]HOST[:PORT]/TOPIC[?OPTION=VALUE&...]`` (port 1883 by default); options:

* ``qos`` (0, 1, 2; default 1): MQTT delivery guarantee of each payload. With QoS 1 and 2
  messages published while the broker is away are kept (up to ``queue``) and sent on reconnect;
  QoS 0 messages are dropped while disconnected.
* ``queue`` (default 100): most messages the sink holds unsent or unacknowledged; beyond it a new
  payload is dropped and counted (``dropped``), so a stalled or slow broker never blocks the
  stream and memory stays bounded. The receiver holds at most ``queue`` undecoded messages and
  drops the oldest (counted), like a live source.
* ``keepalive`` (s, default 30), ``connect_timeout`` (s, default 5: the sink refuses to start
  when the broker does not answer within it), ``reconnect_min`` / ``reconnect_max`` (s, default
  0.5 / 8: the reconnect delay doubles from min to max), ``flush_timeout`` (s, default 5: how
  long closing the sink waits for pending messages), ``retain`` (0/1, default 0),
  ``client_id`` (default: a random one).

The broker does the fan-out; the topic of the receiver may hold wildcards (``cams/+/kbit``).
The message body is the payload itself (:mod:`keepbits.codec`: it carries the label, score,
sequence and timestamp), so any MQTT client can store or forward it.

Example:
    >>> from keepbits.runtime.mqtt import parse_address
    >>> a = parse_address("mqtt://broker:1884/cams/1?qos=0&queue=20")
    >>> a.host, a.port, a.topic, a.qos, a.queue
    ('broker', 1884, 'cams/1', 0, 20)
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable

from keepbits.codec import DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS_PER_BYTE, PayloadMeta
from keepbits.errors import DecodeError, InputError
from keepbits.runtime.net import MAX_PAYLOAD
from keepbits.runtime.queues import BoundedQueue, QueueClosed
from keepbits.runtime.receiver import PayloadWriter

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class MqttAddress:
    """A parsed ``mqtt://`` address (see the module docstring for the options)."""

    host: str
    port: int
    topic: str
    qos: int = 1
    queue: int = 100
    keepalive: int = 30
    connect_timeout: float = 5.0
    reconnect_min: float = 0.5
    reconnect_max: float = 8.0
    flush_timeout: float = 5.0
    retain: bool = False
    client_id: str = ""
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        """The address without the password."""
        user = f"{self.username}@" if self.username else ""
        return f"mqtt://{user}{self.host}:{self.port}/{self.topic}"


_OPTIONS = {"qos": int, "queue": int, "keepalive": int, "connect_timeout": float, "reconnect_min": float, "reconnect_max": float,
            "flush_timeout": float, "retain": lambda v: bool(int(v)), "client_id": str}


def parse_address(url: str) -> MqttAddress:
    """An :class:`MqttAddress` from ``mqtt://[USER:PASSWORD@]HOST[:PORT]/TOPIC[?OPTIONS]``;
    :class:`InputError` naming what is wrong. A ``#`` is MQTT's multi-level wildcard (``cams/#``),
    not a URL fragment."""
    parts = urllib.parse.urlsplit(url.replace("#", "%23"))
    if parts.scheme != "mqtt":
        raise InputError(f"{url!r}: expected mqtt://HOST[:PORT]/TOPIC (TLS, mqtts://, is not supported)")
    try:
        port = parts.port or 1883
    except ValueError:
        raise InputError(f"{url!r}: the port must be a number 1..65535") from None
    try:
        topic = urllib.parse.unquote(parts.path.lstrip("/"), errors="strict")
    except UnicodeDecodeError:
        raise InputError(f"{url!r}: the topic's %-escapes are not UTF-8") from None
    if not parts.hostname or not topic:
        raise InputError(f"{url!r}: expected mqtt://HOST[:PORT]/TOPIC with a host and a topic")
    if "\x00" in topic or len(topic.encode("utf-8")) > 0xFFFF:
        raise InputError(f"{url[:80]!r}…: an MQTT topic holds no NUL character and at most 65,535 bytes")
    options: dict[str, Any] = {}
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key not in _OPTIONS:
            raise InputError(f"{url!r}: unknown option {key!r} (known: {', '.join(_OPTIONS)})")
        try:
            options[key] = _OPTIONS[key](values[-1])
        except ValueError:
            raise InputError(f"{url!r}: option {key}={values[-1]!r} is not a valid value") from None
    address = MqttAddress(parts.hostname, port, topic, username=urllib.parse.unquote(parts.username) if parts.username else None,
                          password=urllib.parse.unquote(parts.password) if parts.password else None, **options)
    if address.qos not in (0, 1, 2):
        raise InputError(f"{url!r}: qos must be 0, 1 or 2, got {address.qos}")
    timeouts = (address.connect_timeout, address.reconnect_min, address.reconnect_max, address.flush_timeout)
    if address.queue < 1 or address.keepalive < 1 or not all(math.isfinite(t) and t > 0 for t in timeouts):
        raise InputError(f"{url!r}: queue and keepalive must be >= 1 and the timeouts positive and finite")
    if address.reconnect_max < address.reconnect_min:
        raise InputError(f"{url!r}: reconnect_max must be >= reconnect_min")
    return address


def sink_address(address: str | MqttAddress) -> MqttAddress:
    """``address`` parsed for publishing: :class:`InputError` for a wildcard topic."""
    address = parse_address(address) if isinstance(address, str) else address
    if set("+#") & set(address.topic):
        raise InputError(f"{address}: a sink publishes to one topic; '+' and '#' are wildcards for `keepbits receive`")
    return address


def subscription_address(address: str | MqttAddress) -> MqttAddress:
    """``address`` parsed for subscribing: :class:`InputError` for a topic filter MQTT refuses
    (``+`` and ``#`` each a whole level, ``#`` the last).

    Example:
        >>> from keepbits.runtime.mqtt import subscription_address
        >>> subscription_address("mqtt://broker/cams/+/kbit").topic
        'cams/+/kbit'
        >>> subscription_address("mqtt://broker/cams/#/x")
        Traceback (most recent call last):
        keepbits.errors.InputError: mqtt://broker:1883/cams/#/x: not a valid MQTT topic filter ('+' and '#' stand alone in a level, '#' only last)
    """
    address = parse_address(address) if isinstance(address, str) else address
    levels = address.topic.split("/")
    if any(("+" in level or "#" in level) and level not in ("+", "#") for level in levels) or "#" in levels[:-1]:
        raise InputError(f"{address}: not a valid MQTT topic filter ('+' and '#' stand alone in a level, '#' only last)")
    return address


def require_client() -> None:
    """Raise ``ModuleNotFoundError`` (``paho``) where paho-mqtt is not installed: checked before an
    output is created, so a run that cannot publish or subscribe leaves nothing behind."""
    import paho.mqtt.client  # noqa: F401


def _client(address: MqttAddress, on_connect: Any, on_disconnect: Any) -> Any:
    """A paho client with the address's credentials, keepalive and reconnect delays (not connected)."""
    from paho.mqtt import client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=address.client_id or f"keepbits-{uuid.uuid4().hex[:12]}",
                         protocol=mqtt.MQTTv311)
    if address.username:
        client.username_pw_set(address.username, address.password)
    client.reconnect_delay_set(address.reconnect_min, address.reconnect_max)
    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    return client


def _start(client: Any, address: MqttAddress, connected: threading.Event, state: dict[str, Any]) -> None:
    """Open the connection here, so that a refused or unreachable address says so at once, then
    hand it to paho's network thread (which reconnects from then on) and wait up to
    ``connect_timeout`` for the broker's acceptance; :class:`InputError` when either fails."""
    client.connect_timeout = address.connect_timeout
    try:
        client.connect(address.host, address.port, address.keepalive)
    except (OSError, ValueError) as exc:
        reason = f"no answer within {address.connect_timeout:g} s" if isinstance(exc, TimeoutError) else exc.strerror or exc
        raise InputError(f"{address}: cannot reach the MQTT broker ({reason})") from None
    client.loop_start()
    if not connected.wait(address.connect_timeout):
        client.loop_stop()
        reason = state.get("refused") or f"no answer within {address.connect_timeout:g} s"
        raise InputError(f"{address}: cannot reach the MQTT broker ({reason})")


class MqttSink:
    """Publish each payload to ``address`` (a URL or :class:`MqttAddress`) without ever blocking
    the stream: at most ``queue`` messages wait for the broker, newer ones are dropped and counted."""

    def __init__(self, address: str | MqttAddress):
        self.address = sink_address(address)
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # mid -> qos, published and not yet sent (QoS 0) or acknowledged
        self._early: set[int] = set()
        self._connected = threading.Event()
        self._state: dict[str, Any] = {}
        self.stats = {"kind": "mqtt", "address": str(self.address), "qos": self.address.qos, "published": 0, "delivered": 0,
                      "bytes": 0, "dropped": 0, "lost": 0, "connects": 0, "disconnects": 0}
        self.client = _client(self.address, self._on_connect, self._on_disconnect)
        self.client.on_publish = self._on_publish
        self.client.max_inflight_messages_set(min(20, self.address.queue))
        self.client.max_queued_messages_set(self.address.queue)
        _start(self.client, self.address, self._connected, self._state)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._state["refused"] = f"refused: {reason}"
            log.warning("%s: broker refused the connection (%s)", self.address, reason)
            return
        self.stats["connects"] += 1
        if self.stats["connects"] > 1:
            log.warning("%s: reconnected", self.address)
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        if self._state.get("closing"):
            return
        self.stats["disconnects"] += 1
        self._state["last_error"] = f"disconnected ({reason})"
        with self._lock:  # QoS 0 messages not yet written are gone; QoS 1/2 ones are resent on reconnect
            lost = [mid for mid, qos in self._pending.items() if qos == 0]
            for mid in lost:
                del self._pending[mid]
            self.stats["lost"] += len(lost)
        log.warning("%s: disconnected (%s); reconnecting", self.address, reason)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            if self._pending.pop(mid, None) is not None:
                self.stats["delivered"] += 1
            else:  # sent before send() recorded it
                self._early.add(mid)

    def send(self, payload: bytes) -> bool:
        """Hand one payload to the MQTT client; False when it was dropped (queue full, or QoS 0
        while disconnected). Never waits for the broker."""
        from paho.mqtt.client import MQTTErrorCode

        a = self.address
        with self._lock:
            full = len(self._pending) >= a.queue
        # publish outside our lock: paho calls on_publish holding its own lock, which publish takes too
        info = None if full else self.client.publish(a.topic, payload, qos=a.qos, retain=a.retain)
        with self._lock:
            if info is None or not (info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and a.qos > 0)):
                self.stats["dropped"] += 1
                self._state["last_error"] = f"dropped: {a.queue} messages waiting" if info is None else f"dropped: {info.rc.name}"
                return False
            self.stats["published"] += 1
            self.stats["bytes"] += len(payload)
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.stats["delivered"] += 1
            else:
                self._pending[info.mid] = a.qos
        return True

    def write(self, frame: Any, result: Any, record: dict[str, Any]) -> None:
        if result.payload is not None:
            self.send(result.payload)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> dict[str, Any]:
        """Wait up to ``flush_timeout`` for pending messages, disconnect; returns the counters:
        ``pending_at_close`` (messages the broker never acknowledged) and, for the run's status
        (:data:`keepbits.runtime.stream.STATUSES`), ``undelivered`` = ``unsent`` (dropped + lost)
        + ``unconfirmed`` (pending at close), with ``last_error``."""
        deadline = time.monotonic() + self.address.flush_timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._state["closing"] = True
        self.client.disconnect()
        self.client.loop_stop()
        pending = self.pending()
        unsent = self.stats["dropped"] + self.stats["lost"]
        return {**self.stats, "pending_at_close": pending, "unsent": unsent, "unconfirmed": pending,
                "undelivered": unsent + pending, "last_error": self._state.get("last_error")}


#: Longest topic part of a received frame's file name (file names end at 255 bytes).
MAX_TOPIC_STEM = 120


def _topic_stem(topic: str) -> str:
    """``topic`` as a file-name part: runs of other characters than ``A-Za-z0-9.-`` as ``_``; a
    longer result is cut and given 8 hex digits of the topic's sha256, so topics stay apart.

    Example:
        >>> from keepbits.runtime.mqtt import _topic_stem
        >>> _topic_stem("cams/1/kbit"), len(_topic_stem("c/" * 500))
        ('cams_1_kbit', 129)
    """
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", topic)
    if len(stem) <= MAX_TOPIC_STEM:
        return stem
    return f"{stem[:MAX_TOPIC_STEM]}~{hashlib.sha256(topic.encode('utf-8')).hexdigest()[:8]}"


def _file_names() -> Callable[[str], Callable[[PayloadMeta], str]]:
    """Names of received frames: ``<topic>-<session>-<sequence>`` (topic with ``/`` as ``_``); a
    sequence number not above the last one of its topic starts the next session, so a restarted
    sender never overwrites earlier frames."""
    last: dict[str, tuple[int, int]] = {}

    def for_topic(topic: str) -> Callable[[PayloadMeta], str]:
        def name(meta: PayloadMeta) -> str:
            session, previous = last.get(topic, (0, -1))
            session += meta.sequence <= previous
            last[topic] = (session, meta.sequence)
            return f"{_topic_stem(topic)}-{session}-{meta.sequence:08d}"

        return name

    return for_topic


def receive_mqtt(
    address: str | MqttAddress,
    out: str | Path,
    *,
    max_frames: int | None = None,
    idle_timeout: float = 30.0,
    video: str | Path | None = None,
    fps: float = 25.0,
    images: bool = True,
    masks: bool = True,
    max_payload: int = MAX_PAYLOAD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_pixels_per_byte: int | None = DEFAULT_MAX_PIXELS_PER_BYTE,
    writer: PayloadWriter | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Subscribe to ``address``'s topic (re-subscribing after every reconnect) and decode each
    message into ``out`` with a :class:`PayloadWriter` (or ``writer``); returns counters.

    Frames are named ``<topic>-<session>-<sequence>`` (:func:`_file_names`), ``frames.jsonl`` is
    appended to (each line with its ``topic``). Messages wait in a queue of ``queue`` (the
    address option) between paho's network thread and the decoder; when the decoder falls behind
    the oldest are dropped and counted. Returns after ``max_frames``, after ``idle_timeout`` s
    without a message, or when ``stop`` is set; ``ready`` is set once subscribed. Bad payloads
    and those over ``max_payload`` bytes are counted and skipped; ``max_pixels`` and
    ``max_pixels_per_byte`` bound :func:`keepbits.codec.decode`.
    """
    address = subscription_address(address)
    require_client()
    if not (isinstance(idle_timeout, (int, float)) and math.isfinite(idle_timeout) and idle_timeout > 0):
        raise InputError(f"idle_timeout must be a positive number, got {idle_timeout!r}")
    if not (isinstance(max_payload, int) and max_payload >= 1):
        raise InputError(f"max_payload must be an int >= 1, got {max_payload!r}")
    stop = stop or threading.Event()
    queue = BoundedQueue(address.queue, "drop_oldest")
    connected = threading.Event()
    state: dict[str, Any] = {}
    stats = {"address": str(address), "frames": 0, "bytes": 0, "bad_payloads": 0, "write_errors": 0, "oversize": 0, "dropped": 0,
             "connects": 0, "disconnects": 0}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            state["refused"] = f"refused: {reason}"
            return
        stats["connects"] += 1
        client.subscribe(address.topic, qos=address.qos)

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            state["refused"] = f"subscription to {address.topic!r} refused: {reasons}"
            return
        connected.set()

    def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not state.get("closing"):
            stats["disconnects"] += 1
            log.warning("%s: disconnected (%s); reconnecting", address, reason)

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        try:
            queue.put((message.topic, message.payload))
        except QueueClosed:
            pass

    own_writer = writer is None
    writer = writer or PayloadWriter(out, video=video, fps=fps, images=images, masks=masks, append=True, what="receive --out",
                                     max_pixels=max_pixels, max_pixels_per_byte=max_pixels_per_byte)
    client = _client(address, on_connect, on_disconnect)
    client.on_subscribe, client.on_message = on_subscribe, on_message
    names = _file_names()
    try:
        _start(client, address, connected, state)
        if ready is not None:
            ready.set()
        idle_since = time.monotonic()
        while not stop.is_set() and (max_frames is None or stats["frames"] < max_frames):
            try:
                topic, payload = queue.get(timeout=0.2)
            except TimeoutError:
                if time.monotonic() - idle_since > idle_timeout:
                    break
                continue
            idle_since = time.monotonic()
            stats["bytes"] += len(payload)
            if len(payload) > max_payload:
                stats["oversize"] += 1
                log.warning("%s: message of %d bytes on %s exceeds max_payload=%d; skipped", address, len(payload), topic, max_payload)
                continue
            try:
                writer.write(payload, names(topic), topic=topic)
                stats["frames"] += 1
            except DecodeError as exc:
                stats["bad_payloads"] += 1
                log.warning("%s: bad payload on %s skipped (%s)", address, topic, exc)
            except (OSError, InputError) as exc:  # a disk or video writer that fails loses this frame, not the receiver
                stats["write_errors"] += 1
                log.warning("%s: a frame received on %s could not be written (%s)", address, topic, exc)
    finally:
        state["closing"] = True
        queue.close()
        client.disconnect()
        client.loop_stop()
        if own_writer:
            writer.close()
    stats["dropped"] = queue.dropped
    return stats


__all__ = ["MqttAddress", "MqttSink", "parse_address", "receive_mqtt"]
