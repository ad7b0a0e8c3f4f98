"""Run each script given on the command line with `--help`, as `python SCRIPT --help` would,
in this one process (the scripts share their torch/detectron2 imports, so a dozen tools
take seconds, not a minute), and print {script: {"exit_code": ..., "help": ...}} as JSON.

    python tests/docs/print_tool_help.py tools/train_net.py tools/demo.py ...
"""
import contextlib
import io
import json
import runpy
import sys


def help_of(script):
    """(exit code, text printed) of `script --help`."""
    printed = io.StringIO()
    sys.argv = [script, "--help"]
    exit_code = 0
    with contextlib.redirect_stdout(printed):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            exit_code = exit_.code or 0
    return exit_code, printed.getvalue()


def main(scripts):
    results = {}
    for script in scripts:
        exit_code, text = help_of(script)
        results[script] = {"exit_code": exit_code, "help": text}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
