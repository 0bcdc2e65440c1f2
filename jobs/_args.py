"""What the commands under jobs/ share about their arguments."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneSentenceParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad argument: one sentence and status 2 (argparse's usage text goes with --help)."""
        self.exit(2, f"error: {message[0].upper()}{message[1:].rstrip('.')}; see --help.\n")
