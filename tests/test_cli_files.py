"""Every `llava-ivtp` command's file handling, tried as a new user would: a bad input or output path is refused with
one line on stderr (`llava-ivtp COMMAND: error: FLAG ...`) and exit code 2, never a traceback, and a file the command
did not write is never written over (its bytes are compared afterwards). The commands' own outputs are still
accepted: a re-run replaces its figure or report, and `eval` resumes from its results, also from those written before
the `"tool"` mark.

The rule is `cli.prepare_output`'s; checkpoint arguments are `cli.resolve_checkpoint`'s. Offline and small: the
toy testbed checkpoint of tests/test_eval.py, the tiny configs and sources of tests/tiny_models.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from llava_ivtp.cli import main as cli_main
from llava_ivtp.cli import save_figure
from tiny_models import TINY_CLIP_TEXT, make_images, tiny_config_dict, write_llava_hf, write_open_clip


# Files a user may have at an output path: none of them was written by our commands.
FOREIGN = {
    "a JSON object": ('{"a": 1}\n', "JSON object"),
    "a JSON list": ("[1, 2]\n", "JSON list, not an object"),
    "plain text": ("my notes, not JSON\n", "not JSON"),
}


def run_cli(argv, capsys):
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(result, command: str, flag: str, *patterns: str) -> str:
    """Exit code 2, one line on stderr starting `llava-ivtp COMMAND: error: FLAG`, matching every pattern; no
    traceback anywhere and nothing on stdout. Returns the line."""
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"llava-ivtp {command}: error: {flag}"), lines[0]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in: {lines[0]}"
    assert "Traceback" not in out and "Traceback" not in err
    assert out == ""
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def user_picture(path: Path) -> Path:
    """A PNG the user made (not marked by any of our commands)."""
    make_images(1)[0].save(path)
    return path


def marked_figure(path: Path, command: str) -> Path:
    """A figure as `llava-ivtp COMMAND` writes it (its mark in the metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [1, 0])
    save_figure(figure, path, command)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------------------------
# The rule itself: own outputs by content, nothing else
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg", ""])
def test_figures_carry_the_mark_of_the_command_that_drew_them(tmp_path, suffix):
    from llava_ivtp.cli import figure_mark

    path = marked_figure(tmp_path / f"figure{suffix}", "eval")
    assert [child.name for child in tmp_path.iterdir()] == [f"figure{suffix}"]  # no suffix appended
    assert figure_mark(path, path.read_bytes()) == "llava-ivtp eval"
    assert figure_mark(user_picture(tmp_path / "mine.png"), (tmp_path / "mine.png").read_bytes()) is None


# ------------------------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(toy_testbed_checkpoint):
    return toy_testbed_checkpoint


def eval_argv(model, results, *more) -> list[str]:
    return ["eval", "--model", str(model), "--limit", "2", "--batch-size", "2", "--settings", "full", "--threads", "1",
            "--no-progress", "--json", str(results), *more]


@pytest.mark.parametrize("case", list(FOREIGN))
def test_eval_json_that_is_not_a_results_file_is_refused_and_left_alone(checkpoint, tmp_path, capsys, case):
    content, message = FOREIGN[case]
    results = tmp_path / "results.json"
    results.write_text(content)
    line = assert_refused(run_cli(eval_argv(checkpoint, results), capsys), "eval", "--json", message,
                          "new path or a file llava-ivtp eval wrote", "remove the file or give another path")
    assert str(results) in line
    assert results.read_text() == content


def test_eval_json_of_another_command_or_another_run_is_refused(checkpoint, tmp_path, capsys):
    results = tmp_path / "results.json"
    bench_report = json.dumps({"tool": "llava-ivtp bench", "meta": {}, "flops": {}, "results": []})
    results.write_text(bench_report)
    assert_refused(run_cli(eval_argv(checkpoint, results), capsys), "eval", "--json", "written by llava-ivtp bench")
    assert results.read_text() == bench_report
    another_run = json.dumps({"tool": "llava-ivtp eval", "model": "someone/else", "dataset": "testbed test 0..1",
                              "questions": 2, "settings": {}})
    results.write_text(another_run)
    assert_refused(run_cli(eval_argv(checkpoint, results), capsys), "eval", "--json", "results of another run")
    assert results.read_text() == another_run


