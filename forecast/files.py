"""Files only their owner may read: the key store, the webhook store, the owner file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 if it does not exist; set an existing one to 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except PermissionError:
        log.warning("cannot set %s to mode 0600 (not its owner)", path)
    finally:
        os.close(fd)
