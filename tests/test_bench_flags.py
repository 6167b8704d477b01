"""One spelling for the bench flags: `--batch` and `--reference [PYTHON]` everywhere; the old
spellings (`--batches`, `--reference-python`) still parse, hidden and with a deprecation line."""

from __future__ import annotations

import argparse

import pytest

from moshi_grpc.bench import codec, lm


@pytest.mark.parametrize("module", [codec, lm], ids=["codec", "lm"])
def test_bench_flags_have_one_spelling_and_deprecated_aliases(module, capsys) -> None:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    text = parser.format_help()
    assert "--batch " in text and "--reference [PYTHON]" in text
    assert "--batches" not in text and "--reference-python" not in text  # hidden aliases

    args = parser.parse_args([])
    assert args.batch == "1,4,8" and args.reference is None
    assert parser.parse_args(["--reference"]).reference.endswith("python")
    assert parser.parse_args(["--reference", "/opt/ref/python"]).reference == "/opt/ref/python"
    assert capsys.readouterr().err == ""

    assert parser.parse_args(["--batches", "2,3"]).batch == "2,3"
    # The old pair: --reference-python names the python, --reference turns the run on.
    for argv in (
        ["--reference-python", "/x/python", "--reference"],
        ["--reference", "--reference-python", "/x/python"],
    ):
        assert parser.parse_args(argv).reference == "/x/python"
    assert parser.parse_args(["--reference-python", "/x/python"]).reference is None
    err = capsys.readouterr().err
    assert "--batches is deprecated, use --batch" in err
    assert "--reference-python is deprecated, use --reference PYTHON" in err
