"""The image score's rule, chosen on the validation set: one chooser for both methods.

The candidates: the mean of the map's k largest values for k in SCORE_TOP_KS and the model's own k (1 is the
maximum), each of the map as it is or of its z against the maps of good training images, place by place
(models/map_reference.py). The one with the best validation image AUROC (held-out good images, each also
with a fixed-seed synthetic anomaly) is kept; ties keep the method's own rule (DeCo-Diff's paper: the
maximum; DiffusionAD: the mean of its top_k). The map itself does not change, so the networks run once and
each candidate only scores the same maps again. Test labels are never looked at.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..evaluation.metrics import image_auroc

SCORE_TOP_KS = (1, 10, 50)   # the top-k candidates besides the model's own; 1 is the map's maximum
REFERENCE_IMAGES = 64        # good training images (per category) whose maps make the score's reference

# (category, maps [N, 1, H, W]) -> scores [N], under the rule the model's config holds at the time
ScoreMaps = Callable[[str, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def choose_score_rule(model: torch.nn.Module, maps: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                      score_maps: ScoreMaps, default: tuple[bool, int],
                      top_ks: tuple[int, ...] = SCORE_TOP_KS) -> dict:
    """Set model.config's (score_reference, top_k) to the rule with the best mean validation image AUROC over
    the categories, given each category's validation maps [N, H, W] and labels; `default` wins ties.
    Returns the choice and every candidate's figure."""
    figures = {}
    for reference, k in candidate_rules(default, top_ks):
        model.config.score_reference, model.config.top_k = reference, k
        figures[reference, k] = float(np.mean([
            image_auroc(labels[name], score_maps(name, torch.from_numpy(category_maps)[:, None]).numpy())
            for name, category_maps in maps.items()]))
    best = best_rule(figures, default)
    model.config.score_reference, model.config.top_k = best
    return {"chosen": {"score_reference": best[0], "top_k": best[1]},
            "default": {"score_reference": default[0], "top_k": default[1]},
            "scores": {rule_name(r, k): round(v, 4) for (r, k), v in figures.items()}}


def candidate_rules(default: tuple[bool, int], top_ks: tuple[int, ...] = SCORE_TOP_KS) -> list[tuple[bool, int]]:
    """Every (score_reference, top_k) candidate, in the order ties are broken after the default."""
    return [(reference, k) for reference in (False, True) for k in sorted({*top_ks, default[1]})]


def best_rule(figures: dict[tuple[bool, int], float], default: tuple[bool, int]) -> tuple[bool, int]:
    """The candidate with the best validation figure; `default` wins ties."""
    return max(figures, key=lambda rule: (figures[rule], rule == default))


def rule_name(reference: bool, top_k: int) -> str:
    return f"{'reference' if reference else 'map'} top-{top_k}"
