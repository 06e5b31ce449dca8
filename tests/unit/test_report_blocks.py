"""The README blocks `make bench` and `make faults` write between their marks
(both with benchmarks.report.replace_block)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.report import replace_block


def test_the_block_between_the_marks_is_replaced_and_nothing_else(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- t -->\nold\ntable\n<!-- /t -->\n\n## After\ntext\n")
    replace_block(readme, "t", "new table\n")
    assert readme.read_text() == "# Title\n\n<!-- t -->\nnew table\n<!-- /t -->\n\n## After\ntext\n"
    replace_block(readme, "t", "again\n")  # twice in a row: the same place
    assert readme.read_text() == "# Title\n\n<!-- t -->\nagain\n<!-- /t -->\n\n## After\ntext\n"


def test_a_file_without_the_marks_is_left_alone_with_a_clear_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n<!-- t -->\nno end mark\n")
    with pytest.raises(SystemExit, match=r"has no <!-- t --> \.\.\. <!-- /t --> block"):
        replace_block(readme, "t", "x\n")
    assert readme.read_text() == "# Title\n<!-- t -->\nno end mark\n"
