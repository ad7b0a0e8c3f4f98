"""The demos' steps (tools/run_demo.py, tools/run_panoptic_demo.py): each a run of one of the
project's command-line tools, echoed as a user would type it, timed, stopping the demo on
failure."""
import subprocess
import sys
import time

__all__ = ["run_step"]


def run_step(title, command, timings, cwd):
    """Run ``command`` (list) in ``cwd``, echo it, record its seconds in ``timings[title]``;
    exit the demo with the step's name if it fails."""
    print(f"\n[demo] {title}\n[demo] $ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd)
    timings[title] = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"[demo] step '{title}' failed (exit code {result.returncode}); see its messages above.")
