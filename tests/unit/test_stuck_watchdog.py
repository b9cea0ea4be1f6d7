"""tests/conftest.py's last resort: a test stuck where pytest-timeout's SIGALRM cannot reach it
has every thread's stack dumped to the session's real stderr, and the session ends."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

STUCK = '''
import signal, time, pytest

@pytest.mark.timeout(1)
def test_stuck_where_no_signal_reaches():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})    # as a thread stuck in C is
    time.sleep(60)

def test_never_reached():
    pass
'''


def test_a_test_no_signal_reaches_is_dumped_and_ends_the_session(tmp_path):
    (tmp_path / "test_stuck.py").write_text(STUCK)
    env = {**os.environ, "XENKVM_STUCK_GRACE_S": "1", "PYTHONPATH": str(TESTS)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_stuck.py")],
                       capture_output=True, text=True, env=env, timeout=50, cwd=tmp_path)
    assert r.returncode != 0
    assert "Timeout (0:00:02)!" in r.stderr
    assert "in test_stuck_where_no_signal_reaches" in r.stderr
    assert "passed" not in r.stdout
