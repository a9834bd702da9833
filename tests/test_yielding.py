"""Holds per GPU: the hold file's text, which engines a hold takes, and --gpu."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import cli, yielding
from shim.yielding import Hold, affects, hold_gpus, hold_text, parse_gpus


@pytest.mark.parametrize(("text", "gpus"), [
    ("1", (1,)), ("0,1", (0, 1)), (" 1, 0 ,1", (0, 1)), ("63", (63,)),
])
def test_gpu_lists_parse(text: str, gpus: tuple[int, ...]) -> None:
    assert parse_gpus(text) == gpus


@pytest.mark.parametrize("text", ["", ",", "-1", "64", "a", "1;2", "0x1", "1.0"])
def test_bad_gpu_lists_are_refused_saying_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"GPU indices 0\.\.63 separated by commas"):
        parse_gpus(text)


def test_hold_text_records_the_gpus_and_reads_back() -> None:
    assert hold_text(12.5, None) == "12.500\n"
    assert hold_gpus(hold_text(12.5, None)) is None
    assert hold_text(12.5, (0, 1)) == "12.500\ngpus=0,1\n"
    assert hold_gpus(hold_text(12.5, (0, 1))) == (0, 1)
    # a file written before holds had devices, or a damaged line: every GPU
    assert hold_gpus("1764700000.000\n") is None
    assert hold_gpus("1.0\ngpus=x\n") is None


def test_a_hold_takes_only_engines_on_its_gpus() -> None:
    assert affects(None, (0,)) and affects(None, (3,))
    assert affects((1,), (1,)) and affects((1,), (0, 1))
    assert not affects((1,), (0,)) and not affects((0, 2), (1, 3))


def test_hold_files_carry_their_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    folder = yielding.holds_dir()
    folder.mkdir(parents=True)
    (folder / "whisper.service").write_text(hold_text(1.0, (1,)))
    (folder / "game").write_text("1.0\n")
    (folder / "not a holder!").write_text("1.0\n")
    details = yielding.read_hold_details()
    assert details.keys() == {"whisper.service", "game"}
    assert details["whisper.service"].gpus == (1,) and details["game"].gpus is None
    assert isinstance(details["game"], Hold) and details["game"].since > 0
    assert yielding.read_holds().keys() == {"whisper.service", "game"}


def test_the_cli_takes_gpu_and_refuses_a_bad_one(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(["yield", "--gpu", "1", "--by", "whisper.service"])
    assert args.gpu == (1,) and args.by == "whisper.service"
    assert cli._parser().parse_args(["yield"]).gpu is None
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["yield", "--gpu", "one"])
    assert "GPU indices" in capsys.readouterr().err
