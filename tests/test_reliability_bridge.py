"""Beyond one broker: the plant layout. edge-ad publishes to a mosquitto on its own PC, which bridges
`edge-ad/#` to the plant broker (QoS 1, persistent session, persistence on both). The bridge's link is cut
silently (no FIN, no RST) and the plant broker is killed -9 and restarted while alerts are raised; every
alert and all-clear edge-ad raised (its JSON-lines mirror) must reach a persistent QoS 1 subscriber on the
plant broker. The bridge config is benchmarks/broker.py bridge(), the one docs/PLANT.md shows.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest
from runtime_helpers import (  # noqa: F401  (fixtures)
    needs_mosquitto, Broker, Subscriber, TcpProxy, bundle_dir, jsonl, make_frame, start_cli, wait_until, write_video,
)

from benchmarks.broker import bridge

pytestmark = [pytest.mark.mosquitto, pytest.mark.usefixtures("needs_mosquitto")]
BOX = (64, 48, 64, 48)


def epoch(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


@pytest.fixture()
def video(tmp_path) -> Path:
    """60 s at 25 fps (the test stops edge-ad after its last phase: no fixed budget for slow machines); a
    10-frame defect every 40 frames: an alert and an all-clear every 1.6 s."""
    normal, defect = make_frame(), make_frame([BOX])  # shared arrays: little memory for a long video
    frames = [defect if i % 40 >= 30 else normal for i in range(1500)]
    return write_video(tmp_path / "line.avi", frames, fps=25)


def test_local_broker_bridged_to_plant_broker_survives_link_cut_and_plant_broker_kill(tmp_path, bundle_dir, video):
    plant = Broker(tmp_path / "plant", persistent=True)
    plant.start()
    link = TcpProxy(plant.port)  # the plant network between the PC's broker and the plant broker
    local = Broker(tmp_path / "local", persistent=True,
                   extra="allow_anonymous true\n" + bridge("plant", f"127.0.0.1:{link.port}",
                                                            remote_clientid="bridge-pc1", keepalive=5,
                                                            restart_timeout="1"))
    local.start()
    sub = Subscriber(plant.host, plant.port, "edge-ad/pc1/#", client_id="plant-scada")
    proc = start_cli("--video", video, "--realtime", "--model", bundle_dir, "--mqtt-host", local.host,
                     "--mqtt-port", local.port, "--device-id", "pc1", "--camera-id", "cam", "--alert-n", 3,
                     "--alert-m", 5, "--cooldown", "10f", "--heartbeat", 1, "--jsonl", tmp_path / "raised.jsonl",
                     "--outbox", tmp_path / "outbox.sqlite")
    raised_path = tmp_path / "raised.jsonl"
    try:
        sub.wait_for(lambda m: any(p.get("event") == "alert" for _, p in m), timeout=30,
                     what="the first alert at the plant broker")
        link.cut()  # silently: packets vanish; restore() then resets the dead connection (as TCP would)
        cut = time.time()
        time.sleep(4.0)
        link.restore()
        restored = time.time()
        seen = len(sub.event_ids())
        wait_until(lambda: len(sub.event_ids()) > seen, timeout=20, what="events flowing again after the cut")
        plant.kill()  # no goodbye, nothing saved beyond autosave
        killed = time.time()
        time.sleep(2.5)
        plant.start()
        back = time.time()
        # the last phase: events raised after the restart reach the plant (and enough of them in all), then stop
        def after_restart_at_plant() -> bool:
            events, arrived = jsonl(raised_path, "alert", "clear"), set(sub.event_ids())
            return len(events) >= 12 and any(epoch(e) > back and e["event_id"] in arrived for e in events)

        wait_until(after_restart_at_plant, timeout=40, what="an event raised after the plant restart at the plant")
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        raised = jsonl(raised_path, "alert", "clear")
        ids = [e["event_id"] for e in raised]
        wait_until(lambda: set(sub.event_ids()) >= set(ids), timeout=20, what="every raised event at the plant")
        received = set(sub.event_ids())
        in_order = sub.event_ids() == ids
        # The whole PC gone (its broker too, so no camera's last will can leave it): the plant broker publishes
        # the bridge's own will, retained, on $SYS/broker/connection/<remote_clientid>/state.
        bridge_state = Subscriber(plant.host, plant.port, "$SYS/broker/connection/bridge-pc1/state")
        bridge_state.wait_for(lambda m: m and m[-1][1] == 1, timeout=5, what="bridge state 1 (retained)")
        local.kill()
        bridge_state.wait_for(lambda m: m[-1][1] == 0, timeout=10, what="bridge state 0 after the PC's broker died")
        bridge_state.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        link.close()
        local.stop()
        plant.stop()
    during_cut = sum(cut <= epoch(e) <= restored for e in raised)
    during_kill = sum(killed <= epoch(e) <= back for e in raised)
    print(f"\nFIGURES bridge: raised {len(ids)}, at plant {len(received & set(ids))}, raised during the link cut "
          f"{during_cut}, while the plant broker was down {during_kill}, "
          f"arrival order {'= raised order' if in_order else 'differs from raised order'}")
    assert proc.returncode == 0, err
    assert len(raised) >= 12 and during_cut >= 1 and during_kill >= 1
    assert received == set(ids)  # every one, and nothing edge-ad did not raise
    # edge-ad never noticed: its own broker (the local one) stayed up, its outbox drained at once.
    beats = jsonl(raised_path, "heartbeat")
    assert all(b["state"] == "online" and b["broker_connected"] for b in beats) and beats[-1]["outbox_pending"] == 0
    log = (tmp_path / "local" / "mosquitto.log").read_text()
    assert log.count("Connecting bridge (step 1) plant") >= 3, log[-2000:]  # at start, after the cut and the kill
