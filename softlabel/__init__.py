"""softlabel: one teacher pass, many students. Cached knowledge distillation for YOLO detectors."""

__version__ = "0.1.0"
