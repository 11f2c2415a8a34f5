"""Model rollout through the `deploy` command: a real mosquitto, a real local HTTP server (http.server), real bundles.

A deploy during a real-time run swaps the model between two frames (none dropped, none reordered; thresholds
switch with the model); a corrupt download, a bundle failing its checksums and one that does not compile are
refused with the running model kept; a SIGKILL during a deploy leaves a bundle that loads at the next start;
the active bundle survives a restart."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import time
import zipfile

import numpy as np
import pytest
from command_helpers import EdgeAd, HttpServer, Operator, archive, shared_env
from runtime_helpers import bundle_dir, build_bundle, broker, make_frame, mosquitto, write_video  # noqa: F401

from edge_ad.model.bundle import read_bundle, write_bundle
from edge_ad.model.rollout import Rollout, RolloutError, fetch, unpack
from edge_ad.model.swap import SwappableDetector
from edge_ad.model.inference import compile_bundle
from edge_ad.sources.capture import Frame

pytestmark = pytest.mark.mosquitto
BOX = (64, 48, 64, 48)
CAMERA = "cam"
FRAMES = 1500  # 60 s in real time: longer than any test needs; the tests stop edge-ad themselves


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    normal, defect = make_frame(), make_frame([BOX])  # shared arrays: little memory for a long video
    frames = [defect if i % 30 < 4 else normal for i in range(FRAMES)]
    return write_video(tmp_path_factory.mktemp("rolloutvideo") / "line.avi", frames)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Archives of a second bundle (other input size and image threshold) behind a local HTTP server."""
    folder = tmp_path_factory.mktemp("served")
    new = build_bundle(folder / "src-new", size=32)
    bundle = read_bundle(new)
    bundle.thresholds.image = 0.2
    write_bundle(new, bundle)
    good, good_sha = archive(new, folder / "new.tar.gz")
    checksum = build_bundle(folder / "src-tampered")
    (checksum / "model.xml").write_text((checksum / "model.xml").read_text().replace("test-absdiff", "tampered"))
    tampered, tampered_sha = archive(checksum, folder / "tampered.tar.gz")
    broken = build_bundle(folder / "src-broken")  # checksums fine, IR broken: only compiling finds it
    (broken / "model.xml").write_text((broken / "model.xml").read_text().replace("</layers>", "<layer id=\"x\">"))
    write_bundle(broken, read_bundle(broken, verify=False))
    broken_arc, broken_sha = archive(broken, folder / "broken.tar.gz")
    big = build_bundle(folder / "src-big")  # 3 MB of padding: a download that takes a while when served slowly
    (big / "padding.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    big_arc, big_sha = archive(big, folder / "big.tar.gz")
    server = HttpServer(folder)
    yield {"url": server.url, "server": server, "new": (good.name, good_sha), "tampered": (tampered.name, tampered_sha),
           "broken": (broken_arc.name, broken_sha), "big": (big_arc.name, big_sha), "folder": folder}
    server.close()


def start(bundle, video, mosquitto, state, device, *extra):
    host, port = mosquitto
    return EdgeAd("--video", video, "--realtime", "--model", bundle, "--mqtt-host", host, "--mqtt-port", port,
                  "--device-id", device, "--camera-id", CAMERA, "--heartbeat", 0.5, "--cooldown", "5f", *extra,
                  env=shared_env(state))


def final_heartbeat(op: Operator) -> dict:
    return op.wait(lambda o: [h for h in o.heartbeats if h.get("final")], timeout=60, what="final heartbeat")[0]


def test_deploy_swaps_between_frames_none_dropped_and_survives_a_restart(bundle_dir, video, mosquitto, served,
                                                                         tmp_path):
    state = tmp_path / "state"
    op = Operator(*mosquitto, "roll1", CAMERA)
    try:
        # 4 requests in flight: a live source drops a frame only when inference falls 4 frames behind, so on a
        # busy test machine a drop means the swap stalled the frames, not that another job took the CPU
        edge = start(bundle_dir, video, mosquitto, state, "roll1", "--requests", 4)
        edge.wait_log("remote commands on")
        old_hash = op.wait(lambda o: o.status and o.status[-1]["model"]["bundle_hash"], what="status")
        beat = op.wait(lambda o: [h for h in o.heartbeats if h.get("processed", 0) > 40], what="40 frames")[-1]
        name, sha = served["new"]
        answer = op.send("deploy", {"url": f"{served['url']}/{name}", "sha256": sha}, timeout=60)
        assert answer["ok"], answer
        after_swap = op.wait(lambda o: [h for h in o.heartbeats if h["timestamp"] > answer["timestamp"]],
                             what="a heartbeat after the swap")[0]
        out = answer["outcome"]
        first = out["first_frame"]
        assert isinstance(first, int) and 40 < first < FRAMES
        new_hash = out["model"]["bundle_hash"]
        assert new_hash != old_hash
        assert set(out["timings"]) >= {"download_s", "stage_s", "compile_s", "switch_ms", "total_s"}
        # a few defects decided by the new model, then stop (the video is far longer: a slow deploy still fits)
        op.wait(lambda o: [a for a in o.alerts if a["frame_index"] >= first + 60], timeout=30, what="alerts after")
        assert edge.stop(60) == 0, edge.log[-3000:]
        summary = final_heartbeat(op)
        assert summary["errors"] == 0 and summary["processed"] > first, summary
        # no frame dropped from the last heartbeat before the deploy to the first one after its answer
        assert after_swap["dropped"] == beat["dropped"], (beat, after_swap)
        alerts = sorted(op.alerts, key=lambda a: a["frame_index"])
        before = [a for a in alerts if a["frame_index"] < first]
        after = [a for a in alerts if a["frame_index"] >= first]
        assert before and after
        assert {a["model"]["bundle_hash"] for a in before} == {old_hash}
        assert {a["model"]["bundle_hash"] for a in after} == {new_hash}
        assert {a["threshold"]["raw"] for a in before} == {0.15} and {a["threshold"]["raw"] for a in after} == {0.2}
        assert [s["model"]["bundle_hash"] for s in op.status if s["state"] == "online"][-1] == new_hash  # announced
        pointer = json.loads((state / "edge-ad" / f"active-bundle-roll1-{CAMERA}.json").read_text())
        assert pointer["sha256"] == sha and pointer["command_id"] == answer["id"]
        # the next start comes up with the deployed bundle, not --model
        again = start(bundle_dir, video, mosquitto, state, "roll1", "--max-frames", 5)
        assert again.proc.wait(60) == 0
        again._reader.join(5)
        assert "using the remotely deployed bundle " + pointer["path"] in again.log
        assert op.wait(lambda o: o.status[-1]["model"]["bundle_hash"] == new_hash or None, what="status")
    finally:
        op.close()


def test_failed_deploys_keep_the_running_model_and_say_why(bundle_dir, video, mosquitto, served, tmp_path):
    state = tmp_path / "state"
    op = Operator(*mosquitto, "roll2", CAMERA)
    edge = start(bundle_dir, video, mosquitto, state, "roll2")
    try:
        edge.wait_log("remote commands on")
        old_hash = op.wait(lambda o: o.status and o.status[-1]["model"]["bundle_hash"], what="status")
        url = served["url"]
        name, sha = served["new"]
        wrong = op.send("deploy", {"url": f"{url}/{name}", "sha256": "0" * 64})
        assert wrong["ok"] is False and "sha256 mismatch" in wrong["error"] and "still running" in wrong["error"]
        name, sha = served["tampered"]
        tampered = op.send("deploy", {"url": f"{url}/{name}", "sha256": sha})
        assert "bundle refused: checksum mismatch for" in tampered["error"] and "model.xml" in tampered["error"]
        name, sha = served["broken"]
        broken = op.send("deploy", {"url": f"{url}/{name}", "sha256": sha}, timeout=60)
        assert broken["ok"] is False and "cannot be used" in broken["error"], broken
        assert f"still running {old_hash}" in broken["error"]
        missing = op.send("deploy", {"url": f"{url}/nothing.tar.gz", "sha256": sha})
        assert "HTTP 404" in missing["error"]
        assert "needs the archive's sha256" in op.send("deploy", {"url": f"{url}/{name}"})["error"]
        assert op.send("deploy", {"url": "ftp://x/y"})["error"].startswith("deploy refused: deploy url must be")
        assert op.send("snapshot")["ok"]  # still inspecting, on the old model
        assert [s["model"]["bundle_hash"] for s in op.status] == [old_hash] * len(op.status)
        assert not (state / "edge-ad" / f"active-bundle-roll2-{CAMERA}.json").exists()
        store = state / "edge-ad" / "bundles" / f"roll2-{CAMERA}"
        assert list(store.iterdir()) == []  # nothing staged or kept from the refused bundles
    finally:
        op.close()
        assert edge.stop() == 0, edge.log[-3000:]


def test_sigkill_during_a_deploy_leaves_a_bundle_that_loads_at_the_next_start(bundle_dir, video, mosquitto, served,
                                                                              tmp_path):
    state = tmp_path / "state"
    store = state / "edge-ad" / "bundles" / f"roll3-{CAMERA}"
    pointer = state / "edge-ad" / f"active-bundle-roll3-{CAMERA}.json"
    op = Operator(*mosquitto, "roll3", CAMERA)
    server = served["server"]
    try:
        # 1. killed while downloading (a slow server): the old bundle stays active, the staging is cleaned
        edge = start(bundle_dir, video, mosquitto, state, "roll3")
        edge.wait_log("remote commands on")
        name, sha = served["big"]
        server.delay = 0.02
        slow = {"id": "slow", "command": "deploy", "args": {"url": f"{served['url']}/{name}", "sha256": sha}}
        op.publish(slow)  # each wait below sends its command again (same id) if the first one was lost
        op.wait(lambda o: edge.running() and store.is_dir() and any(p.name.startswith(".staging-") for p in store.iterdir()),
                what="staging", resend=(5.0, lambda: op.publish(slow)))
        time.sleep(0.3)
        edge.kill()
        server.delay = 0.0
        assert not pointer.exists()
        # 2. killed once the verified bundle is in the store, while it compiles: still the old one
        edge = start(bundle_dir, video, mosquitto, state, "roll3")
        edge.wait_log("remote commands on")
        assert not [p for p in store.iterdir() if p.name.startswith(".staging-")]  # cleaned at start
        name, sha = served["new"]
        stored = {"id": "stored", "command": "deploy", "args": {"url": f"{served['url']}/{name}", "sha256": sha}}
        op.publish(stored)
        op.wait(lambda o: edge.running() and [p for p in store.iterdir() if not p.name.startswith(".")], timeout=30,
                interval=0.002, what="the bundle in the store", resend=(5.0, lambda: op.publish(stored)))
        edge.kill()
        # usually killed while it compiles (no record); on a slow machine the kill may land after the swap and
        # the record: then it is whole and names a complete bundle, never one activated before it ran
        ran = "is the first one decided by the new model" in edge.log
        if pointer.exists():
            assert ran, "activated before the new model ran"
            read_bundle(json.loads(pointer.read_text())["path"])
        stored_record = pointer.exists()
        # 3. killed at the swap: as soon as the new model decided its first frame (the record is written next)
        edge = start(bundle_dir, video, mosquitto, state, "roll3")
        edge.wait_log("remote commands on")
        assert ("using the remotely deployed bundle" in edge.log) == stored_record
        swap = {"id": "swap", "command": "deploy", "args": {"url": f"{served['url']}/{name}", "sha256": sha}}
        op.publish(swap)
        op.wait(lambda o: edge.running() and "is the first one decided by the new model" in edge.log, timeout=60,
                interval=0.005, what="the new model's first frame", resend=(5.0, lambda: op.publish(swap)))
        edge.kill()
        record = json.loads(pointer.read_text()) if pointer.exists() else None  # whole, or not there
        print("killed at the swap; active-bundle record:", record)
        if record is not None:
            read_bundle(record["path"])
        # 4. the next start loads a complete bundle (the old one or the new one) and runs
        again = start(bundle_dir, video, mosquitto, state, "roll3", "--max-frames", 20)
        assert again.proc.wait(60) == 0, again.log[-3000:]
        again._reader.join(5)
        if record is not None:
            assert "using the remotely deployed bundle " + record["path"] in again.log
        else:
            assert "using the remotely deployed bundle" not in again.log
        assert "run summary: processed=20" in again.log
    finally:
        server.delay = 0.0
        op.close()


# -- units: archives, the pointer, the swap ----------------------------------------------------------------
def test_archives_that_would_leave_the_folder_or_exceed_the_cap_are_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(RolloutError, match="outside the bundle folder"):
        unpack(evil, tmp_path / "out1")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("bundle/model.xml")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(RolloutError, match="not a regular file"):
        unpack(link, tmp_path / "out2")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bundle/model.bin", b"\0" * (2 << 20))
    with pytest.raises(RolloutError, match="more than 1 MB"):
        unpack(bomb, tmp_path / "out3", max_bytes=1 << 20)
    (tmp_path / "big").write_bytes(b"x" * (2 << 20))
    with pytest.raises(RolloutError, match="exceeds the 1 MB cap"):
        fetch(str(tmp_path / "big"), tmp_path / "dl", max_bytes=1 << 20)
    (tmp_path / "text.txt").write_text("not an archive")
    with pytest.raises(RolloutError, match="neither a tar"):
        unpack(tmp_path / "text.txt", tmp_path / "out4")


def test_local_folder_and_zip_deploys_and_a_broken_pointer_falls_back_to_model(bundle_dir, tmp_path):
    rollout = Rollout(tmp_path / "state", "dev", "cam")
    staged = rollout.stage(str(bundle_dir), None)
    assert read_bundle(staged).files == read_bundle(bundle_dir).files
    configured = str(bundle_dir.resolve())
    rollout.activate(staged, configured, str(bundle_dir), None)
    zipped = tmp_path / "b.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in bundle_dir.iterdir():
            zf.write(path, path.name)  # bundle files at the top level
    import hashlib

    staged_zip = rollout.stage(f"file://{zipped}", hashlib.sha256(zipped.read_bytes()).hexdigest())
    rollout.activate(staged_zip, configured, "test", None)
    assert rollout.startup_model(str(bundle_dir)) == str(staged_zip.resolve())
    assert staged.exists()  # the previous active bundle is kept (one step back) ...
    third = rollout.stage(str(bundle_dir), None)
    rollout.activate(third, configured, "test", None)
    assert not staged.exists() and staged_zip.exists()  # ... the one before that is pruned
    rollout.activate(staged_zip, configured, "test", None)
    assert rollout.startup_model(str(tmp_path / "other-model")) == str(tmp_path / "other-model")  # --model changed
    (staged_zip / "model.bin").write_bytes(b"garbage")
    assert rollout.startup_model(str(bundle_dir)) == str(bundle_dir)  # the deployed one no longer verifies
    rollout.pointer.write_text("{not json")
    assert rollout.startup_model(str(bundle_dir)) == str(bundle_dir)


def test_swap_keeps_every_frame_in_order_across_two_input_sizes(bundle_dir, tmp_path):
    detector = SwappableDetector(bundle_dir, requests=2)
    other = build_bundle(tmp_path / "b32", size=32)
    built = compile_bundle(other)
    results, done = [], threading.Event()

    def consume():
        while len(results) < 60:
            results.append(detector.results.get(timeout=20))
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    boundary = None
    for index in range(60):
        frame = Frame(index=index, image=make_frame([BOX] if index % 7 == 0 else []), timestamp=index / 25)
        prepared = detector.try_prepare(frame)
        if index == 30:
            boundary = detector.swap(built, other, timeout=0)["first_frame_seq"]  # prepared for 64x64, started on 32x32
        assert detector.start(frame, prepared)
    assert done.wait(20)
    detector.drain()
    by_seq = sorted(results, key=lambda r: r.seq)
    assert [r.seq for r in by_seq] == list(range(60)) and [r.frame.index for r in by_seq] == list(range(60))
    assert boundary == 30 and all(r.error is None for r in by_seq)
    assert {r.anomaly_map.shape for r in by_seq[:30]} == {(64, 64)}
    assert {r.anomaly_map.shape for r in by_seq[30:]} == {(32, 32)}
    assert {r.model.generation for r in by_seq[:30]} == {0} and {r.model.generation for r in by_seq[30:]} == {1}
    assert all((r.score > 0.15) == (r.frame.index % 7 == 0) for r in by_seq)  # both models see the defects
    assert os.path.samefile(detector.current.folder, other)