@pytest.mark.parametrize(
    "flag, make, message",
    [
        ("--markdown", lambda path: written(path, "# my notes\n"), "not a text llava-ivtp eval wrote"),
        ("--plot", lambda path: user_picture(path), "not a figure llava-ivtp eval wrote"),
        ("--plot", lambda path: marked_figure(path, "show"), "not a figure llava-ivtp eval wrote"),
    ],
    ids=["markdown of the user", "a picture of the user", "a figure of show"],
)
def test_eval_markdown_and_plot_never_write_over_a_file_of_someone_else(checkpoint, tmp_path, capsys, flag, make,
                                                                        message):
    existing = make(tmp_path / ("table.md" if flag == "--markdown" else "plot.png"))
    before = digest(existing)
    results = tmp_path / "results.json"
    assert_refused(run_cli(eval_argv(checkpoint, results, flag, str(existing)), capsys), "eval", flag, message)
    assert digest(existing) == before
    assert not results.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "more, flag, message",
    [
        (["--plot", "{json}"], "--plot", "is also --json"),
        (["--markdown", "{json}"], "--markdown", "is also --json"),
        (["--plot", "{tmp}/plot.txt"], "--plot", r"cannot write \.txt figures; give a \.png, \.pdf or \.svg path"),
    ],
    ids=["plot is json", "markdown is json", "plot of no figure format"],
)
def test_eval_output_paths_that_cannot_work(checkpoint, tmp_path, capsys, more, flag, message):
    results = tmp_path / "results.json"
    more = [item.format(json=results, tmp=tmp_path) for item in more]
    assert_refused(run_cli(eval_argv(checkpoint, results, *more), capsys), "eval", flag, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "model, message",
    [
        (lambda tmp: str(tmp / "no-such-model"), "no such folder, and not a hub repo id owner/name"),
        (lambda tmp: "./no-such-model", "no such folder, and not a hub repo id owner/name"),
        (lambda tmp: "~/no-such-llava-ivtp-model", "no such folder, and not a hub repo id owner/name"),
        (lambda tmp: "models/llava/no-such", "no such folder, and not a hub repo id owner/name"),
        (lambda tmp: str(tmp / "results.json"), "is a file"),
        (lambda tmp: str(tmp), "a folder without config.json"),
        (lambda tmp: "nobody-llava-ivtp/no-such-model", "as a hub repo id it cannot be loaded"),  # offline
        (lambda tmp: write_llava_hf(tmp / "llava-hf") and str(tmp / "llava-hf"), "model_type 'llava', not an IVTP"),
    ],
    ids=["missing folder", "missing relative folder", "missing home folder", "a path of three parts", "a file",
         "a folder without config.json", "a hub id not in the cache", "a stock llava-hf checkpoint"],
)
def test_eval_model_that_is_no_checkpoint_is_one_line(tmp_path, capsys, model, message):
    """With results of the same run in --json (so only --model is wrong): they are left as they are."""
    results = tmp_path / "results.json"
    source = model(tmp_path)
    results.write_text(json.dumps({"tool": "llava-ivtp eval", "model": source, "dataset": "testbed test 0..1",
                                   "questions": 2, "settings": {}}))
    before = digest(results)
    capsys.readouterr()  # what writing the stock checkpoint printed
    assert_refused(run_cli(eval_argv(source, results), capsys), "eval", "--model", message,
                   "checkpoint folder|hub|llava-ivtp convert")
    assert digest(results) == before


