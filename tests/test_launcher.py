"""`disttrain train --nproc N`: one progress display, readable logs, and an exit status that says
whether the run finished, with real worker processes."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tiny import TINY_PER_STEP_FLAGS

from disttrain.launcher.elastic_job import ElasticJob
from disttrain.launcher.local import elastic_outcome, describe_exit
from disttrain.progress import PROGRESS_PREFIX

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (w\d+|w[0-9a-f]{4}|main) (INFO|WARNING|ERROR) [\w.]+: ")
JOIN_LINE = re.compile(r"worker (w[0-9a-f]{4}) \(\S+, pid (\d+)\) asks to join")


def finished_processes(*codes: int) -> list[subprocess.Popen]:
    """Real processes that exit with these codes (negative: killed by that signal)."""
    procs = []
    for code in codes:
        body = f"import os; os.kill(os.getpid(), {-code})" if code < 0 else f"raise SystemExit({code})"
        procs.append(subprocess.Popen([sys.executable, "-c", body]))
    for proc in procs:
        proc.wait()
    return procs


def test_an_elastic_run_succeeds_when_some_worker_finished_it():
    assert elastic_outcome(finished_processes(0, -signal.SIGKILL, 0)) == 0


def test_an_elastic_run_fails_when_no_worker_finished_it():
    assert elastic_outcome(finished_processes(-signal.SIGKILL, 1)) == -signal.SIGKILL


def test_exit_statuses_are_described_in_words():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(2) == "exited with code 2"


def test_local_workers_write_timestamped_log_lines_and_no_progress_protocol():
    result = subprocess.run(
        ["disttrain", "train", "--nproc", "2", "--steps", "4", "--eval-every", "2", *TINY_PER_STEP_FLAGS],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(LOG_LINE.match(line) for line in lines), result.stderr
    assert PROGRESS_PREFIX not in result.stderr + result.stdout
    assert result.stdout.count("\n") == 1  # the summary line, and nothing glued to it


@pytest.mark.slow
def test_an_elastic_local_run_exits_0_when_a_worker_is_lost_and_the_others_finish(tmp_path):
    job = ElasticJob(tmp_path, [])
    job.start_coordinator(start_workers=3)
    coordinator_log = tmp_path / "coordinator-1.log"
    try:
        launch = subprocess.Popen(
            [
                "disttrain", "train", "--nproc", "3", "--coordinator", job.address, "--steps", "300",
                "--eval-every", "50", "--link-mbit", "2", *TINY_PER_STEP_FLAGS,
            ],
            env=job.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        while "generation 1:" not in coordinator_log.read_text():
            assert time.monotonic() < deadline and launch.poll() is None, "no generation formed"
            time.sleep(0.2)
        time.sleep(2)  # training is under way
        victim = int(JOIN_LINE.findall(coordinator_log.read_text())[2][1])
        os.kill(victim, signal.SIGKILL)
        out, err = launch.communicate(timeout=240)
    finally:
        job.close()
    assert launch.returncode == 0, err
    assert f"(pid {victim}) was lost: killed by SIGKILL" in err
    assert "2 of 3 workers finished the run" in err
    assert '"replicas_identical": true' in out
