"""What an adaptation does: the recipe (`RECIPES`) and every parameter of it (`AdaptConfig`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..augment import AugmentConfig
from ..training import TrainConfig
from .views import VIEWS

if TYPE_CHECKING:
    from ..calibrate import Calibration

RECIPES = ("calibrate", "consistency", "paper")
#: The student's augmentation when fine-tuning on mined blocks: the paper's thirds (as is, hue shift, noise) or
#: the shipped recipe's photometric one at `stain_sigma` (`wsiproc.learn.augment.photometric`).
STUDENT_AUGMENTS = ("paper", "strong")
#: When the consistency recipe folds in the threshold that keeps the teacher's nucleus count (`adapt.drift`):
#: `familiar`, only for a cohort calibration judged like the training domains (there the teacher's count is the
#: one to keep: measured, the shipped model on crc-dev +0.005 with it, -0.013 without); `always`; `never`.
DENSITY_MATCHES = ("familiar", "always", "never")


@dataclass
class AdaptConfig:
    recipe: str = "consistency"  # consistency (calibrate, then pseudo-label fine-tuning) | calibrate | paper (§UDA)
    align: bool = True  # consistency: calibrate first (wsiproc.learn.calibrate)
    colour: bool = False  # calibration also aligns the cohort's colours (measured: helps one lab, hurts others)
    slide_colours: bool = True  # calibration: a cohort less confident than training gets per-slide colours (detection.colour)
    calibration_tiles: int = 8  # tiles per slide sampled for the cohort's colour and confidence statistics
    high: float = 0.8
    low: float = 0.5
    views: int = 4  # consistency: test-time views averaged and required to agree (1..4)
    ignore_below: float = 0.3  # consistency: candidates from here up to `low` are unsure, not background
    random_fraction: float = 0.33  # consistency: share of blocks at random tissue positions
    block_px: int = 64
    mine_tiles: int | None = 64  # tissue tiles per slide read for blocks, drawn at random (None: every tile)
    max_blocks: int = 20000
    per_slide_cap: int | None = None  # None: max_blocks spread evenly over the cohort
    epochs: int = 2
    steps_per_epoch: int | None = None  # None: one pass over the mined blocks per epoch
    batch_size: int = 16
    learning_rate: float = 1e-4
    seed: int = 0
    student_augment: str = "strong"  # consistency: paper | strong (stain, brightness, contrast, blur, noise)
    match_density: str = "familiar"  # consistency: familiar | always | never (DENSITY_MATCHES, adapt.drift)
    stain_sigma: float = 0.05  # strong: per-stain scale and shift σ in HED optical density (the shipped recipe's)
    disk_radius_px: int = TrainConfig.disk_radius_px  # targets as in training: one disk per nucleus

    def validate(self) -> "AdaptConfig":
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)} (got {self.recipe!r})")
        if self.student_augment not in STUDENT_AUGMENTS:
            raise ValueError(f"student_augment must be one of {', '.join(STUDENT_AUGMENTS)} (got {self.student_augment!r})")
        if self.match_density not in DENSITY_MATCHES:
            raise ValueError(f"match_density must be one of {', '.join(DENSITY_MATCHES)} (got {self.match_density!r})")
        if not 0 <= self.stain_sigma <= 0.5:
            raise ValueError(f"stain_sigma must be in [0, 0.5] (got {self.stain_sigma})")
        if not 0 < self.low <= self.high < 1:
            raise ValueError(f"thresholds must satisfy 0 < low <= high < 1 (got low {self.low}, high {self.high})")
        if not 0 < self.ignore_below <= self.low:
            raise ValueError(f"ignore_below must satisfy 0 < ignore_below <= low (got {self.ignore_below})")
        if not 1 <= self.views <= len(VIEWS):
            raise ValueError(f"views must be 1..{len(VIEWS)} (got {self.views})")
        if not 0 <= self.random_fraction <= 1:
            raise ValueError(f"random_fraction must be in [0, 1] (got {self.random_fraction})")
        if self.block_px % 4 or self.block_px < 16 or self.block_px > 64:
            raise ValueError(f"block_px must be a multiple of 4 in 16..64 (the tile halo is 32 px), got {self.block_px}")
        if self.mine_tiles is not None and self.mine_tiles < 1:
            raise ValueError(f"mine_tiles must be >= 1 or None for every tile (got {self.mine_tiles})")
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 (got {self.max_blocks})")
        if self.calibration_tiles < 1:
            raise ValueError(f"calibration_tiles must be >= 1 (got {self.calibration_tiles})")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: calibration only, no fine-tuning; got {self.epochs})")
        return self

    @property
    def aligns(self) -> bool:
        """The paper's recipe stays the paper's: no calibration before it."""
        return self.recipe == "calibrate" or (self.align and self.recipe != "paper")

    @property
    def student_augmentation(self) -> AugmentConfig | None:
        """The `StoreSampler`'s augmentation: None for the paper's thirds."""
        strong = self.student_augment == "strong" and self.recipe == "consistency"  # the paper recipe stays the paper's
        return AugmentConfig(hed_sigma=self.stain_sigma) if strong else None

    def matches_density(self, calibration: "Calibration | None") -> bool:
        """Whether the student gets its teacher's nucleus count. The paper's recipe stays the paper's. A cohort
        judged foreign (calibration moved its threshold or colours) keeps the student's own count: there the teacher's count
        is itself suspect (measured on MoNuSeg left out, a teacher of recall 0.75: matching cost 0.02 F1). Without
        a calibration (no reference statistics) the count is kept, which bounds over-detection."""
        if self.recipe != "consistency" or self.match_density == "never":
            return False
        return self.match_density == "always" or calibration is None or calibration.familiar

    @property
    def fine_tunes(self) -> bool:
        return self.recipe != "calibrate" and self.epochs > 0
