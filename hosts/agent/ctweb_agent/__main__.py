"""Run the agent: `python3 ctweb-agent-<hash>.pyz SUBCOMMAND` (the zipapp's own entry calls
run()), or `python3 -m ctweb_agent SUBCOMMAND` beside an unpacked copy."""

import sys

from .commands import main


def run():
    return main(sys.argv)


if __name__ == "__main__":
    sys.exit(run())
