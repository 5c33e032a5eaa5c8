"""The `softlabel` command: parses options, calls the phases, prints. No logic of its own."""

from __future__ import annotations

import json
import sys

import click

from softlabel.errors import UserError


class _Group(click.Group):
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"softlabel: error: {e}", err=True)
            sys.exit(2)


def _levels(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip().lower() for v in value.split(",") if v.strip()]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="softlabel")
def main() -> None:
    """Cached knowledge distillation for YOLO detectors: dump a teacher once, train many students."""


@main.command()
@click.option("--teacher", required=True, help="Ultralytics detection checkpoint (.pt) of the teacher, e.g. yolov8x.pt.")
@click.option("--data", required=True, help="Ultralytics data.yaml; its 'train' split is replayed and cached.")
@click.option("--out", required=True, help="Cache store to write: a folder (cache.zarr) or an fsspec URL (s3://..., memory://...).")
@click.option("--views", default=1, show_default=True, help="Mosaic views per image; student epoch e replays view e mod VIEWS.")
@click.option("--close-views", default=1, show_default=True, help="Closing (no-mosaic) views for the student's last close_mosaic epochs.")
@click.option("--imgsz", default=640, show_default=True, help="Square input size of teacher and students (multiple of 32).")
@click.option("--batch", default=16, show_default=True, help="Teacher batch size.")
@click.option("--device", default="cpu", show_default=True, help="Teacher device: cpu, 0, 1, ... or cuda:N (AMP on CUDA).")
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes replaying augmentations.")
@click.option("--seed", default=0, show_default=True, help="Augmentation seed; students replay the same seed.")
@click.option("--augment", "augment", default=None, help="Augmentation YAML [default: configs/augment/default.yaml, Ultralytics' defaults].")
@click.option("--levels", default=None, help="Feature levels to keep, comma-separated (e.g. p4,p5) [default: all].")
@click.option("--no-features", is_flag=True, help="Store head outputs only, no neck features.")
@click.option("--codec", default=None, help="Compression preset: blosc-zstd (default), blosc-lz4, zstd, none.")
@click.option("--shard-size", default=16, show_default=True, help="Samples per shard (the unit of writing and of resume).")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out and start over.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def dump(teacher, data, out, views, close_views, imgsz, batch, device, workers, seed, augment, levels, no_features, codec, shard_size, overwrite, quiet):
    """Run the teacher once over replayed augmentations and cache its outputs.

    Running the same command again resumes at the first unfinished shard; a store written with
    other settings is refused with the list of what differs.
    """
    from softlabel.cache.codecs import DEFAULT_CODEC
    from softlabel.dump import DumpSettings, run_dump

    settings = DumpSettings(
        teacher=teacher, data=data, out=out, views=views, close_views=close_views, imgsz=imgsz, batch=batch,
        device=device, workers=workers, seed=seed, augment=augment, levels=_levels(levels), features=not no_features,
        overwrite=overwrite, codec=codec or DEFAULT_CODEC, shard_size=shard_size, progress=not quiet,
    )
    result = run_dump(settings)
    click.echo(
        f"{result.out}: {result.samples_done} sample-views written in {result.shards_written} shards "
        f"({result.skipped_shards} shards were already done); views {', '.join(result.views)}"
    )


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable self-description as JSON.")
def info(store, as_json):
    """Describe a cache: teacher, data, augmentation, views done, bytes on disk per tensor."""
    from softlabel.cache.info import render, summarize

    summary = summarize(store)
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


if __name__ == "__main__":
    main()
