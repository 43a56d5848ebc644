"""A model worker started from a fresh interpreter: ``python -s -m predictord.model.main SPEC``, run by the Python
of an API's environment when that environment holds another version of a module the master has imported (a fork
would carry the master's). The master passes the worker's control socket and the scoreboard (a memfd) as open file
descriptors; everything else is in the JSON spec."""

from __future__ import annotations

import json
import socket
import sys

from .. import logs
from ..devices import Device
from ..scoreboard import Scoreboard
from .worker import ModelWorker


def main() -> None:
    spec = json.loads(sys.argv[1])
    logs.setup(spec["log_level"], spec["log_format"])
    board = Scoreboard(spec["apis"], spec["board_fd"])
    board.http_slots = spec["http_slots"]
    ctl = socket.socket(fileno=spec["ctl_fd"])
    ModelWorker(spec["slot"], Device(**spec["device"]), ctl, board, spec["socket"], spec["threads"], spec["row"]).run()


if __name__ == "__main__":
    main()
