"""Which cached view each student epoch replays."""

from __future__ import annotations

import math
from dataclasses import dataclass

from softlabel.replay import View
from softlabel.views import FIT_REPLAYS


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

    @property
    def mosaic_epochs(self) -> int:
        return self.epochs - min(self.close_mosaic, self.epochs)

    @property
    def replays_per_view(self) -> float:
        return self.mosaic_epochs / self.views


def views_advice(plan: ViewPlan) -> str | None:
    """A warning when each mosaic view would be replayed more often than students were measured to learn from."""
    if plan.replays_per_view <= FIT_REPLAYS:
        return None
    return (f"each mosaic view is replayed {plan.replays_per_view:.1f} times ({plan.mosaic_epochs} mosaic epochs over "
            f"{plan.views} views): past about {FIT_REPLAYS} replays a student fits the cached outputs instead of learning "
            f"from them (README: How many views). Dump with --views {math.ceil(plan.mosaic_epochs / FIT_REPLAYS)} or more "
            "for this schedule.")
