"""The 2D paper model as a ``Recipe``: slices, 128x128 patches, extreme augmentation, ResUNet2D."""

from __future__ import annotations

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.recipes.base import (CaseData, PreparedCase, ProgressCallback, Recipe, RecipeConfig,
                                          pseudo_label_fractions)
from ExtremeAugLogic.recipes.slice2d import augment, patches, preprocess
from ExtremeAugLogic.recipes.slice2d.consistency import WeakToStrong
from ExtremeAugLogic.recipes.slice2d.network import ResUNet2D
from ExtremeAugLogic.recipes.slice2d.views import VIEW_SETS, averaged_over_views, views_for
from ExtremeAugLogic.recipes.windows import window_probabilities

# Defaults chosen by measurement (docs/results/tuning-2d.md): whole 128 px slices as patches
# keep the context that tells L1 from L5 and train ~4x faster than 128 px patches of 256 px
# slices. The paper's configuration is PAPER_2D below.
DEFAULTS_2D = {
    "slice_axis": "auto",        # auto | axial | coronal | sagittal
    "inplane_size": 128,
    "inplane_fit": "pad",        # pad (keep aspect, reflect-pad) | stretch (the paper)
    "pad_mode": "reflect",
    "intensity": "match",        # match | percentile | none
    "patch_size": 128,
    "stride": 64,
    "sampling": "grid",          # grid (the paper) | foreground
    "fg_fraction": 0.67,
    "level": 50,                 # transforms per base patch; 0 = a fresh one every sample
    "rotation_deg": 20.0,
    "scale": [0.8, 1.2],
    "translation_px": 25.0,      # px of the resampled slice: the paper's 50 px of 256 px
    # Shape augmentation, off: a stretch (rows by a in [1/a, a], columns by 1/a) and a smooth bending
    # (displacements up to elastic_px px, augment.bend_grid); aspect 1.15 with 4 px on 5 training scans
    # x 14 at 1000 iterations: 0.803 / 0.691 -> 0.805 / 0.684, within the noise (generalisation-explore).
    "aspect": 1.0,
    "elastic_px": 0.0,
    "padding": "zeros",          # outside the slice: zeros | reflection | reflection-background (augment.sample_patches)
    # Intensity augmentation (augment.IntensityRanges), chosen with the cross-scan protocol
    # (docs/results/generalisation-explore): with it, 3 training scans x 14 unseen scans went from
    # binary 0.698 / per-structure 0.372 to 0.775 / 0.656 at 2 minutes; gamma/contrast alone had
    # lowered Dice on one split of vb11..vb15 (tuning-2d.md).
    "gamma": 1.4,                # gamma in [1/g, g]
    "contrast": 1.3,             # contrast in [1/c, c]
    "brightness": 0.1,           # shift in [-b, b]
    "bias_field": 0.3,           # smooth shading exp(f), |f| <= this
    "noise_std": 0.05,           # Gaussian noise, std up to this
    # A random increasing intensity curve for half the samples (augment.remap_intensity): binary Dice
    # 0.768 -> 0.794 on 3 x 14 unseen pairs at 300 iterations, per-structure 0.607 -> 0.603, better on each
    # training scan. 2.5D input (context_slices=1, 2 slices apart) gave 0.669: off (generalisation-explore).
    "remap": 0.5,
    # A random shallow-network blend for half the samples (augment.random_convolution): at 8 minutes,
    # 5 training scans x 14 with the worklist, 0.814 / 0.707 -> 0.823 / 0.714, binary better on 4 of 5
    # runs, per vertebra on 3, worst pair 0.692 -> 0.701, at no CPU cost; at 1000 iterations on the GPU
    # 0.805 / 0.694 -> 0.816 / 0.708 (generalisation-explore, tenth round). A second 8-minute run, both
    # methods: 0.825 / 0.693 against the plain script's 0.764 / 0.398 (eleventh round).
    "random_conv": 0.5,
    # The labelled structures' intensities times one factor per sample in [1/s, s], faded across their
    # outline (augment.vary_structure_intensity), for other scans' darker or brighter marrow: off. At 615
    # iterations, 5 training scans x 14, s = 1.4 gave 0.830 / 0.773 -> 0.834 / 0.810 with seed 0, but with
    # seed 1 0.833 / 0.800 -> 0.823 / 0.751; over both seeds 0.832 / 0.787 -> 0.829 / 0.781, the seed-0 gain
    # being three level shifts of seed 0's run without it.
    # Discs (6 pairs, 600 iterations, same code): 0.752 / 0.688 -> 0.763 / 0.589, one pair a level off
    # (generalisation-explore, seventeenth and eighteenth rounds).
    "structure_intensity": 1.0,
    "fov_cut": 0.0,              # probability of ending a sample's field of view early at one edge
    "fov_cut_max": 0.4,          # ... by up to this fraction of the patch (augment.cut_field_of_view)
    "fov_cut_edges": "any",      # any: all four edges | order: the two ends of the axis the structures are ordered along
    "objects": "ordered-split",  # after prediction: off | per-object | ordered | ordered-aligned | ordered-split
                                 # (inference.labels_from_probabilities); ordered: per-structure Dice 0.275 -> 0.372
                                 # on 42 unseen pairs, same models; ordered-split (objects as long as several
                                 # structures cut first): 0.680 -> 0.707 on 70 pairs at 8 minutes, 9 better, 1 worse
                                 # (generalisation-explore, seventh round)
    "level_range": "off",        # registration: the training scans, rigidly registered onto each scan, say where its
                                 # first and last structures lie; ordered rules drop objects well beyond them
                                 # (inference.level_range, structure_order.assign_structures). Off: on 3 training
                                 # scans x 14 at 1000 iterations, binary 0.828 -> 0.839, per vertebra 0.745 ->
                                 # 0.731 (the registration slips by a level on some pairs; generalisation-explore)
    "unlabeled": "self-training",  # the worklist scans: off | self-training (training.trainer, pseudo-labels) | consistency;
                                 # at 8 minutes, 5 training scans x 14 with the 14 as worklist: 0.803 / 0.613 ->
                                 # 0.812 / 0.671, better per vertebra on each training scan (generalisation-explore,
                                 # sixth round); no worklist: no change
    # The fraction of the budget after which the worklist is pseudo-labelled, or a list of increasing fractions:
    # at each the worklist is labelled again by the model so far and its pseudo-labels replace the earlier ones
    # (training.trainer, pseudo_label_fractions). One round stays: 8-minute protocol, seed 0, in one sitting, [0.4, 0.7]
    # against 0.6 gave 0.840 / 0.801 -> 0.843 / 0.820, 23 pairs better and 19 worse, the per-vertebra gain two level
    # shifts of one model (generalisation-explore, twenty-fifth round).
    "pseudo_label_at": 0.6,
    "pseudo_label_confidence": 0.9,  # a scan joins when its mean top probability inside the structures is this high
    # ... or is among the most confident share of the worklist (0: the threshold alone). Off: at 615
    # iterations (8 minutes on an AVX2-only host) no scan reaches 0.9, and the most confident half taken
    # at iteration 369 gave 0.830 / 0.773 -> 0.817 / 0.755, 38 of 70 pairs worse (generalisation-explore,
    # sixteenth round).
    "pseudo_label_share": 0.0,
    # The labelling of the pseudo-labels: as-predicted (the model's own `objects` rule, as predictions are
    # labelled) | ordered-largest (the ordered rule with the chain of the largest parts, the first rule). 8-minute
    # protocol, 5 training scans x 14, both seeds: 0.845 / 0.802 -> 0.850 / 0.825; seed 0 in one sitting at equal
    # steps +0.009 / +0.018 (generalisation-explore, twenty-third round).
    "pseudo_label_rule": "as-predicted",
    # A level check on the pseudo-labels: off | registration (the delineated scans, rigidly registered onto
    # the worklist scan, say where its first and last structures lie; a pseudo-label more than half a pitch
    # off at either end does not join: training.trainer, level_range.level_verdict). Off: it drops shifted
    # pseudo-labels (10 of 42 candidates, 4 a whole level off), but on the 8-minute protocol, seed 0, 0.852 / 0.820
    # -> 0.846 / 0.814, 27 of 70 pairs worse and 13 better, level-shifted pairs 3 -> 3: vb13's shifts are
    # learnt from its own scan (generalisation-explore, twenty-fourth round).
    "pseudo_label_check": "off",
    # Weak-to-strong consistency (unlabeled=consistency, consistency.WeakToStrong, the FixMatch family) instead
    # of self-training: from this fraction of the budget each step also takes consistency_batch worklist
    # slices; the model's sure pixels (top probability >= consistency_threshold) on each slice as it is
    # teach the same slice under the training's augmentation, the term weighted by consistency_weight.
    # The four values were set before any measurement (FixMatch's threshold and weight, half the batch). Not the
    # default: 3 training scans x 14 at 8 minutes, seed 0, in one sitting, self-training 0.857 / 0.821 against
    # consistency 0.842 / 0.819, binary lower on 25 of 42 pairs, 1.7x the time a step (generalisation-explore,
    # twenty-eighth round).
    "consistency_from": 0.3,
    "consistency_threshold": 0.95,
    "consistency_weight": 1.0,
    "consistency_batch": 4,
    "context_slices": 0,         # 2.5D input: this many neighbouring slices on each side as extra channels
    "context_step": 1,           # ... this many slices apart
    # Batch 8, not 16: the same patches a second, so twice the steps in the same time. 5 training scans x 14
    # with the 14 as worklist, two seeds, 1,230 iterations of 8 against 615 of 16 (4 % more time, AVX-512
    # host): 0.825 / 0.772 -> 0.834 / 0.791, binary higher on 9 of 10 runs and on 61 of 140 pairs (18
    # lower), peak memory 1.29 -> 1.17 GB. Discs, two seeds: 0.784 / 0.753 -> 0.806 / 0.665 (binary up with both;
    # seed 0 named every disc of two pairs one level off; generalisation-explore, twentieth round).
    "batch_size": 8,
    "learning_rate": 2e-3,
    "base_features": 8,
    "max_features": 128,
    "depth": 5,
    # Dropout in every residual unit, and a saved model that is the mean of the weights over the last
    # fraction of the budget: off. 5 training scans x 14 at 1000 iterations (generalisation-explore,
    # tenth round): dropout 0.2 0.805 / 0.694 -> 0.813 / 0.739, but 1.65x the CPU time per iteration,
    # and at the 8-minute CPU budget below the defaults on both training scans measured; the mean of
    # the last half 0.807 / 0.682.
    "dropout": 0.0,
    "average_weights": 0.0,
    "overlap": 0.5,
    # Test-time views (views.VIEW_SETS): each slice also predicted rotated by +/-10 degrees ("rotate"),
    # scaled by 0.9 and 1.1 ("scale") or both ("rotate-scale"), the probabilities averaged; each view
    # costs one more pass of the network. Off: on the same 5 models x 14 unseen scans (615 iterations)
    # 0.830 / 0.773 -> 0.833 / 0.779 (rotate), 0.832 / 0.774 (scale), binary better on 13 pairs and
    # worse on 9, one level shift mended and one made, at 2.2x the prediction time (2.1 -> 4.7 s a
    # scan on this 2-core CPU; generalisation-explore, nineteenth round).
    "test_views": "off",
    "offline_dir": None,         # read an offline N-fold dataset instead of augmenting live
}

