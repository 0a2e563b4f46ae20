"""Tests for launch.py: a child process's wall time and its own peak memory, as the benchmarks and the memory tests
measure them.

Run: .venv/bin/python -m pytest -q tests/test_launch.py
"""

import json
import subprocess
import sys

from conftest import ROOT, script_env


def test_measure_gives_the_childs_own_figures(tmp_path):
    # measured from a process that has touched 1 GB: a child started straight from it would carry that over
    child = "import sys; b = b'x' * (100 << 20); print('done'); sys.exit(3)"
    parent = (f"import json, launch; big = b'x' * (1 << 30); "
              f"print(json.dumps(launch.measure(['-c', {child!r}], {str(tmp_path)!r}, {str(tmp_path / 'child')!r})))")
    p = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    figures = json.loads(p.stdout)
    assert figures["rc"] == 3 and figures["stdout"] == "done\n" and figures["s"] > 0
    assert 100 < figures["rss_mb"] < 200, figures["rss_mb"]  # its 100 MB and Python's own
