"""The README's main command: `oneiros demo` runs, remaps, streams and restores exactly."""

from replicas.cli import main


def test_demo_lends_idle_layers_streams_and_restores_bit_identical(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "reclaim math layers" in out.split("reclaim code layers")[0]  # MRU victim first
    assert "bytes exact = True" in out
    assert "equals the original: True" in out
