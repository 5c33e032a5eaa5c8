"""Which cached view each student epoch replays."""

from __future__ import annotations

from dataclasses import dataclass

from softlabel.replay import View


@dataclass(frozen=True)
class ViewPlan:
    """Which cached view a student epoch replays: mosaic view e mod K, closing view e mod M at the end."""

    epochs: int
    close_mosaic: int
    views: int
    close_views: int

    def closing(self, epoch: int) -> bool:
        return self.close_mosaic > 0 and epoch >= self.epochs - self.close_mosaic

    def view(self, epoch: int) -> View:
        if self.closing(epoch):
            return View("c", epoch % self.close_views)
        return View("v", epoch % self.views)
