"""What softlabel trusts: checkpoints are loaded the safe way unless the user says a file is theirs.

A `.pt` checkpoint is a pickle, and unpickling runs whatever code the file names. softlabel loads
teachers and students with Ultralytics' safe load (`torch.load(weights_only=True)` against its
allow-list of known model classes), which reads every ordinary Ultralytics checkpoint and refuses
anything else before a byte of it runs. Ultralytics' own loads inside training (a student `.pt`,
`last.pt` on resume) follow the same rule through `ULTRALYTICS_SAFE_LOAD`, which is set here,
before Ultralytics is imported, so its import-time read of the flag sees it.

A user who trusts a file that the safe load refuses (a checkpoint holding custom classes) opts out
with SOFTLABEL_TRUST_CHECKPOINTS=1, for that one command.
"""

from __future__ import annotations

import os

TRUST_ENV = "SOFTLABEL_TRUST_CHECKPOINTS"
OPT_OUT = f"{TRUST_ENV}=1"


def trusted() -> bool:
    """True when the user has said their checkpoints may run code as they load."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def configure() -> None:
    """Make Ultralytics' own checkpoint loads safe too, unless the user opted out. Set either way, so a
    process started from this one (a DDP rank) follows this process's choice, not an inherited one."""
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "0" if trusted() else "1"


def refused(path: str, role: str) -> str:
    """The one line for a checkpoint that the safe load would not read."""
    return (
        f"{path}: the {role} checkpoint holds objects outside Ultralytics' known model classes, so it was not loaded "
        f"(loading it could run code it carries); if you made this file or trust its source, run again with {OPT_OUT}"
    )