def test_eval_resumes_from_its_results_also_from_those_written_before_the_mark(checkpoint, tmp_path, capsys):
    """The first run writes marked results, its table and plot; a re-run resumes from the results (here with the mark
    removed, as written before it) and replaces its own table and plot."""
    results, table, plot = tmp_path / "results.json", tmp_path / "table.md", tmp_path / "plot.png"
    argv = eval_argv(checkpoint, results, "--markdown", str(table), "--plot", str(plot))
    assert cli_main(argv) == 0
    written = json.loads(results.read_text())
    assert written["tool"] == "llava-ivtp eval" and list(written["settings"]) == ["full"]
    assert table.read_text().startswith(f"Model `{checkpoint}`") and plot.stat().st_size > 0
    legacy = {key: value for key, value in written.items() if key != "tool"}
    results.write_text(json.dumps(legacy, indent=2))
    table.write_text(table.read_text() + "\n")  # to see it replaced
    capsys.readouterr()
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "full: already in the results, skipped" in out
    resumed = json.loads(results.read_text())
    assert resumed["tool"] == "llava-ivtp eval" and resumed["settings"] == written["settings"]
    assert not table.read_text().endswith("\n\n")


# ------------------------------------------------------------------------------------------------------------------
# show
# ------------------------------------------------------------------------------------------------------------------
def show_argv(model, out, *more) -> list[str]:
    return ["show", "--model", str(model), "--testbed", "test:3", "--settings", "ivtp@16", "--out", str(out), *more]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: user_picture(path), "not a figure llava-ivtp show wrote"),
        (lambda path: marked_figure(path, "eval"), "not a figure llava-ivtp show wrote"),
        (lambda path: written(path, "not a picture"), "not a figure llava-ivtp show wrote"),
    ],
    ids=["a picture of the user", "a figure of eval", "a text named .png"],
)
def test_show_out_never_writes_over_a_file_of_someone_else(checkpoint, tmp_path, capsys, make, message):
    existing = make(tmp_path / "figure.png")
    before = digest(existing)
    assert_refused(run_cli(show_argv(checkpoint, existing), capsys), "show", "--out", message,
                   "remove the file or give another path")
    assert digest(existing) == before


@pytest.mark.parametrize(
    "argv, flag, message",
    [
        (lambda tmp, model: show_argv(tmp / "no-such-model", tmp / "f.png"), "--model", "no such folder"),
        (lambda tmp, model: show_argv(model, tmp / "f.txt"), "--out", r"cannot write \.txt figures"),
        (lambda tmp, model: ["show", "--model", str(model), "--image", str(tmp / "notes.txt"), "--question", "Why?",
                             "--out", str(tmp / "f.png")], "--image", "not an image file"),
    ],
    ids=["missing model folder", "no figure format", "image that is text"],
)
def test_show_bad_paths_are_one_line(checkpoint, tmp_path, capsys, argv, flag, message):
    notes = tmp_path / "notes.txt"
    notes.write_text("words")
    assert_refused(run_cli(argv(tmp_path, checkpoint), capsys), "show", flag, message)
    assert notes.read_text() == "words"
    assert not (tmp_path / "f.png").exists()


def test_show_replaces_its_own_figure(checkpoint, tmp_path):
    from PIL import Image

    figure = marked_figure(tmp_path / "fig5.png", "show")
    before = digest(figure)
    assert cli_main(show_argv(checkpoint, figure)) == 0
    assert digest(figure) != before
    with Image.open(figure) as image:
        assert image.text["Software"] == "llava-ivtp show" and image.size[0] > 100


# ------------------------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------------------------
BENCH_FAST = ["--no-progress", "--threads", "1", "--warmup", "0", "--repeats", "1", "--new-tokens", "2",
              "--batch-sizes", "1", "--text-tokens", "8", "--profile-runs", "1"]


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("files-bench") / "tiny.json"
    path.write_text(json.dumps(tiny_config_dict(clip_text_encoder=TINY_CLIP_TEXT)))
    return path


