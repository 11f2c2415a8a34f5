"""Alert policy: N-of-M, cool-down (frames and seconds), all-clear; pure logic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_ad.decide.policy import AlertPolicy, Cooldown, Event


def feed(policy: AlertPolicy, flags, fps: float = 10.0):
    """Feed anomalous flags as frames 0..; returns [(frame_index, event)]."""
    events = []
    for index, flag in enumerate(flags):
        event = policy.update(bool(flag), index / fps, index)
        if event is not None:
            events.append((index, event))
    return events


def test_n_of_m_raises_on_the_nth_anomalous_frame():
    policy = AlertPolicy(n=3, m=5)
    assert feed(policy, [1, 0, 1, 0, 1]) == [(4, Event.ALERT)]


def test_fewer_than_n_in_window_never_alerts():
    policy = AlertPolicy(n=3, m=5)
    assert feed(policy, [1, 1, 0, 0, 0, 1, 1, 0, 0, 0] * 5) == []


def test_single_anomalous_frame_with_n_1():
    assert feed(AlertPolicy(n=1, m=1, clear_after=5), [0, 1, 0]) == [(1, Event.ALERT)]


def test_cooldown_in_frames_suppresses_then_realerts_a_persistent_defect():
    policy = AlertPolicy(n=2, m=3, cooldown=Cooldown(frames=10), clear_after=100)
    events = feed(policy, [1] * 25)
    assert events == [(1, Event.ALERT), (11, Event.ALERT), (21, Event.ALERT)]


def test_cooldown_in_seconds_uses_frame_timestamps():
    policy = AlertPolicy(n=1, m=1, cooldown=Cooldown(seconds=2.0), clear_after=100)
    times = [0.0, 0.5, 1.9, 2.0, 2.1, 4.5]
    events = [policy.update(True, t, i) for i, t in enumerate(times)]
    assert events == [Event.ALERT, None, None, Event.ALERT, None, Event.ALERT]


def test_all_clear_after_m_normal_frames_and_only_after_an_alert():
    policy = AlertPolicy(n=2, m=4)
    flags = [0] * 10 + [1, 1] + [0] * 3 + [1] + [0] * 4
    assert feed(policy, flags) == [(11, Event.ALERT), (19, Event.CLEAR)]
    assert not policy.active


def test_clear_after_is_configurable():
    policy = AlertPolicy(n=1, m=3, clear_after=1)
    assert feed(policy, [1, 0, 0]) == [(0, Event.ALERT), (1, Event.CLEAR)]


def test_alert_needs_fresh_evidence_after_each_alert():
    # cool-down 0: the window is reset, so the next alert needs N new anomalous frames.
    policy = AlertPolicy(n=3, m=5, cooldown=Cooldown(), clear_after=50)
    assert [i for i, e in feed(policy, [1] * 9)] == [2, 5, 8]


def test_invalid_parameters():
    with pytest.raises(ValueError):
        AlertPolicy(n=4, m=3)
    with pytest.raises(ValueError):
        AlertPolicy(n=0, m=3)
    with pytest.raises(ValueError):
        AlertPolicy(n=1, m=3, clear_after=0)


@pytest.mark.parametrize("text,expected", [
    ("10", Cooldown(seconds=10)), ("2.5s", Cooldown(seconds=2.5)), ("500ms", Cooldown(seconds=0.5)),
    ("30f", Cooldown(frames=30)), ("30 frames", Cooldown(frames=30)), (7, Cooldown(seconds=7)),
    ("0", Cooldown()),
])
def test_cooldown_parse(text, expected):
    assert Cooldown.parse(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "-3", "3h", "2.5f"])
def test_cooldown_parse_rejects(text):
    with pytest.raises(ValueError):
        Cooldown.parse(text)


@settings(max_examples=150, deadline=None)
@given(
    flags=st.lists(st.booleans(), max_size=120),
    n=st.integers(1, 5),
    extra=st.integers(0, 4),
    cooldown=st.integers(0, 20),
)
def test_properties(flags, n, extra, cooldown):
    m = n + extra
    policy = AlertPolicy(n=n, m=m, cooldown=Cooldown(frames=cooldown))
    events = feed(policy, flags)
    alerts = [i for i, e in events if e is Event.ALERT]
    clears = [i for i, e in events if e is Event.CLEAR]
    for i in alerts:
        assert flags[i], "alerts fire on an anomalous frame"
        assert sum(flags[max(0, i - m + 1) : i + 1]) >= n, "N of the last M frames were anomalous"
    for a, b in zip(alerts, alerts[1:]):
        assert b - a >= max(cooldown, n), "cool-down and fresh evidence between alerts"
    for i in clears:
        assert not any(flags[i - m + 1 : i + 1]), "all clear after M normal frames"
    # alerts and clears alternate starting with an alert, except repeated alerts of a persisting defect
    merged = sorted([(i, "a") for i in alerts] + [(i, "c") for i in clears])
    assert not merged or merged[0][1] == "a"
    assert all(not (x[1] == "c" and y[1] == "c") for x, y in zip(merged, merged[1:]))
    if not any(flags):
        assert events == []
