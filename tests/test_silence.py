from sfbw_ioc.stream.silence import (SILENT_MAX_S, SILENT_MIN_S, StreamStatus,
                                     silence_threshold, stream_status)


def test_the_threshold_follows_the_streams_own_rate_within_bounds():
    assert silence_threshold(None) == SILENT_MIN_S
    assert silence_threshold(0.01) == SILENT_MIN_S  # 100 Hz: a short pause is no fault
    assert silence_threshold(1.0) == 10.0  # a 1 Hz camera is not silent after 5 s
    assert silence_threshold(1000.0) == SILENT_MAX_S


def test_a_recent_message_is_receiving_even_if_the_name_failed_to_resolve_once():
    assert stream_status(100.0, 99.0, 0.0, 0.01, None)[0] is StreamStatus.RECEIVING
    assert stream_status(100.0, 99.0, 0.0, 0.01, "gaierror")[0] is StreamStatus.RECEIVING


def test_a_camera_at_1_hz_is_not_silent_after_6_s_but_after_11_s():
    assert stream_status(106.0, 100.0, 0.0, 1.0, None)[0] is StreamStatus.RECEIVING
    status, why = stream_status(111.0, 100.0, 0.0, 1.0, None)
    assert status is StreamStatus.SILENT and "no message since 11 s" in why


def test_a_source_that_never_sends_is_waiting_then_silent():
    assert stream_status(3.0, None, 0.0, None, None)[0] is StreamStatus.WAITING
    status, why = stream_status(6.0, None, 0.0, None, None)
    assert status is StreamStatus.SILENT and "no message at all in 6 s" in why


def test_an_unresolved_name_is_told_at_once():
    status, why = stream_status(0.5, None, 0.0, None, "Name or service not known")
    assert status is StreamStatus.UNRESOLVED and "Name or service not known" in why
