"""Run directories of servers killed outright are removed by the next server start."""

import os
import subprocess
import sys

from lightllm_plugin.server.launcher import RUN_DIR_PREFIX, remove_stale_run_dirs


def test_only_the_dirs_of_dead_owners_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f"{RUN_DIR_PREFIX}{dead.pid}-abc",
        "alive": f"{RUN_DIR_PREFIX}{os.getpid()}-abc",
        "old_style": f"{RUN_DIR_PREFIX}abc_1234",
        "other": f"{dead.pid}-abc",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "router.sock").touch()
    (tmp_path / f"{RUN_DIR_PREFIX}{dead.pid}-file").touch()  # a file, not a run dir
    remove_stale_run_dirs(str(tmp_path))
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in left
    assert {names["alive"], names["old_style"], names["other"], f"{RUN_DIR_PREFIX}{dead.pid}-file"} <= left
