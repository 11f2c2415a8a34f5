"""`edge-ad listen`: the operator's side, printing alerts as they arrive on the broker.

Subscribes to `<root>/<device>/<camera>/alert` (wildcards allowed) and,
on request, to all-clears, status and heartbeats (all per camera); prints one readable line
per message, or the raw JSON with `--json`.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import time

from edge_ad.errors import EdgeAdError
from edge_ad.deliver.events import Topics
from edge_ad.deliver.link import Link
from edge_ad.deliver.mqtt import MqttSettings, make_client

log = logging.getLogger("edge_ad.listen")

EVENTS = ("alert", "clear", "verdict", "status", "heartbeat")


def topics_for(root: str, device: str, camera: str, events) -> list[str]:
    """The runtime's own topic names (events.Topics), with '+' wildcards allowed for device and camera."""
    topics = Topics(root, device, camera)
    return [topics.for_event(e) for e in events]


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_message(topic: str, payload: dict) -> str:
    """One readable line per event."""
    event = payload.get("event") or topic.rsplit("/", 1)[-1]
    when = payload.get("timestamp", "")
    where = f"{payload.get('device', '?')}/{payload.get('camera', '?')}"
    if event == "alert":
        regions = payload.get("regions") or []
        boxes = ", ".join(f"{r['w']}x{r['h']} at ({r['x']},{r['y']}) peak {r['peak']:.2f}" for r in regions[:3])
        more = f" (+{len(regions) - 3} more)" if len(regions) > 3 else ""
        model = payload.get("model") or {}
        thr = payload.get("threshold") or {}
        text = (f"{when} ALERT {where} frame {payload.get('frame_index')} score {payload.get('score', 0):.3f} "
                f"(raw {payload.get('raw_score', 0):.4g}, threshold {thr.get('raw', float('nan')):.4g}) "
                f"{len(regions)} region(s){': ' + boxes + more if regions else ''} "
                f"[{model.get('algorithm')}/{model.get('backbone')} {model.get('precision')} "
                f"{model.get('bundle_hash')}] id {payload.get('event_id')}")
        if payload.get("snapshot"):
            text += f" snapshot {payload['snapshot']}"
        return text
    if event == "verdict":
        score = payload.get("score")
        shown = f"score {score:.3f}" if isinstance(score, (int, float)) else f"({payload.get('error')})"
        return (f"{when} {payload.get('verdict')} {where} part {payload.get('part_id')} {shown}, "
                f"{payload.get('regions_total', 0)} region(s), {payload.get('latency_ms')} ms after the "
                f"{payload.get('trigger')} trigger, id {payload.get('event_id')}")
    if event == "clear":
        return f"{when} CLEAR {where} frame {payload.get('frame_index')} (ends alert {payload.get('clears')})"
    if event == "status":
        reason = f" ({payload['reason']})" if payload.get("reason") else ""
        return f"{when} STATUS {where} {payload.get('state')}{reason}"
    if event == "heartbeat":
        lat = payload.get("latency_ms") or {}
        return (f"{when} HEARTBEAT {where} {payload.get('fps', 0):.1f} fps, latency p50 {_ms(lat.get('p50'))} ms "
                f"p99 {_ms(lat.get('p99'))} ms, processed {payload.get('processed')}, dropped {payload.get('dropped')}, "
                f"alerts {payload.get('alerts')}")
    return f"{when} {event.upper()} {where} {json.dumps(payload)}"


def listen(settings: MqttSettings, root: str = "edge-ad", device: str = "+", camera: str = "+",
           events=("alert",), count: int | None = None, timeout: float | None = None, as_json: bool = False,
           out=None) -> int:
    """Print messages until `count` arrived or `timeout` passed; returns how many were printed."""
    out = out or sys.stdout
    inbox: queue.Queue = queue.Queue()
    subscriptions = [(topic, 1) for topic in topics_for(root, device, camera, events)]
    client = make_client(settings)
    client.on_message = lambda cl, userdata, message: inbox.put(message)
    # The same connection as `edge-ad run` (retries, back-off, reconnects); subscribe again on every connect.
    link = Link(client, settings, on_up=lambda: client.subscribe(subscriptions),
                on_down=lambda reason: log.warning("%s; reconnecting", reason))
    link.start()
    log.info("listening on %s at %s", ", ".join(t for t, _ in subscriptions), settings.address)
    received = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while count is None or received < count:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                message = inbox.get(timeout=wait if wait is not None else 1.0)
            except queue.Empty:
                continue
            text = message.payload.decode("utf-8", errors="replace")
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                log.warning("non-JSON message on %s: %.200s", message.topic, text)
                continue
            if as_json:
                out.write(json.dumps({"topic": message.topic, **payload}, separators=(",", ":")) + "\n")
            else:
                out.write(format_message(message.topic, payload) + "\n")
            out.flush()
            received += 1
    finally:
        link.close()
    if count is not None and received < count:
        raise EdgeAdError(f"timed out after {timeout:g} s: received {received} of {count} message(s)")
    return received
