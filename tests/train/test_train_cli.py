"""`streamvlm-train --help` lists every command, without a Lightning warning."""

from __future__ import annotations

import subprocess
import sys

from streamvlm.train.cli import main

COMMANDS = ("fit", "validate", "test", "predict", "export", "export-model", "vision", "bench", "plot")


def test_help_lists_every_command_with_a_line_each(capsys):
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert set(COMMANDS) <= listed and err == ""
    assert main([]) == 2  # no command: the same help, on stderr
    assert "export-model" in capsys.readouterr().err


def test_console_help_has_no_lightning_warning():
    run = subprocess.run([sys.executable, "-m", "streamvlm.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "export-model" in run.stdout and "bench" in run.stdout
    assert run.stderr == ""
    # Lightning's own subcommands still get Lightning's help, without its warning about args and sys.argv
    run = subprocess.run([sys.executable, "-m", "streamvlm.train", "fit", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "--trainer" in run.stdout
    assert "args parameter" not in run.stderr
