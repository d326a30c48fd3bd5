"""bench/rss_long_run.py's readings: the RSS of a process, the step of a trainer log line, the growth."""
import os
import subprocess
import sys

from scriptload import load_script


def test_rss_of_a_child_and_log_line_parsing():
    bench = load_script("rss_long_run")
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]);"
                              "import time; print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert bench.rss_mib(child.pid) > 300  # the 300 MiB it touched are resident
        assert bench.rss_mib(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()
    assert bench.rss_mib(child.pid) is None  # gone
    assert bench.logged_step("step    200/2000  loss 0.9 denoise 0.8 edge 0.1  1.6 steps/s  ETA 0:10:00") == 200
    assert bench.logged_step("resumed from step 200 in /tmp/x") is None
    assert abs(bench.growth(2000.0, 2100.0) - 0.05) < 1e-12
