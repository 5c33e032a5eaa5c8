"""Checks that what a trainer reads belongs to its run: the cache's data and settings, each batch's epoch, and a
student whose head can learn from the teacher's."""

from __future__ import annotations


from softlabel.checks import check_class_names
from softlabel.errors import UserError


def check_epoch(batch: dict, epoch: int) -> None:
    """A batch must be replayed for the epoch being trained; anything else is a stale worker."""
    got = sorted(set(batch["epoch"].tolist()))
    if got != [epoch]:
        raise RuntimeError(f"batch replayed for epoch(s) {got} arrived in epoch {epoch}: a DataLoader worker holds a stale epoch")


def check_cache_matches(desc, spec, index, imgsz: int, where: str) -> None:
    """Contract 4: refuse a cache (its CacheDescription) that belongs to other data, classes or image size, saying what differs."""
    d = desc.data
    check_class_names(list(desc.teacher.names), list(spec.names), where, spec.yaml_path)
    if d.count != len(index) or d.images_hash != index.list_hash():
        if d.skipped is not None and sorted(d.skipped) != sorted(index.skipped_names()):
            raise UserError(
                f"{where}: the dump skipped {sorted(d.skipped) or 'no images'} but {spec.yaml_path} now skips "
                f"{sorted(index.skipped_names()) or 'no images'} (Ultralytics' image and label checks)"
            )
        raise UserError(
            f"{where}: the cache was dumped from other data ({d.count} images, list hash {d.images_hash[:12]}) "
            f"than {spec.yaml_path} ({len(index)} images, list hash {index.list_hash()[:12]})"
        )
    if desc.augment.imgsz != imgsz:
        raise UserError(f"{where}: the cache was dumped at imgsz {desc.augment.imgsz} but training asks for imgsz {imgsz}")


def check_config_fits_cache(config, desc, where: str) -> None:
    """Refuse a distillation config that reads what the store (its CacheDescription) does not hold: whole
    feature maps from a store of feature rows, or more positions than the feature rows it keeps per image."""
    if not desc.storage.feature_rows:
        return
    f = desc.storage.head_sparse.rows
    for name, term in config.of("feat").items():
        if term.positions is None:
            raise UserError(
                f"{config.source}: '{name}' (loss {term.loss}, positions: all) needs whole feature maps, but {where} holds "
                f"feature vectors at each image's {f} most confident kept anchors only; dump with 'softlabel dump --features dense', "
                f"or use a config with 'positions: P' (P <= {f}) and a row loss such as mimic"
            )
        if term.positions > f:
            raise UserError(
                f"{config.source}: '{name}' positions: {term.positions} is more than the {f} anchors per image {where} "
                f"holds feature vectors for; use positions <= {f}, or dump with 'softlabel dump --feature-rows {term.positions}' "
                f"or more (with --head-topk at least that)"
            )


def check_student_fits(student: str, model, teacher, where: str) -> None:
    """The head a student is built with against its teacher's, before any student trains: a detection head
    softlabel trains, predicting at the teacher's strides (levels). Box forms may differ (DFL bins or
    distances: the box terms say how they meet); the class count is set from the data by Ultralytics."""
    from softlabel.heads import head_spec

    spec = head_spec(model, student)
    if list(spec.strides) != [int(s) for s in teacher.strides]:
        raise UserError(f"{student}: the student predicts at strides {list(spec.strides)} but the teacher of {where} at "
                        f"{list(teacher.strides)}; a student with the teacher's levels is needed")
