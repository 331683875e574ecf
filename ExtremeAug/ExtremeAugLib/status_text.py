"""Short human-readable texts for the panel: training phase, time left, loss and Dice, the rounds table."""

PHASE_TEXT = {
    "unknown": "no training yet",
    "starting": "starting",
    "preparing": "preparing the training data",
    "training": "training",
    "validating": "validating",
    "saving": "saving the model",
    "done": "finished",
    "stopped": "stopped",
    "failed": "failed",
}


def formatDuration(seconds):
    """'-' for unknown, else '45 s', '12 min 5 s' or '2 h 03 min'."""
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def formatNumber(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def describeStatus(status):
    """One line: phase, version, progress and processes (when several), or the error of a failed training."""
    phase = status.get("phase") or "unknown"
    text = PHASE_TEXT.get(phase, phase)
    if status.get("version") and phase != "unknown":
        text += f" {status['version']}"
    if phase in ("training", "validating") and status.get("total"):
        text += f" ({status.get('iteration', 0)}/{status['total']})"
    world = status.get("world_size") or 1
    if phase != "unknown" and world > 1:
        text += f" on {world} processes"
    if phase == "failed" and status.get("error"):
        text += f": {status['error']}"
    elif phase in ("done", "stopped") and status.get("message"):
        text += f": {status['message']}"
    return text


def progressPercent(status):
    """0..100 from iteration/total (100 once done)."""
    if status.get("phase") == "done":
        return 100
    total = status.get("total") or 0
    if total <= 0:
        return 0
    return max(0, min(100, int(100 * (status.get("iteration") or 0) / total)))


def describeScore(versionRow):
    """A version's Dice for the versions table: validation, or test-then-train with its scan count."""
    if versionRow.get("scoreSource") == "test-then-train":
        scans = versionRow.get("testScans") or 0
        return f"{formatNumber(versionRow.get('score'))} (test-then-train, {scans} scan{'s' if scans != 1 else ''})"
    return formatNumber(versionRow.get("score"))


def describeBest(versionRow):
    """'best', 'best, on trial against vN' or ''."""
    if not versionRow.get("isBest"):
        return ""
    return f"best, on trial against {versionRow['trialAgainst']}" if versionRow.get("trialAgainst") else "best"


def roundCells(roundRow):
    """The texts of one row of the rounds table (round, case, predicted by, Dice, binary Dice,
    voxels changed, slices touched, structures changed, trained by)."""
    def count(value):
        return "-" if value is None else str(value)

    trained = roundRow.get("trained_by") or "queued"
    return (str(roundRow["round"]), str(roundRow["id"]), roundRow.get("predicted_by") or "?",
            formatNumber(roundRow.get("mean_dice")), formatNumber(roundRow.get("binary_dice")),
            count(roundRow.get("changed_voxels")), count(roundRow.get("slices_touched")),
            ", ".join(str(v) for v in roundRow.get("structures_changed") or []) or "-",
            trained + (" (in best)" if roundRow.get("in_best") else ""))