@pytest.mark.parametrize("case", [*FOREIGN, "results of eval"])
def test_bench_json_that_is_not_its_report_is_refused_and_left_alone(bench_config, tmp_path, capsys, case):
    if case == "results of eval":
        content, message = json.dumps({"tool": "llava-ivtp eval", "settings": {}}), "written by llava-ivtp eval"
    else:
        content, message = FOREIGN[case]
    report = tmp_path / "report.json"
    report.write_text(content)
    assert_refused(run_cli(["bench", "--config", str(bench_config), *BENCH_FAST, "--json", str(report)], capsys),
                   "bench", "--json", message, "new path or a file llava-ivtp bench wrote")
    assert report.read_text() == content


@pytest.mark.parametrize(
    "more, flag, message",
    [
        (["--plot", "{tmp}/mine.png"], "--plot", "not a figure llava-ivtp bench wrote"),
        (["--plot", "{tmp}/report.json", "--json", "{tmp}/report.json"], "--plot", "is also --json"),
        (["--config", "{tmp}/no-such.json"], "--config", "neither a named shape"),
        (["--config", "./no-such.json"], "--config", "neither a named shape"),
        (["--config", "{tmp}/mine.png"], "--config", "not a JSON file"),
    ],
    ids=["plot over a picture", "json is plot", "missing config", "missing relative config", "config not JSON"],
)
def test_bench_bad_paths_are_one_line(bench_config, tmp_path, capsys, more, flag, message):
    picture = user_picture(tmp_path / "mine.png")
    before = digest(picture)
    more = [item.format(tmp=tmp_path) for item in more]
    config = [] if "--config" in more else ["--config", str(bench_config)]
    argv = ["bench", *config, *BENCH_FAST, "--plot-kept", "4", *more]
    assert_refused(run_cli(argv, capsys), "bench", flag, message)
    assert digest(picture) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.png"]


