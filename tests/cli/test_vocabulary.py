"""One CLI vocabulary: every command's `--help` walked, the shared flags' names checked, a missing
input path is exit 2 naming it, and an output that exists names the flag that allows it."""

from __future__ import annotations

import re

import pytest

from vilbert.cli.app import cli_command
from vilbert.pipeline.text import train_wordpiece

SHARED = {
    "image size": "--image-size",
    "resize mode": "--resize-mode",
    "worker count": "--workers",
    "output directory": "--out",
    "replace an existing output": "--overwrite",
    "continue an interrupted run": "--resume",
}
"""The idea, and the one name every command gives it."""

OTHER_SPELLINGS = {
    "--size": "image size",
    "--mode": "resize mode",
    "--decode-workers": "worker count",
    "--num-workers": "worker count",
    "--output": "output directory",
    "--output-dir": "output directory",
    "--out-dir": "output directory",
    "--force": "replace an existing output",
    "--continue": "continue an interrupted run",
}

WRITES_A_DIRECTORY = {
    "fetch cc", "fetch urls", "preprocess", "pretrain", "finetune", "demo", "ablate", "export", "plot",
    "synth corpus", "synth memes",
}  # fmt: skip


def _commands() -> dict[str, object]:
    found: dict[str, object] = {}

    def walk(command, path: list[str]) -> None:
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            found[" ".join(path)] = command

    walk(cli_command(), [])
    return found


COMMANDS = _commands()


def _option_names(command) -> set[str]:
    return {name for p in command.params if p.param_type_name == "option" for name in (*p.opts, *p.secondary_opts)}


def test_the_walk_finds_every_command_group() -> None:
    assert {"fetch cc", "fetch urls", "preprocess", "pretrain", "finetune", "cache verify", "config show"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_has_no_type_noise(run_cli, name: str) -> None:
    result = run_cli(*name.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout, result.stdout
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert not re.search(r"[{}]", usage), usage


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_shared_ideas_have_one_name(name: str) -> None:
    names = _option_names(COMMANDS[name])
    for spelling, idea in OTHER_SPELLINGS.items():
        assert spelling not in names, f"`vilbert {name}` spells {idea} {spelling}; the shared name is {SHARED[idea]}"


@pytest.mark.parametrize("name", sorted(WRITES_A_DIRECTORY))
def test_every_command_that_writes_takes_out(name: str) -> None:
    assert "--out" in _option_names(COMMANDS[name])


MISSING_INPUTS = [
    ("fetch", "cc", "--tsv", "{missing}", "--out", "{tmp}/o"),
    ("fetch", "urls", "--input", "{missing}", "--out", "{tmp}/o"),
    ("preprocess", "{missing}", "--out", "{tmp}/o"),
    ("preprocess", "{tmp}", "--format", "folder", "--listing", "{missing}", "--out", "{tmp}/o"),
    ("pretrain", "--data", "{missing}", "--out", "{tmp}/r"),
    ("finetune", "--data", "{missing}", "--init", "none", "--out", "{tmp}/r"),
    ("finetune", "--data", "{tmp}", "--init", "{missing}", "--out", "{tmp}/r"),
    ("analyse", "{missing}", "--data", "{tmp}"),
    ("evaluate", "{missing}", "--data", "{tmp}"),
    ("export", "{missing}", "--out", "{tmp}/e"),
    ("plot", "{missing}"),
    ("cache", "inspect", "{missing}"),
    ("cache", "verify", "{missing}"),
    ("synth", "serve", "{missing}"),
    ("tokenizer", "train", "{missing}", "--vocab-size", "100", "--out", "{tmp}/t.json"),
    ("tokenizer", "encode", "{missing}", "a caption"),
    ("ablate", "--corpus", "{missing}", "--out", "{tmp}/a"),
    ("config", "show", "--config", "{missing}"),
]


@pytest.mark.parametrize("args", MISSING_INPUTS, ids=lambda args: " ".join(a for a in args if "{" not in a))
def test_a_missing_input_path_is_exit_2_naming_it(run_cli, tmp_path, args) -> None:
    missing = tmp_path / "no-such-input.tsv"
    result = run_cli(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "no-such-input" in result.stderr.replace("\n", "").replace("│", "").replace(" ", ""), result.stderr
    assert "Traceback" not in result.stderr


def _non_empty(path):
    path.mkdir(parents=True)
    (path / "something.txt").write_text("earlier work\n")
    return path


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("synth", "corpus", "--n", "2", "--out", "{out}"), "--overwrite"),
        (("synth", "memes", "--n", "12", "--out", "{out}"), "--overwrite"),
        (
            (
                "preprocess",
                "{src_dir}",
                "--format",
                "folder",
                "--listing",
                "{src}",
                "--tokenizer",
                "{tok}",
                "--out",
                "{out}",
            ),
            "--overwrite",
        ),
        (("demo", "--out", "{out}"), "--overwrite"),
        (("tokenizer", "train", "{src}", "--vocab-size", "100", "--out", "{out}/something.txt"), "--overwrite"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(v for v in value if "{" not in v),
)
def test_an_existing_output_names_the_flag_that_allows_it(run_cli, tmp_path, args, flag) -> None:
    out = _non_empty(tmp_path / "out")
    src = tmp_path / "captions.txt"
    src.write_text("circle.png\ta red circle\n")
    tok = tmp_path / "tokenizer.json"
    train_wordpiece(["a red circle"] * 3, vocab_size=40).save(str(tok))
    result = run_cli(*(a.format(out=out, src=src, src_dir=tmp_path, tok=tok) for a in args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert flag in result.stderr, result.stderr
