"""Named compression presets for cached tensors; every chunk also carries a CRC32C checksum."""

from __future__ import annotations

from typing import Any

from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from softlabel.errors import UserError

CODECS: dict[str, dict[str, Any]] = {
    "blosc-zstd": {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"},
    "blosc-lz4": {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "zstd": {"name": "zstd", "level": 3},
    "none": {"name": "none"},
}
DEFAULT_CODEC = "blosc-zstd"


def codec_spec(name: str) -> dict[str, Any]:
    if name not in CODECS:
        raise UserError(f"unknown codec '{name}'; valid codecs: {', '.join(CODECS)}")
    return dict(CODECS[name])


def codec_choice(text: str) -> dict[str, dict[str, Any]]:
    """'blosc-zstd' (every tensor) or 'head=zstd,feat=blosc-lz4' -> {"head": spec, "feat": spec}."""
    choice = {"head": DEFAULT_CODEC, "feat": DEFAULT_CODEC}
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        choice = {"head": parts[0], "feat": parts[0]}
    else:
        for part in parts:
            key, _, name = part.partition("=")
            if key not in choice or not name:
                raise UserError(f"--codec {text!r}: expected PRESET or head=PRESET,feat=PRESET")
            choice[key] = name
    return {key: {**codec_spec(name), "preset": name} for key, name in choice.items()}


def compressors(spec: dict[str, Any]) -> list:
    """The bytes-to-bytes codec chain of one inner chunk: compression, then a checksum."""
    kind = spec["name"]
    if kind == "blosc":
        chain = [BloscCodec(cname=spec["cname"], clevel=spec["clevel"], shuffle=BloscShuffle[spec["shuffle"]])]
    elif kind == "zstd":
        chain = [ZstdCodec(level=spec["level"])]
    elif kind == "none":
        chain = []
    else:
        raise UserError(f"unknown codec '{kind}' in store attributes; valid codecs: {', '.join(CODECS)}")
    # the checksum is computed over the compressed bytes, so a flipped bit on disk is always caught
    return [*chain, Crc32cCodec()]
