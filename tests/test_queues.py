"""Demand sources. HTCondor is not packaged in Debian's archive reachable here, so the
htcondor source runs a stand-in condor_q that prints recorded `condor_q -af` output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core.queues import DemandError
from core.queues.command import CommandQueue
from core.queues.htcondor import HTCondorQueue, count_idle

RECORDED = Path(__file__).parent / "data" / "condor_q_af_idle.txt"


async def test_command_source_reads_the_integer_a_command_prints() -> None:
    assert await CommandQueue(["sh", "-c", "echo '  42 '"], 5).waiting() == 42


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sh", "-c", "echo many"], "printed 'many', not an integer"),
        (["sh", "-c", "echo -3"], "negative count"),
        (["sh", "-c", "echo oops >&2; exit 4"], "exited with 4: oops"),
        (["/nonexistent/alien-count"], "cannot run '/nonexistent/alien-count'"),
        (["sleep", "5"], "did not finish within 0.2s"),
    ],
)
async def test_command_source_failures_are_clear_demand_errors(
    argv: list[str], message: str
) -> None:
    with pytest.raises(DemandError, match=message):
        await CommandQueue(argv, 0.2 if argv[0] == "sleep" else 5).waiting()


def test_condor_q_output_counts_one_job_per_line() -> None:
    assert count_idle(RECORDED.read_text()) == 5
    assert count_idle("") == 0
    with pytest.raises(DemandError, match="unexpected line"):
        count_idle("-- Schedd: sched.example.org : <10.0.0.1:9618>\n")


async def test_htcondor_source_asks_condor_q_for_idle_jobs_only(tmp_path: Path) -> None:
    seen_args = tmp_path / "args"
    fake = tmp_path / "condor_q"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys, pathlib\n"
        f"pathlib.Path({str(seen_args)!r}).write_text(repr(sys.argv[1:]))\n"
        f"sys.stdout.write(pathlib.Path({str(RECORDED)!r}).read_text())\n"
    )
    fake.chmod(0o755)
    source = HTCondorQueue([str(fake)], 'Owner == "alice"', 5)
    assert await source.waiting() == 5
    args = eval(seen_args.read_text())
    assert args[args.index("-constraint") + 1] == '(JobStatus == 1) && (Owner == "alice")'
    assert args[-3:] == ["-af", "ClusterId", "ProcId"]
