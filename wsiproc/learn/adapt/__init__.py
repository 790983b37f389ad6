"""Unsupervised domain adaptation over a whole cohort (`wsiproc adapt`); the recipes are described in `run`.

One job per module, bottom to top:

- `views`: the consistency recipe's test-time views (`VIEWS`, `predict_views`).
- `config`: `RECIPES` and `AdaptConfig`, every parameter of an adaptation.
- `pseudo_labels`: confidence maps → pseudo-labels (`paper_labels`, `consistent_labels`, `PseudoLabels`) and the
  block targets drawn from them (`block_targets`; `BACKGROUND`, `NUCLEUS`, `UNSURE`).
- `store`: one slide's mined blocks (`MinedSlide`), the resumable zarr store of a cohort's (`BlockStore`), and
  training batches from it (`StoreSampler`).
- `mining`: slides read through the model: a slide's pseudo-labelled blocks (`mine_slide`, a fair reservoir), a
  cohort's into the store (serial or on a dask client), and the candidate peaks of random tissue tiles.
- `calibration`: the cohort's confidences (and colours) folded into the model (`calibrate_cohort`), and a model's
  training statistics (`measure_reference`).
- `drift`: the cohort's own statistics after fine-tuning: the threshold that gives the student its teacher's
  nucleus count on the sampled tiles, folded in (`match_density`, `DensityCheck`).
- `run`: `adapt` itself: calibrate, mine, fine-tune, match the density, colours beside the model, provenance.
"""
from .calibration import calibrate_cohort, measure_reference
from .config import RECIPES, STUDENT_AUGMENTS, AdaptConfig
from .drift import DensityCheck, match_density
from .mining import mine_slide
from .pseudo_labels import BACKGROUND, NUCLEUS, UNSURE, PseudoLabels, block_targets, consistent_labels, paper_labels
from .run import adapt
from .store import BlockStore, MinedSlide, StoreSampler
from .views import VIEWS, predict_views

__all__ = ["AdaptConfig", "BACKGROUND", "BlockStore", "DensityCheck", "MinedSlide", "NUCLEUS", "PseudoLabels", "RECIPES", "StoreSampler",
           "UNSURE", "VIEWS", "adapt", "block_targets", "calibrate_cohort", "consistent_labels", "measure_reference",
           "match_density", "mine_slide", "paper_labels", "predict_views", "STUDENT_AUGMENTS"]
