"""`python -m jinfer.server [MODEL] [flags]`: the same as `jinfer serve`."""

import argparse
import sys

from jinfer.server.cli import add_server_args, serve

if __name__ == "__main__":
    parser = add_server_args(argparse.ArgumentParser(prog="python -m jinfer.server"))
    sys.exit(serve(parser.parse_args()))
