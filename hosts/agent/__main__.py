"""python -m hosts.agent DIRECTORY: write the agent's zipapp there, named by its hash; print its path."""

import sys
from pathlib import Path

from . import agent_file_name, agent_source


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hosts.agent DIRECTORY", file=sys.stderr)
        return 2
    path = Path(argv[1]) / agent_file_name()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(agent_source()[0])
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
