"""Run a launcher's timing code in a fresh Python process and read back the times it prints.

Each launcher gets its own process so that none inherits another's imports, forkservers or
memory; the code prints one line `TIMES <json>`."""
import json
import os
import subprocess
import sys


def fresh_times(code: str, timeout: float = 600, env_extra: dict | None = None) -> list | str:
    """The printed times, or a short reason ("skipped: ...", "timed out")."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # each picks its own port
    env.update(env_extra or {})
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "timed out"
    for line in proc.stdout.splitlines():
        if line.startswith("TIMES "):
            return json.loads(line[6:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return "skipped: " + tail[:70]
