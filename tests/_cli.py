"""Helpers shared by the tests of the command-line tools (demo, bench)."""

from pykernels.__main__ import main


def run_main(capsys, argv):
    """main(argv) -> (return code, stdout, stderr); argparse's SystemExit becomes its code."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err
