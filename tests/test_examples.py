"""The examples run offline as documented and print what they promise."""

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def test_generate_example_streams_a_batch_and_reports_the_cache():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate.py"), "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout
    assert len(re.findall(r"^  step +\d+:", output, flags=re.MULTILINE)) == 3
    # 7B preset: 120 visual tokens in layers 0-2 ... 64 in layers 12-31; every row holds them plus its text.
    rows = re.findall(r"^\| (\d+) \| (\d+) \| \[([\d, ]+)\] \|", output, flags=re.MULTILINE)
    assert len(rows) == 32
    slots = [int(row[1]) for row in rows]
    visual = [120] * 3 + [104] * 3 + [88] * 3 + [72] * 3 + [64] * 20
    assert [s - v for s, v in zip(slots, visual)] == [slots[0] - 120] * 32
    assert "KV cache after prefill 308,281,344 B (294.00 MiB) vs stock 570,425,344 B (544.00 MiB): 46.0% less" in output


def test_guided_pruning_example_shows_both_questions_tokens_and_grids():
    questions = ["Where is the bright disc?", "What color is the top?"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "guided_pruning.py"), "--question", questions[0], "--question", questions[1]],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout
    for question in questions:
        assert f"Q: {question}" in output
    # every word of each question is listed once with a relevance, and nothing of the template
    token_lines = re.findall(r"^  (\S+\(.*)$", output, flags=re.MULTILINE)
    assert len(token_lines) == 2
    for line, question in zip(token_lines, questions):
        words = [re.match(r"(.+?)\(", item).group(1) for item in line.split(" ")]
        assert "".join(words) == question.replace(" ", "")
    # 24 x 24 grids: 64 '#' (reach the last layers), 120 '#'+'+' (left the vision tower)
    grid_rows = re.findall(r"^  ([.+#]{24})$", output, flags=re.MULTILINE)
    assert len(grid_rows) == 48
    for grid in (grid_rows[:24], grid_rows[24:]):
        cells = "".join(grid)
        assert cells.count("#") == 64 and cells.count("#") + cells.count("+") == 120
    summary = re.search(r"kept by both questions: (\d+); only by the first: (\d+); only by the second: (\d+)", output)
    assert summary and int(summary.group(1)) + int(summary.group(2)) == 64
