"""Fast units of the remote-command control and rollout (no broker, no video): the failure paths the review found.

Compile failures answered in one line with nothing left in the store, a deploy whose record cannot be written
answered as running, thresholds commanded while an earlier change waits for its frame, teach-in pixel samples
without the crop filler, per-camera changes refused on a bundle other cameras share, commands queued at shutdown,
credentials redacted, symlinks and collisions in staging, the tar filter fallback, one write_atomic."""

from __future__ import annotations

import json
import logging
import hashlib
import shutil
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from command_helpers import archive
from runtime_helpers import build_bundle, bundle_dir  # noqa: F401  (fixture)

from edge_ad import atomic
from edge_ad.decide.scoring import Scorer
from edge_ad.deliver.events import Topics, model_identity
from edge_ad.errors import InferenceError
from edge_ad.model import rollout as rollout_mod
from edge_ad.model.bundle import read_bundle
from edge_ad.model.preprocess import PreprocessSpec, frame_aligned_map
from edge_ad.model.rollout import Rollout, RolloutError, redact, unpack
from edge_ad.model.swap import SwappableDetector
from edge_ad.ops import commands, control
from edge_ad.ops.commands import CommandError, CommandService, Record


def make_control(bundle: Path, tmp_path: Path, **kw) -> control.RuntimeControl:
    detector = SwappableDetector(bundle, requests=1)
    meta = read_bundle(bundle)
    return control.RuntimeControl(detector, Scorer(meta.thresholds), model_identity(meta),
                                  Topics("edge-ad", "dev", "cam"), Rollout(tmp_path / "state", "dev", "cam"),
                                  lambda t, d: None, str(bundle), 0.5, 0.5, tmp_path / "state", **kw)


def stored(rollout: Rollout) -> list[str]:
    return sorted(p.name for p in rollout.store.iterdir()) if rollout.store.is_dir() else []


def test_a_compile_failure_is_one_line_with_still_running_and_nothing_stays_in_the_store(bundle_dir, tmp_path,
                                                                                      monkeypatch):
    ctl = make_control(bundle_dir, tmp_path)

    def refuse(*a, **k):
        raise InferenceError("the GPU device is not available\nlong OpenVINO text")

    monkeypatch.setattr("edge_ad.model.inference.compile_bundle", refuse)
    with pytest.raises(CommandError) as caught:
        ctl.deploy({"url": str(bundle_dir)}, "d1")
    message = str(caught.value)
    assert "cannot be used: the GPU device is not available; still running" in message and "\n" not in message
    assert stored(ctl.rollout) == []  # the staged copy is removed
    with pytest.raises(CommandError, match="still running"):
        ctl.reload({}, "r1")


def test_a_deploy_whose_record_cannot_be_written_says_it_runs(bundle_dir, tmp_path, monkeypatch):
    ctl = make_control(bundle_dir, tmp_path)
    monkeypatch.setattr(control, "SWITCH_WAIT", 0.05)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ctl.rollout, "activate", full)
    outcome = ctl.deploy({"url": str(bundle_dir)}, "d2")
    assert outcome["warning"].startswith("running, but not recorded as active: No space left on device")
    assert outcome["active_record"] is None
    assert ctl.detector.current.generation == 1 and len(stored(ctl.rollout)) == 1  # swapped, bundle kept


def test_an_omitted_threshold_keeps_the_last_commanded_one_not_the_applied_one(bundle_dir, tmp_path, monkeypatch):
    ctl = make_control(bundle_dir, tmp_path)
    monkeypatch.setattr(control, "APPLY_WAIT", 0.01)  # no frames: each change waits for one
    assert ctl.set_thresholds({"image": 0.9}, "t1")["applied_at_frame"] is None
    second = ctl.set_thresholds({"pixel": 0.7}, "t2")
    assert (second["image_threshold"], second["pixel_threshold"]) == (0.9, 0.7)
    record = json.loads(ctl.overrides.read_text())
    assert (record["image_threshold"], record["pixel_threshold"]) == (0.9, 0.7)
    again = make_control(bundle_dir, tmp_path)  # a restart starts from the persisted desired ones
    assert again.desired == (0.9, 0.7) == (again.image_threshold, again.pixel_threshold)
    ctl.set_thresholds({"reset": True}, "t3")
    assert ctl.desired == (0.5, 0.5) and not ctl.overrides.exists()


def test_teach_in_pixels_leave_out_the_crop_filler():
    spec = PreprocessSpec.square(64, "crop")
    model_map = np.random.default_rng(1).random((64, 64), dtype=np.float32) + 1.0
    aligned = frame_aligned_map(model_map, 96, 128, spec)  # 4:3 frame into a square crop: sides unseen
    assert aligned.size > model_map.size and aligned.min() == model_map.min()
    np.testing.assert_array_equal(control._model_region(aligned, (96, 128), spec), model_map)
    letterbox = PreprocessSpec.square(64, "letterbox")
    bars_cut = frame_aligned_map(model_map, 96, 128, letterbox)
    assert control._model_region(bars_cut, (96, 128), letterbox) is bars_cut  # already only the image


