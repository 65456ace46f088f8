"""tools/config_duplication.py: the duplicated-config figure, on configs whose answer is known."""

import importlib.util

from bundle_runner import REPO

spec = importlib.util.spec_from_file_location("config_duplication", REPO / "tools" / "config_duplication.py")
config_duplication = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_duplication)

SHARED = """\
# a comment line does not count
device: cpu          # nor a trailing comment
seed: 0
amp: true
num_workers: 4
"""


def write(root, name, text):
    path = root / "bundles" / name / "configs" / "finetune.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)


def test_lines_in_a_window_another_file_has_are_counted_per_block(tmp_path, capsys):
    write(tmp_path, "a", SHARED + "train:\n  trainer:\n    max_epochs: 5\n")
    write(tmp_path, "b", SHARED + "roi_size: [96, 96, 96]\n\n")
    (tmp_path / "bundles/b/configs/metadata.json").write_text(SHARED)  # the model card's metadata is not a config
    files, lines, dup, per_block, totals = config_duplication.report(tmp_path)
    # a: 4 settings, "train:", 2 skeleton lines; b: 5 settings; only the 4 shared settings lines repeat, in both files
    assert (files, lines, dup) == (2, 12, 8)
    assert per_block["top-level settings"] == 8 and totals["top-level settings"] == 9
    assert totals["train/validate skeleton"] == 2 and per_block["train/validate skeleton"] == 0
    config_duplication.main(["--root", str(tmp_path)])
    assert "2 config files, 12 lines, 8 in 4-line windows found in another file (67%)" in capsys.readouterr().out


def test_three_shared_lines_are_not_a_window(tmp_path):
    write(tmp_path, "a", "x: 1\ny: 2\nz: 3\nonly_a: 4\n")
    write(tmp_path, "b", "x: 1\ny: 2\nz: 3\nonly_b: 5\n")
    assert config_duplication.report(tmp_path)[:3] == (2, 8, 0)
