"""The training process: ``python -m ExtremeAugLogic train WORKSPACE``.

One run trains one model version on the workspace's training cases within a budget
(minutes or iterations), writes ``status.json`` every ~2 s, checkpoints every minute, and
validates on the fixed validation split. SIGTERM or SIGINT ends it within a few seconds
with a checkpoint that ``--resume`` continues; ``--init-from`` warm-starts from an earlier
version after corrections were added. The version becomes the best model only if it beats
the best on the validation split (see ``Workspace.finish_version``).

Under torchrun the same command trains one version on several processes with
DistributedDataParallel (``training.distributed``): rank 0 alone owns the workspace (lock,
status, log, checkpoints, manifest, validation); every iteration all ranks agree on the
budget fraction and on stopping, so a budget or a SIGTERM stops them at the same iteration.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from ExtremeAugLogic import contract
from ExtremeAugLogic.devices import autocast, is_gpu, resolve_device
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.evaluation.scoring import score_model
from ExtremeAugLogic.inference.level_range import (LevelGuide, guide_for_version, guide_from_cases, has_level_chain,
                                                   level_verdict)
from ExtremeAugLogic.inference.structure_order import detect_structure_order
from ExtremeAugLogic.inference.predict import (load_model, load_weights, pseudo_labels_from_probabilities,
                                               read_config, save_model, to_label_image)
from ExtremeAugLogic.recipes.base import pseudo_label_fractions
from ExtremeAugLogic.recipes.registry import make_recipe
from ExtremeAugLogic.workspace.imageio import case_spacing_zyx
from ExtremeAugLogic.training import distributed
from ExtremeAugLogic.training.plots import plot_training
from ExtremeAugLogic.workspace import CaseData, Workspace, atomic, imageio, status as status_mod
from ExtremeAugLogic.workspace.locking import OwnerLock

DEFAULT_MINUTES_CPU = 8.0
DEFAULT_MINUTES_GPU = 1.0
CHECKPOINT_EVERY_S = 60.0
LOG_EVERY_S = 5.0
VALIDATE_AT = (0.25, 0.5, 0.75)
MAX_PERIODIC_VALIDATION_CASES = 2


def default_minutes(gpu: bool, warm_start: bool) -> float:
    """The wall-clock budget when none is given: 8 min on a CPU, 1 on a GPU; a warm-started
    retrain (``--init-from``) a quarter of that (``contract.RETRAIN_FRACTION``)."""
    minutes = DEFAULT_MINUTES_GPU if gpu else DEFAULT_MINUTES_CPU
    return minutes * contract.RETRAIN_FRACTION if warm_start else minutes


def confident_scans(confidence: dict, threshold: float, share: float) -> list[str]:
    """The worklist scans that join self-training, in the worklist's order: those whose confidence
    reaches ``threshold``, and the most confident ``share`` of all (rounded up; 0: none by rank).

    The absolute threshold depends on how far the model has trained (at 615 iterations no scan of
    the shared set reaches 0.9; at 2,000 most do); the share does not.
    """
    ranked = sorted(confidence, key=lambda case: -confidence[case])
    top = set(ranked[:math.ceil(share * len(ranked))]) if share > 0 else set()
    return [case for case in confidence if confidence[case] >= threshold or case in top]


@dataclass
class TrainRequest:
    """What the user asked for (CLI flags or the Slicer Logic)."""

    workspace: str
    minutes: float | None = None
    iterations: int | None = None
    level: int | None = None
    device: str = "auto"
    resume: bool = False
    init_from: str | None = None
    model: str = "2d"
    settings: dict = field(default_factory=dict)
    seed: int = 0
    progress_bar: bool = True
    unlabeled: bool = True       # learn from the worklist when the model's settings ask for it


class StopRequested(Exception):
    """Raised inside the loop when SIGTERM/SIGINT arrived."""


def train(request: TrainRequest) -> dict:
    """Run one training to its end (or stop); returns a summary of the version.

    Everything the request names is checked before anything is written: a refused request
    (bad budget, nothing to resume, unknown ``--init-from``, no training case, a training
    already running) raises InputError and leaves the workspace as it was, ``status.json``
    included. Under torchrun rank 0 takes the lock and plans; the other ranks get its plan
    (or its refusal) and never write.
    """
    workspace = Workspace.open(request.workspace)
    if request.minutes is not None and request.minutes <= 0:
        raise InputError(f"--minutes {request.minutes}: must be positive")
    if request.iterations is not None and request.iterations <= 0:
        raise InputError(f"--iterations {request.iterations}: must be positive")
    with distributed.join(request.device) as place, contextlib.ExitStack() as held:
        trainer = _Trainer(workspace, request, place)
        trainer.resume_from, trainer.parent = place.lead(lambda: trainer.take_charge(held))
        return trainer.run()


class _Trainer:
    """One training run; see the module docstring."""

    def __init__(self, workspace: Workspace, request: TrainRequest, place: distributed.Place | None = None):
        self.ws, self.req = workspace, request
        self.place = place or distributed.Place()
        self.main = self.place.is_main  # rank 0 (the only process without torchrun): the one that writes
        self.device = self.place.device  # None until ``plan`` on one process
        self.stop_event = threading.Event()
        self.history: list[list] = []  # [iteration, seconds, loss, lr, val_dice]
        self.status = None
        self.version = None
        self.recipe = None
        self.resume_from = None  # (version record, config) when resuming
        self.parent = None

    # ------------------------------------------------------------------ checks, no writes
    def take_charge(self, held: contextlib.ExitStack) -> tuple:
        """Rank 0: own the workspace (``train.lock``, kept in ``held``) and plan; returns the plan for all ranks."""
        held.enter_context(OwnerLock(self.ws.lock_path, "training is already running; stop it first"))
        self.plan()
        self.ws.mark_interrupted()  # we own the lock: any "training" record was left by a dead trainer
        return self.resume_from, self.parent

    def plan(self) -> None:
        """Resolve the request against the workspace; InputError before anything is written."""
        self.device = self.device or resolve_device(self.req.device)
        if not self.ws.case_ids("train"):
            raise InputError(f"{self.ws.path}: no training case yet; add one with 'add' first")
        if self.req.resume:
            self.resume_from = self._resumable()
        else:
            make_recipe(self.req.model, {})  # an unknown model kind is refused here
            self.parent = self._resolve_init_from()

    # ------------------------------------------------------------------ main flow
    def run(self) -> dict:
        if self.main:
            self.status = status_mod.StatusReporter(self.ws.status_path, phase="starting", message="starting training",
                                                    world_size=self.place.world_size)
        else:
            self.status = _NoStatus()
        self._install_signal_handlers()
        try:
            return self._run()
        except StopRequested:
            return self._finish_stopped()
        except InputError as exc:
            self._fail(str(exc))
            raise
        except Exception as exc:  # any crash: the panel must see its text
            self._fail(f"{type(exc).__name__}: {exc}", traceback.format_exc())
            raise
        finally:
            self._restore_signal_handlers()

    def _run(self) -> dict:
        torch.manual_seed(self.req.seed)
        torch.set_flush_denormal(True)  # tiny activations must not slow CPU training down
        self.status.update(phase="preparing", message="loading cases")
        train_cases = self.ws.load_cases("train")
        self.val_cases = self.ws.load_cases("validation") if self.main else []
        num_classes = max(self.ws.structure_names()) + 1
        self.version, config, self.settings = self.place.lead(lambda: self._open_version(train_cases, num_classes))
        if self.recipe is None:  # resuming, or another rank than 0
            self.recipe = make_recipe(config.kind, config.settings)
        checkpoint = None
        if self.resume_from is not None:
            checkpoint = load_weights(self.model_dir / contract.CHECKPOINT_NAME, self.device)
        self.config = config
        self.status.update(version=self.version, message=f"preparing {len(train_cases)} case(s)")
        model = self.recipe.build_model(config).to(self.device)
        if checkpoint is None and self.parent:
            _warm_start(model, self.ws.model_dir(self.parent) / contract.MODEL_WEIGHTS_NAME)
        optimizer, scheduler = self.recipe.optimizer(model, config)
        start_iteration, elapsed_before = 0, 0.0
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if scheduler is not None and checkpoint.get("scheduler"):
                scheduler.load_state_dict(checkpoint["scheduler"])
            start_iteration, elapsed_before = int(checkpoint["iteration"]), float(checkpoint["elapsed"])
            self.history = [list(row) for row in checkpoint.get("history", [])]
        sampler = self.recipe.make_sampler(config, train_cases, self.device, self.req.seed + start_iteration,
                                           rank=self.place.rank)
        self.sampler, self.train_cases, self.pseudo_rounds = sampler, train_cases, []  # records of the rounds so far
        self.pseudo_fractions = pseudo_label_fractions(config["settings"])  # read once, not at every step
        # unlabeled=consistency: the term once due, whether it was due, and the version's record of it
        self.consistency, self.consistency_started, self.consistency_record = None, False, {}
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.averaged = None  # the running mean of the weights over the last average_share of the budget
        self.average_share = float(config["settings"].get("average_weights", 0.0) or 0.0)  # checked by the recipe
        self.train_model = self.place.wrap(model)  # DistributedDataParallel on several processes
        self._loop(sampler, self.recipe.loss_function(config), start_iteration, elapsed_before)
        return self._finish_done()

    def _open_version(self, train_cases, num_classes: int) -> tuple:
        """Rank 0: create the version (or mark the resumed one as training); (name, config, its settings)."""
        world = {"world_size": self.place.world_size}
        if self.resume_from is not None:
            record, config = self.resume_from
            changes = {"status": contract.VERSION_TRAINING, "pid": os.getpid(), **world}
            if self.req.iterations is not None or self.req.minutes is not None:
                changes["settings"] = {**record["settings"], **self._budget()}  # a new budget
            record = self.ws.update_version(record["name"], **changes)
            return record["name"], config, record["settings"]
        settings = {"device": self.device, **self.req.settings}
        if self.req.level is not None:
            settings["level"] = int(self.req.level)
        self.recipe = make_recipe(self.req.model, settings)
        config = self.recipe.fit_config(train_cases, num_classes)
        # the anatomical order of the structures, when every training label shows the same one
        config["structure_order"] = detect_structure_order(
            [sitk.GetArrayViewFromImage(c.label) for c in train_cases],
            spacings=[case_spacing_zyx(c.label) for c in train_cases])
        settings = {**config.settings, "model": self.req.model, "device": self.device, **self._budget()}
        name = self.ws.new_version(settings, [c.case_id for c in train_cases], parent=self.parent, **world)
        atomic.write_json(self.ws.model_dir(name) / contract.CONFIG_NAME, config)
        return name, config, settings

    # ------------------------------------------------------------------ budget
    def _budget(self) -> dict:
        if self.req.iterations is not None:
            return {"budget_iterations": int(self.req.iterations), "budget_minutes": None}
        minutes = self.req.minutes
        if minutes is None:
            minutes = default_minutes(is_gpu(self.device), warm_start=bool(self.req.init_from))
        return {"budget_iterations": None, "budget_minutes": float(minutes)}

    @property
    def model_dir(self) -> Path:
        return self.ws.model_dir(self.version)

    def _resumable(self):
        """(record, config) of the newest stopped, failed or interrupted version with a checkpoint."""
        for record in reversed(self.ws.manifest()["versions"]):
            folder = self.ws.model_dir(record["name"])
            status = record.get("status")
            if status == contract.VERSION_TRAINING and not contract.pid_alive(record.get("pid")):
                status = contract.VERSION_INTERRUPTED  # we hold the lock: its trainer is gone
            if status in contract.RESUMABLE_STATUSES and (folder / contract.CHECKPOINT_NAME).is_file():
                return record, read_config(folder, allowed_dirs=self._user_dirs())
        raise InputError(f"{self.ws.path}: nothing to resume (no stopped training with a checkpoint)")

    def _user_dirs(self) -> list:
        """Folders this request's own settings name (e.g. ``--set offline_dir=...``): the user gave them."""
        return [v for k, v in self.req.settings.items() if isinstance(v, str) and k.endswith(("_dir", "_path"))]

    def _resolve_init_from(self) -> str | None:
        if not self.req.init_from:
            return None
        name = self.ws.resolve_version(self.req.init_from)
        if not (self.ws.model_dir(name) / contract.MODEL_WEIGHTS_NAME).is_file():
            raise InputError(f"--init-from {name}: that version has no saved weights")
        return name

    # ------------------------------------------------------------------ loop
    def _loop(self, sampler, loss_fn, iteration: int, elapsed_before: float) -> None:
        settings = self.settings
        total_iters = settings.get("budget_iterations")
        budget_s = (settings.get("budget_minutes") or 0) * 60.0 or None
        # the starting rate of the poly schedule (a resumed optimiser holds a decayed one)
        lr0 = float(settings.get("learning_rate", self.optimizer.param_groups[0]["lr"]))
        start = time.monotonic() - elapsed_before
        last_ckpt = last_log = time.monotonic()
        validated = {f for f in VALIDATE_AT if self._fraction(iteration, elapsed_before, total_iters, budget_s) >= f}
        bar = _ProgressBar(self.req.progress_bar and self.main, iteration)
        losses: list[float] = []
        self.status.update(phase="training", message="training")
        self.model.train()
        while True:
            elapsed = time.monotonic() - start
            fraction, stop = self.place.agree(self._fraction(iteration, elapsed, total_iters, budget_s),
                                              self.stop_event.is_set())
            if fraction >= 1.0:
                break
            if stop:
                self._save_checkpoint(iteration, elapsed)
                raise StopRequested()
            if self.scheduler is None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr0 * max(1.0 - fraction, 0.02) ** 0.9
            if self._pseudo_label_due(fraction):
                sampler = self._sampler_with_pseudo_labels(iteration)
                self.model.train()
            if self._consistency_due(fraction):
                self._start_consistency(iteration)
            x, y = sampler.batch(iteration)
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device):
                loss = self._step_loss(loss_fn, x, y)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self._average_weights(fraction)
            iteration += 1
            losses.append(self.place.mean(float(loss.detach())))
            elapsed = time.monotonic() - start
            total_est = total_iters or max(iteration, int(iteration / max(elapsed, 1e-6) * budget_s))
            eta = (total_est - iteration) * elapsed / iteration if iteration else None
            self.status.update(iteration=iteration, total=total_est, loss=float(np.mean(losses[-20:])), eta_s=eta)
            bar.show(iteration, total_est, self.status.snapshot())
            now = time.monotonic()
            due = [f for f in VALIDATE_AT if f not in validated and self._fraction(iteration, elapsed, total_iters, budget_s) >= f]
            if now - last_log >= LOG_EVERY_S or due:
                self._log(iteration, elapsed, losses, None)
                last_log = now
            if due and self.main and self.val_cases:
                validated.update(due)
                self._periodic_validation(iteration, elapsed)
                self.model.train()
            elif due:
                validated.update(due)
            if now - last_ckpt >= CHECKPOINT_EVERY_S:
                self._save_checkpoint(iteration, time.monotonic() - start)
                last_ckpt = now
        bar.close()
        self._close_consistency()
        if self.averaged is not None:  # the saved model is the mean of the last weights
            self.model.load_state_dict(self.averaged.module.state_dict())
        self.iterations, self.seconds = iteration, time.monotonic() - start
        self._log(iteration, self.seconds, losses, None)
        self._save_checkpoint(iteration, self.seconds)

    def _average_weights(self, fraction: float) -> None:
        """Over the last ``average_weights`` of the budget, keep the running mean of the weights.

        torch's AveragedModel; the network's instance norms hold no running statistics, so the
        mean needs no pass over the data afterwards. A resumed training starts a new mean.
        """
        if self.average_share == 0.0 or fraction < 1.0 - self.average_share:
            return
        if self.averaged is None:
            self.averaged = torch.optim.swa_utils.AveragedModel(self.model)
        self.averaged.update_parameters(self.model)

    # ------------------------------------------------------------------ unlabeled scans
    def _step_loss(self, loss_fn, x, y):
        """The labelled loss; with the consistency term on, plus its weight times the strong views'
        loss, both from one forward pass of the labelled and the strong batch together."""
        if self.consistency is None:
            return loss_fn(self.train_model(x), y)
        strong, target, mask = self.consistency.views(self.model)
        out = self.train_model(torch.cat([x, strong]))
        weight = float(self.config["settings"]["consistency_weight"])
        return loss_fn(out[:len(x)], y) + weight * self.consistency.loss(out[len(x):], target, mask)

    def _consistency_due(self, fraction: float) -> bool:
        """Weak-to-strong consistency starts once, at ``consistency_from`` of the budget, when asked
        for (``unlabeled=consistency``, not ``--no-unlabeled``)."""
        s = self.config["settings"]
        return (not self.consistency_started and self.req.unlabeled and s.get("unlabeled") == "consistency"
                and fraction >= float(s["consistency_from"]))

    def _start_consistency(self, iteration: int) -> None:
        """Read the worklist scans and add the consistency term from this step on (nothing when empty)."""
        self.consistency_started = True
        entries = self.ws.worklist_cases()
        if not entries:
            return
        self.status.update(phase="preparing", message=f"reading {len(entries)} worklist scan(s) for consistency training")
        images = [imageio.read_image(self.ws.image_path(entry["id"])) for entry in entries]
        self.consistency = self.recipe.consistency_term(self.config, images, self.device, self.req.seed + iteration,
                                                        rank=self.place.rank)
        self.consistency_record = {"scans": [entry["id"] for entry in entries], "slices": len(self.consistency.slices),
                                   "from_iteration": int(iteration)}
        if self.main:
            self.ws.update_version(self.version, consistency=self.consistency_record)
        self.status.update(phase="training", message=f"training with consistency on {len(entries)} worklist scan(s)")

    def _close_consistency(self) -> None:
        """Record the mean share of worklist pixels sure enough to teach (the version's ``consistency``)."""
        if self.consistency is None or not self.main or not self.consistency.confident_shares:
            return
        shares = self.consistency.confident_shares
        self.ws.update_version(self.version, consistency={
            **self.consistency_record, "steps": len(shares), "sure_share": round(float(np.mean(shares)), 4),
            "sure_share_last": round(float(np.mean(shares[-50:])), 4)})

    def _pseudo_label_due(self, fraction: float) -> bool:
        """Self-training labels the worklist at each of the ``pseudo_label_at`` fractions of the
        budget (once, or again with the model so far), when the worklist has scans."""
        s = self.config["settings"]
        if not self.req.unlabeled or s.get("unlabeled", "off") != "self-training":
            return False
        done = len(self.pseudo_rounds)
        return done < len(self.pseudo_fractions) and fraction >= self.pseudo_fractions[done] \
            and bool(self.ws.worklist_cases())

    def _sampler_with_pseudo_labels(self, iteration: int):
        """Label the worklist scans with the model so far and train on them too from now on.

        Self-training: each worklist scan is predicted (``pseudo_label_rule``); a scan joins when
        the model is confident on it (mean top probability inside its predicted structures >=
        ``pseudo_label_confidence``) or is among the most confident ``pseudo_label_share`` of the
        worklist, so a scan the model cannot read yet does not teach it its own mistakes. A later
        round labels the whole worklist again and its pseudo-labels replace the earlier ones. With
        ``pseudo_label_check=registration`` a joining scan must also name its levels where the
        delineated scans, registered onto it, put them (``_level_checked``): confidence does not
        see a pseudo-label with every level shifted by one.
        """
        s = self.config["settings"]
        threshold, share = float(s.get("pseudo_label_confidence", 0.9)), float(s.get("pseudo_label_share", 0.0))
        self.status.update(phase="preparing", message="labelling the worklist scans with the model so far")
        self.model.eval()
        labelled, kept = {}, {}
        for entry in self.ws.worklist_cases():
            image = imageio.read_image(self.ws.image_path(entry["id"]))
            probabilities = self.recipe.predict_probabilities(self.model, self.config, image, self.device)
            labels = pseudo_labels_from_probabilities(probabilities, self.config, case_spacing_zyx(image))
            foreground = labels > 0
            confidence = float(probabilities.max(axis=0)[foreground].mean()) if foreground.any() else 0.0
            kept[entry["id"]] = round(confidence, 4)
            labelled[entry["id"]] = labels  # the images are read again for the scans that join
        joining, level_check = confident_scans(kept, threshold, share), None
        if s.get("pseudo_label_check", "off") == "registration":
            joining, level_check = self._level_checked(joining, labelled)
        pseudo = []
        for case_id in joining:
            image = imageio.read_image(self.ws.image_path(case_id))
            pseudo.append(CaseData(case_id, image, to_label_image(labelled[case_id], image)))
        record = {"confidence": kept, "threshold": threshold, "share": share,
                  "used": [c.case_id for c in pseudo], "at_iteration": int(iteration)}
        if level_check is not None:
            record["level_check"] = level_check
        earlier, self.pseudo_rounds = self.pseudo_rounds, self.pseudo_rounds + [record]
        if self.main:  # the version's record is the last round's, with the earlier rounds in it
            self.ws.update_version(self.version, pseudo_labels={**record, "earlier": earlier} if earlier else record)
        self.status.update(phase="training", message=f"training with {len(pseudo)} pseudo-labelled scan(s)")
        if not pseudo and not (earlier and earlier[-1]["used"]):  # nothing to add, nothing to take out
            return self.sampler
        self.sampler = self.recipe.make_sampler(self.config, self.train_cases + pseudo, self.device,
                                                self.req.seed + iteration, rank=self.place.rank)
        return self.sampler

    def _level_checked(self, candidates: list[str], labelled: dict) -> tuple[list[str], dict]:
        """The candidates whose pseudo-labels put their first and last structures within
        ``level_range.LEVEL_CHECK_PITCHES`` of where the delineated scans, rigidly registered onto
        the scan, put them (``level_range.level_verdict``), and a record per candidate: the two
        offsets in pitches and whether it joins, or why it was not checked ("no guide": the
        registration failed, the scan joins on confidence alone). Without a structure order and
        pitch in the config nothing can be checked and every candidate joins.
        """
        order = self.config.get("structure_order")
        if not has_level_chain(self.config) or not order.get("pitch_mm"):
            return candidates, {case_id: "no structure order" for case_id in candidates}
        self.status.update(message=f"checking the levels of {len(candidates)} pseudo-label(s) by registration")
        guide = LevelGuide([(case.image, case.label) for case in self.train_cases if case.label is not None], order)
        passed, record = [], {}
        for case_id in candidates:
            image = imageio.read_image(self.ws.image_path(case_id))
            expected = guide.range_for(image)
            if expected is None:
                passed.append(case_id)
                record[case_id] = "no guide"
                continue
            pitch = float(order["pitch_mm"]) / case_spacing_zyx(image)[int(order["axis"])]
            record[case_id] = level_verdict(labelled[case_id], expected, order, pitch)
            if record[case_id]["joins"]:
                passed.append(case_id)
        return passed, record

    @staticmethod
    def _fraction(iteration, elapsed, total_iters, budget_s) -> float:
        if total_iters:
            return iteration / total_iters
        return elapsed / budget_s

    def _log(self, iteration, elapsed, losses, val_dice) -> None:
        """Append a row (or fill in the Dice of the last row for the same iteration); rank 0 only."""
        if not losses or not self.main:
            return
        dice = val_dice if val_dice is not None else float("nan")
        if self.history and self.history[-1][0] == iteration:
            if val_dice is not None:
                self.history[-1][4] = dice
        else:
            lr = self.optimizer.param_groups[0]["lr"]
            self.history.append([iteration, round(elapsed, 2), float(np.mean(losses[-20:])), lr, dice])
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["iteration", "seconds", "loss", "learning_rate", "val_dice"])
        writer.writerows(self.history)
        atomic.write_text(self.model_dir / "log.csv", buffer.getvalue())

    # ------------------------------------------------------------------ validation
    def _validate(self, cases) -> dict | None:
        return score_model(self.recipe, self.config, self.model, cases, self.device,
                           guide_from_cases(self.train_cases, self.config) if cases else None)

    def _periodic_validation(self, iteration, elapsed) -> None:
        self.status.update(phase="validating", message="validating")
        scores = self._validate(self.val_cases[:MAX_PERIODIC_VALIDATION_CASES])
        self._log(iteration, elapsed, [self.history[-1][2]], scores["mean_dice"])
        self.status.update(phase="training", val_dice=scores["mean_dice"], message="training")

    # ------------------------------------------------------------------ endings
    def _save_checkpoint(self, iteration: int, elapsed: float) -> None:
        """Rank 0: the resumable state (all ranks hold the same weights and optimiser state)."""
        if not self.main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                 "iteration": int(iteration), "elapsed": float(elapsed), "history": self.history}
        atomic.write_with(self.model_dir / contract.CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))
        self.ws.update_version(self.version, iterations=int(iteration), seconds=round(float(elapsed), 1))

    def _finish_done(self) -> dict:
        if not self.main:  # rank 0 validates, saves and reports
            return self._rank_summary("done")
        self.status.update(phase="validating", message=self.ws.validation_note() if not self.val_cases
                           else f"validating on {len(self.val_cases)} case(s)")
        scores = self._validate(self.val_cases)
        if scores is not None:
            self._log(self.iterations, self.seconds, [self.history[-1][2]], scores["mean_dice"])
        self.status.update(phase="saving", message="saving model")
        save_model(self.model_dir, self.model, self.config)
        plot_training(self.history, self.model_dir / "training.png", title=f"model {self.version}")
        self.ws.update_version(self.version, iterations=self.iterations, seconds=round(self.seconds, 1))
        if scores is not None:
            self._rescore_best(scores["cases"])
        is_best = self.ws.finish_version(self.version, scores)
        note = self.ws.validation_note() if scores is None else f"validation Dice {scores['mean_dice']:.3f}"
        message = f"{self.version} done; {note}; {'now the best model' if is_best else 'kept ' + str(self.ws.best_version()) + ' as best'}"
        self.status.close(phase="done", val_dice=scores["mean_dice"] if scores else None, eta_s=0, message=message)
        return {"version": self.version, "phase": "done", "is_best": is_best, "val_scores": scores,
                "iterations": self.iterations, "seconds": self.seconds, "message": message}

    def _rescore_best(self, cases: list[str]) -> None:
        """Score the current best model on today's validation cases, so both compare fairly.

        The validation split only grows (cases never move), but a model scored when it had
        fewer validation cases would otherwise be compared on a different set.
        """
        best = self.ws.best_version()
        if best is None or best == self.version:
            return
        record = self.ws.version(best)
        if (record.get("val_scores") or {}).get("cases") == cases:
            return
        self.status.update(message=f"scoring {best} on the same validation cases")
        recipe, config, model, _ = load_model(self.ws, best, self.device)
        scores = score_model(recipe, config, model, self.val_cases, self.device, guide_for_version(self.ws, best, config))
        self.ws.update_version(best, val_scores=scores, rescored_at=status_mod.now_iso())

    def _finish_stopped(self) -> dict:
        if not self.main:
            return self._rank_summary("stopped")
        plot_training(self.history, self.model_dir / "training.png", title=f"model {self.version} (stopped)")
        self.ws.update_version(self.version, status=contract.VERSION_STOPPED)
        message = f"{self.version} stopped; continue with --resume"
        self.status.close(phase="stopped", eta_s=None, message=message)
        return {"version": self.version, "phase": "stopped", "message": message}

    def _rank_summary(self, phase: str) -> dict:
        """What another rank than 0 returns: it wrote nothing, rank 0 reports the version."""
        return {"version": self.version, "phase": phase, "rank": self.place.rank,
                "message": f"rank {self.place.rank} of {self.place.world_size}: {phase}"}

    def _fail(self, text: str, trace: str | None = None) -> None:
        if not self.main:
            return
        if self.version is not None:
            try:
                self.ws.finish_version(self.version, None, status=contract.VERSION_FAILED)
            except Exception:  # the original error matters more
                pass
        self.status.close(phase="failed", error=text, message=text, traceback=trace)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, lambda *_: self.stop_event.set())

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _NoStatus:
    """The status of a rank other than 0: kept nowhere (rank 0 writes ``status.json``)."""

    def update(self, write: bool = False, **fields) -> None:
        pass

    def close(self, **fields) -> None:
        pass

    def snapshot(self) -> dict:
        return {}


def _warm_start(model, weights: Path) -> None:
    """Load the tensors of ``weights`` whose names and shapes match (the head may differ)."""
    state = load_weights(weights)
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    own.update(matching)
    model.load_state_dict(own)


class _ProgressBar:
    """tqdm's bar on a terminal (on stderr); a plain line every 15 s when stderr is a file."""

    def __init__(self, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.bar = None
        self.last = 0.0
        self.start = start

    def show(self, iteration: int, total: int, state: dict) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, initial=self.start, unit="it", dynamic_ncols=True,
                            mininterval=0.5 if _stderr_is_terminal() else 15.0)
        self.bar.total = max(total, iteration)
        val = state.get("val_dice")
        self.bar.set_postfix_str(f"loss {state.get('loss') or 0:.3f}" + ("" if val is None else f" val Dice {val:.3f}"),
                                 refresh=False)
        self.bar.update(iteration - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