PSEUDO_LABEL_RULES = ("ordered-largest", "as-predicted")
UNLABELED_MODES = ("off", "self-training", "consistency")

# The paper's own configuration (Gaonkar et al.), for reproduction: 256 px slices, 128 px grid
# patches with stride 64, +/-50 px shifts, 16 base filters.
PAPER_2D = {**DEFAULTS_2D, "batch_size": 16, "inplane_size": 256, "inplane_fit": "stretch", "sampling": "grid",
            "translation_px": 50.0, "base_features": 16, "max_features": 256, "objects": "off", "unlabeled": "off",
            "intensity": "match", "gamma": 1.0, "contrast": 1.0, "brightness": 0.0, "bias_field": 0.0, "noise_std": 0.0,
            "remap": 0.0, "random_conv": 0.0, "structure_intensity": 1.0, "fov_cut": 0.0, "dropout": 0.0, "average_weights": 0.0,
            "level_range": "off", "pseudo_label_check": "off"}


def _cut_edges(rule: str, labels: np.ndarray) -> tuple[int, ...]:
    """The patch edges a field-of-view cut may take (augment.cut_field_of_view's numbering).

    "any": all four. "order": the two ends of the in-slice axis along which the training slices
    show their structures in order (rows: top and bottom; columns: left and right), so a cut
    removes the first or last structures of the chain and the model cannot name a level by
    counting from the image edge; all four when the order lies across slices or is absent.
    """
    if rule == "any":
        return (0, 1, 2, 3)
    if rule != "order":
        raise InputError(f"fov_cut_edges must be 'any' or 'order', not {rule!r}")
    from ExtremeAugLogic.inference.structure_order import detect_structure_order  # inference imports recipes
    order = detect_structure_order([labels])
    axis = order["axis"] if order else None
    return {1: (0, 1), 2: (2, 3)}.get(axis, (0, 1, 2, 3))


