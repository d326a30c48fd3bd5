"""Multi-process settings from the environment and the peer-failure test (raphael_jax/parallel/distributed.py)."""
import pytest

from raphael_jax.cli import train as train_cli
from raphael_jax.parallel.distributed import _timeouts, peer_failure


def test_timeouts_from_the_environment():
    assert _timeouts({}) == {}
    assert _timeouts({"RAPHAEL_HEARTBEAT_TIMEOUT": "10", "RAPHAEL_INIT_TIMEOUT": "60"}) == {
        "heartbeat_timeout_seconds": 10, "initialization_timeout": 60}
    with pytest.raises(ValueError, match="RAPHAEL_HEARTBEAT_TIMEOUT=0 must be a positive number of seconds"):
        _timeouts({"RAPHAEL_HEARTBEAT_TIMEOUT": "0"})


def test_a_bad_timeout_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAPHAEL_HEARTBEAT_TIMEOUT", "-5")
    assert train_cli.main(["--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["raphael-train: error: RAPHAEL_HEARTBEAT_TIMEOUT=-5 must be a positive number of seconds"]
    assert not (tmp_path / "run").exists()


def test_peer_failure_recognises_a_lost_peer_only():
    first = "UNKNOWN: Gloo all-reduce failed: [pair.cc:547] Connection closed by peer [127.0.0.1]:1"
    assert peer_failure(RuntimeError(first + "\nmore")) == first
    assert peer_failure(ValueError("Connection closed by peer")) is None  # not a runtime error
    assert peer_failure(RuntimeError("shapes (2, 3) and (4,) do not match")) is None