def test_bench_replaces_its_own_report_also_one_written_before_the_mark(bench_config, tmp_path, capsys, monkeypatch):
    from llava_ivtp.measuring import bench as bench_ivtp

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"meta": {"config": "old"}, "flops": {}, "results": []}))  # before the mark
    assert cli_main(["bench", "--config", str(bench_config), *BENCH_FAST, "--json", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["tool"] == "llava-ivtp bench" and written["meta"]["config"] != "old" and written["results"]
    # and the marked report is accepted again (the measurement itself is not what is checked here)
    monkeypatch.setattr(bench_ivtp, "_run", lambda args, config_dict, config_name: 0)
    capsys.readouterr()
    assert run_cli(["bench", "--config", str(bench_config), *BENCH_FAST, "--json", str(report)], capsys)[0] == 0


# ------------------------------------------------------------------------------------------------------------------
# flops: it writes no file; its preset is an input
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, message",
    [
        (lambda tmp: tmp / "text.json", "not JSON"),
        (lambda tmp: tmp / "list.json", "JSON object"),
        (lambda tmp: tmp / "no-such.json", "not found"),
        (lambda tmp: "./no-such/preset.json", "not found"),
        (lambda tmp: tmp, "is a folder"),
    ],
    ids=["text", "a JSON list", "missing", "missing relative", "a folder"],
)
def test_flops_bad_preset_is_one_line(tmp_path, capsys, preset, message):
    (tmp_path / "text.json").write_text("my notes")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert_refused(run_cli(["flops", "--preset", str(preset(tmp_path))], capsys), "flops", "--preset", message)
    assert (tmp_path / "text.json").read_text() == "my notes" and (tmp_path / "list.json").read_text() == "[1, 2]"


def test_flops_writes_no_file(tmp_path, capsys, monkeypatch):
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({"model_type": "llava_ivtp", **tiny_config_dict()}))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["flops", "--preset", str(preset), "--text-tokens", "8", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"]
    assert [path.name for path in tmp_path.iterdir()] == ["tiny.json"]


# ------------------------------------------------------------------------------------------------------------------
# export-testbed
# ------------------------------------------------------------------------------------------------------------------
def test_export_testbed_never_writes_over_a_file(tmp_path, capsys):
    mine = tmp_path / "task" / "test.jsonl"
    mine.parent.mkdir()
    mine.write_text("my questions\n")
    argv = ["export-testbed", "--limit", "2", "--out"]
    assert_refused(run_cli([*argv, str(mine.parent)], capsys), "export-testbed", "--out", "already holds",
                   "nothing is overwritten")
    assert_refused(run_cli([*argv, str(mine)], capsys), "export-testbed", "--out", "is a file; give a folder")
    assert_refused(run_cli([*argv, str(mine / "task")], capsys), "export-testbed", "--out",
                   "is a file, so no folder can be made under it")
    assert_refused(run_cli([*argv, str(tmp_path / "new"), "--split", "nope"], capsys), "export-testbed", "--split")
    assert mine.read_text() == "my questions\n"
    assert sorted(path.name for path in mine.parent.iterdir()) == ["test.jsonl"]  # no images, no task files


def test_export_testbed_writes_next_to_other_files_without_touching_them(tmp_path):
    notes = tmp_path / "task" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    assert cli_main(["export-testbed", "--limit", "2", "--out", str(notes.parent)]) == 0
    assert notes.read_text() == "mine" and len((notes.parent / "test.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def convert_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("files-convert")
    llava = write_llava_hf(root / "llava-hf")
    write_open_clip(root / "clip", llava)
    preset = root / "tiny-preset.json"
    preset.write_text(json.dumps({"model_type": "llava_ivtp", **tiny_config_dict(), "tau": 0.0}))
    return root


def convert_argv(root: Path, out: Path, **changes) -> list[str]:
    args = {"--llava": str(root / "llava-hf"), "--clip": f"local-dir:{root / 'clip'}",
            "--preset": str(root / "tiny-preset.json"), "--out": str(out), "--clip-tokenizer": "ViT-L-14-336",
            "--base-model": "llava-hf/llava-1.5-7b-hf", **changes}
    return ["convert", *[item for pair in args.items() for item in pair]]


def test_convert_out_never_writes_over_a_file(convert_sources, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    mine = occupied / "config.json"
    mine.write_text('{"mine": true}')
    assert_refused(run_cli(convert_argv(convert_sources, occupied), capsys), "convert", "--out", "not empty",
                   "--overwrite")
    assert_refused(run_cli(convert_argv(convert_sources, mine), capsys), "convert", "--out", "is a file")
    assert mine.read_text() == '{"mine": true}' and [path.name for path in occupied.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    "change, flag, message",
    [
        ({"--llava": "./no-such-llava"}, "--llava", "no such folder, and not a hub repo id owner/name"),
        ({"--llava": "~/no-such-llava-hf"}, "--llava", "no such folder, and not a hub repo id owner/name"),
        ({"--llava": "models/llava/no-such"}, "--llava", "no such folder, and not a hub repo id owner/name"),
        ({"--llava": "{root}/tiny-preset.json"}, "--llava", "is a file"),
        ({"--llava": "nobody-llava-ivtp/no-such-llava"}, "--llava", "cannot read its config"),  # offline
        ({"--preset": "{root}/notes.txt"}, "--preset", "not JSON"),
        ({"--preset": "{root}/list.json"}, "--preset", "not an IVTP preset"),
        ({"--preset": "./no-such-preset.json"}, "--preset", "no such file"),
        ({"--clip": "hf-hub:./no-such-clip"}, "--clip", "hub repo id owner/name"),
        ({"--clip": "local-dir:./no-such-clip"}, "--clip", "no such folder"),
    ],
    ids=["missing llava", "missing home llava", "llava path of three parts", "llava a file", "llava hub id offline",
         "preset text", "preset a list", "missing preset", "clip hub id a path", "missing clip folder"],
)
def test_convert_bad_inputs_are_one_line(convert_sources, tmp_path, capsys, change, flag, message):
    (convert_sources / "notes.txt").write_text("my notes")
    (convert_sources / "list.json").write_text("[1, 2]")
    change = {key: value.format(root=convert_sources) for key, value in change.items()}
    assert_refused(run_cli(convert_argv(convert_sources, tmp_path / "out", **change), capsys), "convert", flag, message)
    assert not (tmp_path / "out").exists()
    assert (convert_sources / "notes.txt").read_text() == "my notes"