def test_teach_and_revert_are_refused_on_a_bundle_other_cameras_share(bundle_dir, tmp_path):
    ctl = make_control(bundle_dir, tmp_path)
    ctl.detector.sharing = lambda folder: ["cam2"]
    for args in ({"frames": 10, "min_frames": 10}, {"revert": True}):
        with pytest.raises(CommandError, match=r"also used by camera\(s\) cam2 of this process"):
            ctl.teach(args, "x")
    from edge_ad.multicamera import SharedModels

    models = SharedModels(core=object())
    other = tmp_path / "other"
    models.detectors = {name: SimpleNamespace(current=SimpleNamespace(folder=folder))
                        for name, folder in (("a", bundle_dir), ("b", bundle_dir), ("c", other))}
    assert models.sharing(bundle_dir, "a") == ["b"] and models.sharing(other, "c") == []


def test_commands_queued_at_shutdown_are_answered_interrupted_and_close_stops_the_worker():
    release, ran, answers = threading.Event(), [], []

    def slow(args, ident):
        ran.append(ident)
        release.wait(10)
        return {}

    service = CommandService({"slow": slow}, answers.append, "dev", "cam", Record(None))
    service.on_message(b'{"id": "c0", "command": "slow"}')
    deadline = time.monotonic() + 5
    while not ran and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, commands.QUEUE_SIZE + 1):  # one running, a full queue behind it
        service.on_message(json.dumps({"id": f"c{i}", "command": "slow"}).encode())
    assert not [a for a in answers if "busy" in (a.get("error") or "")]
    closer = threading.Thread(target=service.close, kwargs={"timeout": 5})
    closer.start()
    time.sleep(0.1)
    release.set()
    closer.join(10)
    assert not service._worker.is_alive()
    assert ran == ["c0"]
    interrupted = [a for a in answers if a.get("error") == "interrupted: shutting down"]
    assert len(interrupted) == commands.QUEUE_SIZE


def test_credentials_in_a_deploy_url_are_redacted_in_log_and_record(bundle_dir, tmp_path, caplog):
    assert redact("https://user:secret@host:8443/b.tar.gz") == "https://***@host:8443/b.tar.gz"
    assert redact("https://token@host/b.tar.gz") == "https://***@host/b.tar.gz"
    assert redact("/srv/bundles/b.tar.gz") == "/srv/bundles/b.tar.gz"
    rollout = Rollout(tmp_path / "state", "dev", "cam")
    rollout.activate(rollout.stage(str(bundle_dir), None), str(bundle_dir), "https://u:pw@h/x.tar.gz", None)
    assert "pw" not in rollout.pointer.read_text() and "https://***@h/x.tar.gz" in rollout.pointer.read_text()
    service = CommandService({"deploy": lambda a, i: {}}, lambda a: None, "dev", "cam", Record(None))
    with caplog.at_level(logging.INFO, "edge_ad.commands"):
        service._run(commands.Command("x", "deploy", {"url": "https://u:pw@h/x.tar.gz"}))
    service.close()
    assert "***@h" in caplog.text and "pw" not in caplog.text


def test_staging_refuses_symlinks_survives_a_repeat_and_wraps_errors(bundle_dir, tmp_path, monkeypatch):
    rollout = Rollout(tmp_path / "state", "dev", "cam")
    linked = tmp_path / "linked"
    shutil.copytree(bundle_dir, linked)
    (linked / "extra").symlink_to("/etc/passwd")
    with pytest.raises(RolloutError, match="is a symbolic link"):
        rollout.stage(str(linked), None)
    arc, sha = archive(bundle_dir, tmp_path / "b.tar.gz")
    first, second = rollout.stage(str(arc), sha), rollout.stage(str(arc), sha)  # same second, same archive
    assert first != second and first.is_dir() and second.is_dir()

    def broken(*a, **k):
        raise shutil.Error([(str(bundle_dir / "model.bin"), "x", "[Errno 5] Input/output error")])

    monkeypatch.setattr(rollout_mod.shutil, "copytree", broken)
    with pytest.raises(RolloutError, match="staging failed: 1 file\\(s\\) not copied"):
        rollout.stage(str(bundle_dir), None)
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    with pytest.raises(RolloutError, match="staging failed|neither a tar"):
        rollout.stage(str(truncated), hashlib.sha256(truncated.read_bytes()).hexdigest())
    assert not [p for p in rollout.store.iterdir() if p.name.startswith(".staging-")]


def test_unpack_works_without_the_tar_data_filter(bundle_dir, tmp_path, monkeypatch):
    arc, _ = archive(bundle_dir, tmp_path / "b.tar.gz")
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    unpack(arc, tmp_path / "out")  # Python < 3.10.12 / 3.11.4: no filter argument
    assert (tmp_path / "out" / "bundle" / "bundle.json").is_file()


def test_one_write_atomic_for_state_files_and_the_roi_mask(tmp_path):
    from edge_ad.view import roi_editor

    assert rollout_mod.write_atomic is atomic.write_atomic is commands.write_atomic is control.write_atomic
    target = tmp_path / "sub" / "roi.png"
    roi_editor.write_mask(target, np.full((4, 6), 255, np.uint8))
    assert target.read_bytes().startswith(b"\x89PNG") and [p.name for p in target.parent.iterdir()] == ["roi.png"]
    atomic.write_atomic(tmp_path / "t.json", "{}\n")
    assert (tmp_path / "t.json").read_text() == "{}\n"


def test_state_files_of_hyphenated_ids_do_not_collide(tmp_path):
    a, b = Rollout(tmp_path, "line-3", "cam"), Rollout(tmp_path, "line", "3-cam")
    assert a.store != b.store and a.pointer != b.pointer
    assert Rollout(tmp_path, "line3", "cam").pointer.name == "active-bundle-line3-cam.json"  # plain ids: as before
