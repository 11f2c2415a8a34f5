"""The latest verdict or alert in OPC UA variables, for PLCs and SCADA that read OPC UA rather than MQTT.

Optional (`pip install "edge-ad[opcua]"`, the asyncua package). The sink writes into variables that the
plant's OPC UA server already defines (the integrator creates them; edge-ad creates nothing there), with
string node ids `<prefix><name>` in the namespace `--opcua-namespace` (a URI or an index):

    state       String    alert / clear (alert mode), OK / NOK / ERROR (per-part verdicts)
    score       Double    normalized score of that event (NaN: the part was not inspected)
    part_id     String    the part's id ("" for alerts, which concern no single part)
    event_id    String    the event's id, as in the MQTT payload (a reader notices a new event by it)
    timestamp   DateTime  when the frame was taken
    alerts, clears, parts_ok, parts_nok, parts_error      events seen since start
    frames_processed, frames_anomalous                     from the heartbeats
    status      String    online / degraded / offline

A variable the server does not have, or whose type cannot hold the value, is skipped (logged once per
connection); each value is written with the variable's own data type (an Int32 counter gets an Int32).

OPC UA holds state, not a queue: only the latest values matter, so publish() only records them and a
thread of its own writes them (all changed values in one Write request). A dead, slow or restarting
server therefore never delays inspection or MQTT: the thread reconnects with edge-ad's back-off and
rewrites every value once it is back. Durable delivery stays MQTT's job (the outbox); this sink never
raises, so an absent server is not counted as an unstored alert. The password comes from a file,
$EDGE_AD_OPCUA_PASSWORD or the systemd credential `opcua-password`, as the MQTT password does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from edge_ad.backoff import Backoff
from edge_ad.deliver.mqtt import read_secret
from edge_ad.deliver.sinks import Sink
from edge_ad.errors import ConfigError

log = logging.getLogger("edge_ad.opcua")

PASSWORD_ENV = "EDGE_AD_OPCUA_PASSWORD"
CREDENTIAL_NAME = "opcua-password"  # systemd LoadCredential=opcua-password:/etc/edge-ad/opcua.pass
NODE_NAMES = ("state", "score", "part_id", "event_id", "timestamp", "alerts", "clears", "parts_ok", "parts_nok",
              "parts_error", "frames_processed", "frames_anomalous", "status")
EVENT_COUNTERS = ("alerts", "clears", "parts_ok", "parts_nok", "parts_error")  # counted here, from the events
VERDICT_COUNTERS = {"OK": "parts_ok", "NOK": "parts_nok", "ERROR": "parts_error"}
IDLE_CHECK_S = 2.0  # how often an idle connection is checked, so that `degraded` shows without a write


@dataclass(frozen=True)
class OpcUaSettings:
    url: str
    namespace: str = "urn:edge-ad"  # namespace URI, or its index as digits
    node_prefix: str = "edge-ad."
    username: str | None = None
    password_file: str | None = None
    timeout: float = 4.0  # seconds per request
    retry_delay: float = 1.0
    retry_max_delay: float = 30.0


def _import_asyncua():
    try:
        import asyncua
    except ImportError:
        raise ConfigError('--opcua-url needs the asyncua package: pip install "edge-ad[opcua]"') from None
    return asyncua


def _timestamp(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return None


class OpcUaSink(Sink):
    def __init__(self, settings: OpcUaSettings, on_health: Callable[[str | None], None] | None = None):
        """Starts the writer thread; connecting happens there, so an unreachable server does not stop start-up.

        on_health(reason) is called with a reason while the server is away, None once values are written again.
        """
        self._ua = _import_asyncua().ua
        library_log = logging.getLogger("asyncua")
        if library_log.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
            library_log.setLevel(logging.WARNING)  # its per-connection info lines would drown edge-ad's own
        self.settings = settings
        self.on_health = on_health or (lambda reason: None)
        self.backoff = Backoff(retries=0, initial=settings.retry_delay, maximum=settings.retry_max_delay)
        self.values: dict[str, Any] = dict.fromkeys(EVENT_COUNTERS, 0)
        self._dirty: set[str] = set(self.values)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.connected = False
        self.writes = 0  # Write requests that succeeded
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name="edge-ad-opcua", daemon=True)
        self._thread.start()

    # -- called by the pipeline (any thread): record, never block on the network ------------------------

    def publish(self, event: str, payload: dict) -> None:
        update: dict[str, Any] = {}
        if event in ("alert", "clear", "verdict"):
            score = payload.get("score")
            update = {"state": payload.get("verdict", event) if event == "verdict" else event,
                      "score": math.nan if score is None else float(score),
                      "part_id": str(payload.get("part_id") or ""), "event_id": str(payload.get("event_id") or ""),
                      "timestamp": _timestamp(payload.get("timestamp"))}
        elif event == "heartbeat":
            update = {"frames_processed": payload.get("processed"), "frames_anomalous": payload.get("anomalous")}
        elif event == "status":
            update = {"status": payload.get("state")}
        update = {name: value for name, value in update.items() if value is not None}
        with self._lock:
            counter = {"alert": "alerts", "clear": "clears"}.get(event) or (
                VERDICT_COUNTERS.get(str(payload.get("verdict"))) if event == "verdict" else None)
            if counter:
                update[counter] = self.values[counter] + 1
            self.values.update(update)
            self._dirty.update(update)
        if update:
            self._wake.set()

    def close(self) -> None:
        """Write what is pending (the final `offline` status) if the server is there, then disconnect."""
        self._stop.set()
        self._wake.set()
        self._thread.join(self.settings.timeout * 2 + 1)

    # -- the writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # never take inspection down with it
            log.error("OPC UA writer stopped: %s", exc)

    async def _main(self) -> None:
        asyncua = _import_asyncua()
        attempt = 0
        while True:
            client = asyncua.Client(self.settings.url, timeout=self.settings.timeout)
            try:
                if self.settings.username:  # re-read each time: fixing the file fixes a running service
                    client.set_user(self.settings.username)
                    password = read_secret(self.settings.password_file, env=PASSWORD_ENV,
                                           credential=CREDENTIAL_NAME, username=self.settings.username,
                                           option="--opcua-password-file")
                    if password is not None:
                        client.set_password(password)
                await client.connect()
                try:
                    nodes = await self._resolve(client)
                    with self._lock:
                        self._dirty = set(self.values)  # a restarted server lost what it had: write it all again
                    attempt = 0
                    await self._write_loop(client, nodes)
                    return  # stopped, pending values written
                finally:
                    await asyncio.wait_for(client.disconnect(), self.settings.timeout)
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect later
                if self.connected or attempt == 0:
                    reason = f"OPC UA server {self.settings.url} unavailable: {exc or type(exc).__name__}"
                    log.warning("%s; retrying with back-off", reason)
                    self.on_health(reason)
                if self.connected:
                    self.reconnects += 1
                self.connected = False
            if self._stop.is_set():
                return
            delay = self.backoff.delay(attempt)
            attempt += 1
            await asyncio.to_thread(self._stop.wait, delay)
            if self._stop.is_set():
                return

    async def _resolve(self, client) -> dict[str, tuple[Any, Any]]:
        """name -> (node, variant type) for the variables this server has."""
        ua = self._ua
        ns = self.settings.namespace
        index = int(ns) if ns.isdigit() else await client.get_namespace_index(ns)
        nodes, missing = {}, []
        for name in NODE_NAMES:
            node = client.get_node(ua.NodeId(f"{self.settings.node_prefix}{name}", index))
            try:
                nodes[name] = (node, await node.read_data_type_as_variant_type())
            except ua.UaStatusCodeError:
                missing.append(name)
        if not nodes:
            raise ConfigError(f"none of the variables {self.settings.node_prefix}<{'|'.join(NODE_NAMES)}> "
                              f"exists in namespace {ns!r}")
        if missing:
            log.warning("OPC UA server %s has no variable %s in namespace %s; not written", self.settings.url,
                        ", ".join(self.settings.node_prefix + name for name in missing), ns)
        return nodes

    def _encodable(self, pending: dict, nodes: dict, refused: set) -> dict:
        """Values that fit their variable's type; one that cannot (a String variable named `score`) is logged
        once and left out, so that it cannot block every other value."""
        from asyncua.ua.ua_binary import variant_to_binary

        kept = {}
        for name, value in pending.items():
            try:
                variant_to_binary(self._ua.Variant(value, nodes[name][1]))
                kept[name] = value
            except (self._ua.UaError, TypeError, ValueError, OverflowError) as exc:
                if name not in refused:
                    refused.add(name)
                    log.warning("OPC UA variable %s%s cannot hold %r: %s", self.settings.node_prefix, name, value, exc)
        return kept

    async def _write_loop(self, client, nodes: dict) -> None:
        ua = self._ua
        first, refused = True, set()
        while True:
            stopping = self._stop.is_set()
            self._wake.clear()  # before taking the values: a publish from now on wakes the next round
            with self._lock:
                pending = {name: self.values[name] for name in self._dirty if name in nodes}
                self._dirty.clear()
            try:
                pending = self._encodable(pending, nodes, refused)
                if pending:
                    targets = [nodes[name][0] for name in pending]
                    values = [ua.DataValue(ua.Variant(value, nodes[name][1])) for name, value in pending.items()]
                    results = await client.write_values(targets, values, raise_on_partial_error=False)
                    self.writes += 1
                    for name, result in zip(pending, results):
                        if not result.is_good() and name not in refused:  # e.g. a variable that is read-only
                            refused.add(name)
                            log.warning("OPC UA server %s refused %s%s: %s", self.settings.url,
                                        self.settings.node_prefix, name, result.name)
                else:  # idle: one small read, so that a dead server shows as `degraded` before the next event
                    await client.get_node(ua.ObjectIds.Server_ServerStatus_State).read_value()
            except BaseException:
                with self._lock:
                    self._dirty.update(pending)  # written again after the reconnect
                raise
            if first or not self.connected:
                first = False
                self.connected = True
                log.info("OPC UA server %s: writing %d variable(s)", self.settings.url, len(nodes))
                self.on_health(None)
            if stopping:
                return
            await asyncio.to_thread(self._wake.wait, IDLE_CHECK_S)