def _check_number(settings: dict, key: str, low: float, high: float, what: str, top_included: bool = True) -> None:
    """Refuse ``settings[key]`` with one line unless it is a number (not a bool) in [low, high]
    (or [low, high) when ``top_included`` is False)."""
    value = settings[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (low <= value <= high if top_included else low <= value < high):
        raise InputError(f"{key} must be {what}, not {value!r}")


class Recipe2D(Recipe):
    """The extreme-augmentation paper's method (Gaonkar et al.), with measured improvements."""

    kind = "2d"

    def __init__(self, settings: dict):
        settings = dict(settings or {})
        preset = settings.pop("preset", None)
        if preset not in (None, "default", "paper"):
            raise InputError(f"preset {preset!r}: must be default or paper")
        base = PAPER_2D if preset == "paper" else DEFAULTS_2D
        self.settings = {**base, **settings, "preset": preset or "default"}
        if self.settings["pseudo_label_rule"] not in PSEUDO_LABEL_RULES:
            raise InputError(f"pseudo_label_rule must be one of {', '.join(PSEUDO_LABEL_RULES)}, "
                             f"not {self.settings['pseudo_label_rule']!r}")
        if self.settings["pseudo_label_check"] not in ("off", "registration"):
            raise InputError(f"pseudo_label_check must be 'off' or 'registration', "
                             f"not {self.settings['pseudo_label_check']!r}")
        if self.settings["unlabeled"] not in UNLABELED_MODES:
            raise InputError(f"unlabeled must be one of {', '.join(UNLABELED_MODES)}, not {self.settings['unlabeled']!r}")
        _check_number(self.settings, "consistency_from", 0.0, 1.0, "a fraction in [0, 1)", top_included=False)
        _check_number(self.settings, "consistency_threshold", 0.0, 1.0, "a probability in [0, 1]")
        _check_number(self.settings, "consistency_weight", 0.0, 100.0, "a number in [0, 100]")
        if not isinstance(self.settings["consistency_batch"], int) or isinstance(self.settings["consistency_batch"], bool) \
                or self.settings["consistency_batch"] < 1:
            raise InputError(f"consistency_batch must be a whole number >= 1, not {self.settings['consistency_batch']!r}")
        if self.settings["level_range"] not in ("off", "registration"):
            raise InputError(f"level_range must be 'off' or 'registration', not {self.settings['level_range']!r}")
        for key in ("dropout", "average_weights"):
            _check_number(self.settings, key, 0.0, 1.0, "a number in [0, 1)", top_included=False)
        _check_number(self.settings, "pseudo_label_share", 0.0, 1.0, "a number in [0, 1]")
        pseudo_label_fractions(self.settings)
        _check_number(self.settings, "structure_intensity", 1.0, 4.0, "a factor in [1, 4] (1 = off)")
        views_for(self.settings["test_views"])

    @classmethod
    def default_settings(cls) -> dict:
        return dict(DEFAULTS_2D)

    def fit_config(self, cases: list[CaseData], num_classes: int) -> dict:
        template = None
        if self.settings["intensity"] == "match":
            template = preprocess.make_template(cases[0].image)
        return RecipeConfig(kind=self.kind, num_classes=int(num_classes), settings=dict(self.settings),
                            template=template, template_case=cases[0].case_id)

    def build_model(self, config: dict):
        s = config["settings"]
        return ResUNet2D(_out_channels(config), s["base_features"], s["depth"], s["max_features"],
                         in_channels=_in_channels(s), dropout=float(s.get("dropout", 0.0)))

    def preprocess(self, config: dict, image, label=None) -> PreparedCase:
        """Square slices of the scan (and label) along the slice axis, with the slice plan."""
        stack = preprocess.preprocess_case(image, label, config["settings"], config.get("template"))
        return PreparedCase(stack.images, stack.labels, stack.geometry)

    def make_sampler(self, config: dict, cases: list[CaseData], device, seed: int, rank: int = 0):
        s = config["settings"]
        if s.get("offline_dir"):
            if _in_channels(s) > 1:
                raise InputError("offline_dir holds single-slice patches; it cannot train 2.5D input "
                                 "(context_slices > 0)")
            return augment.OfflineSampler(s["offline_dir"], s["batch_size"], seed, device, rank=rank)
        images, labels, centres = self.training_slices(config, cases, seed)
        return augment.OnTheFlySampler(
            torch.from_numpy(images).to(device), torch.from_numpy(labels)[:, None].to(device),
            centres, s["level"], augment.AugmentationRanges.from_settings(s), s["patch_size"],
            s["batch_size"], seed, s["padding"], intensity=augment.IntensityRanges.from_settings(s), rank=rank,
            fov_cut=float(s.get("fov_cut", 0.0)), fov_cut_max=float(s.get("fov_cut_max", 0.4)),
            fov_cut_edges=_cut_edges(s.get("fov_cut_edges", "any"), labels),
            structure_intensity=float(s.get("structure_intensity", 1.0)))

    def training_slices(self, config: dict, cases: list[CaseData], seed: int):
        """All cases' slices (S, C, H, W: C = 1 + 2 * context_slices) stacked, labels (S, H, W),
        and the base patch centres (slice ids offset per case)."""
        s = config["settings"]
        stacks, all_centres, offset = [], [], 0
        for i, case in enumerate(cases):
            stack = self.preprocess(config, case.image, case.label)
            centres = patches.base_centres(stack.label, s["patch_size"], s["stride"], s["sampling"],
                                           s["fg_fraction"], seed + i)
            centres[:, 0] += offset
            offset += len(stack.image)
            stacks.append(stack)
            all_centres.append(centres)
        images = np.concatenate([self.input_channels(s, st.image) for st in stacks])
        labels = np.concatenate([st.label for st in stacks])
        return images, labels, np.concatenate(all_centres)

    def consistency_term(self, config: dict, images: list, device, seed: int, rank: int = 0) -> WeakToStrong:
        """``WeakToStrong`` on every slice of the unlabeled ``images`` (SimpleITK), as the network sees them."""
        s = config["settings"]
        slices = np.concatenate([self.input_channels(s, self.preprocess(config, image).image) for image in images])
        return WeakToStrong(torch.from_numpy(np.ascontiguousarray(slices)).to(device),
                            augment.AugmentationRanges.from_settings(s), augment.IntensityRanges.from_settings(s),
                            s["patch_size"], int(s["consistency_batch"]), float(s["consistency_threshold"]), seed,
                            s["padding"], rank)

    def loss_function(self, config: dict):
        if _out_channels(config) == 1:
            return DiceLoss(sigmoid=True, batch=True)
        return DiceCELoss(softmax=True, to_onehot_y=True, batch=True)

    def optimizer(self, model, config: dict):
        lr = float(config["settings"]["learning_rate"])
        return torch.optim.Adam(model.parameters(), lr=lr), None

    @torch.no_grad()
    def predict_probabilities(self, model, config: dict, image, device, tta: bool = False,
                              progress: ProgressCallback = None) -> np.ndarray:
        s = config["settings"]
        stack = self.preprocess(config, image)
        out = self.slice_probabilities(model, config, self.input_channels(s, stack.image), device, tta,
                                       views_for(s.get("test_views", "off")), progress)
        return preprocess.from_slices(out, stack.geometry)

    @torch.no_grad()
    def slice_probabilities(self, model, config: dict, slices: np.ndarray, device, tta: bool = False,
                            views=VIEW_SETS["off"], progress: ProgressCallback = None) -> np.ndarray:
        """(K+1, S, H, W) probabilities of the network's (S, C, H, W) input slices, averaged over ``views``."""
        s = config["settings"]
        roi = (s["patch_size"], s["patch_size"])
        chunk = 16 if str(device) == "cpu" else 64
        out = np.zeros((config["num_classes"], len(slices), *slices.shape[2:]), dtype=np.float32)
        for start in range(0, len(slices), chunk):
            x = torch.from_numpy(slices[start:start + chunk]).to(device)
            p = averaged_over_views(lambda v: window_probabilities(model, v, roi, device, overlap=s["overlap"], tta=tta),
                                    x, views, s.get("padding", "zeros"))
            out[:, start:start + len(x)] = p.permute(1, 0, 2, 3).cpu().numpy()
            if progress:
                progress(min(start + chunk, len(slices)), len(slices))
        return out

    @staticmethod
    def input_channels(settings: dict, slices: np.ndarray) -> np.ndarray:
        """The network's input for (S, H, W) slices: (S, C, H, W), 2.5D when ``context_slices`` > 0."""
        return preprocess.with_neighbours(slices, int(settings.get("context_slices", 0)),
                                          int(settings.get("context_step", 1)))


def _in_channels(settings: dict) -> int:
    return 1 + 2 * int(settings.get("context_slices", 0))


def _out_channels(config: dict) -> int:
    """One sigmoid channel for a single structure, K+1 softmax channels otherwise."""
    return 1 if config["num_classes"] == 2 else config["num_classes"]
