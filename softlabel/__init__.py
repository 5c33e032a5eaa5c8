"""softlabel: one teacher pass, many students. Cached knowledge distillation for YOLO detectors."""

from softlabel import trust as _trust

_trust.configure()  # before anything imports Ultralytics: it reads its safe-load flag once, at import

__version__ = "0.1.0"
