"""Atomic writes leave a whole file with the permissions a plain open() would give it."""

import os
import stat

from selfmedmae_components.io import write_json_atomic, write_text_atomic


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "report.md"
    write_text_atomic("first\n", target)
    write_text_atomic("second\n", target)
    assert target.read_text() == "second\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]


def test_atomic_write_is_readable_as_open_would_leave_it(tmp_path):
    """mkstemp makes 0600 files: a datalist or report that teammates on a shared server could not read."""
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    atomic = write_json_atomic({}, tmp_path / "atomic.json")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
