"""Every number that turns a measurement into a yes or a no on the reproduction page, with its reason.
The page lists them all (name, value, why); the claims import them from here. Two more bars are
measured, not chosen: the seed noise (core.SeedNoise) and the bigram reference (qknorm.analysis.failure)."""

from __future__ import annotations

from dataclasses import dataclass

from qknorm.training.monitor import SINK_EPSILON as MONITOR_SINK_EPSILON


@dataclass(frozen=True)
class Threshold:
    name: str
    value: float
    why: str
    used_by: str


THRESHOLDS: list[Threshold] = []


def threshold(name: str, value: float, why: str, used_by: str) -> float:
    THRESHOLDS.append(Threshold(name, value, why, used_by))
    return value


NOISE_QUANTILE = threshold(
    "NOISE_QUANTILE", 0.9,
    "Two losses agree when they differ by less than this quantile of |seed 0 - seed 1| over every pair of runs "
    "that differ only in their seed: 9 in 10 reruns of one config land closer than that, so a gap beyond it is "
    "unlikely to be seed noise. Its value in nats, measured on the runs, is AGREE_NATS.", "E1, E3, E4, E5, E6, E7, E10, E11")
JUMP_NATS = threshold(
    "JUMP_NATS", 0.3,
    "A curve's jump LR (E1's reading of Wortsman's critical LR) is the first LR above its optimum whose loss is "
    "this far above its best: twice the "
    "seed-noise bar, and about the gap between the best model here and the bigram model, so a jump this size "
    "means the LR lost most of what attention adds.", "E1, E3, E4 (diagnostics)")
GROWTH_ORDERS = threshold(
    "GROWTH_ORDERS", 1.0,
    "'Grows by orders of magnitude' (Wortsman et al. 2023, Fig. 2) read as at least one order: 10x from the first "
    "record to its peak.", "E2 (diagnostic)")
PAPER_LOGIT = threshold(
    "PAPER_LOGIT", 1e4,
    "Wortsman et al. 2023, Fig. 9: 'all points with logits above 1e4 diverged', the layer-0 max logit read early.",
    "E2 (headline)")
EARLY_FRACTION = threshold(
    "EARLY_FRACTION", 0.02,
    "Where Wortsman et al. read the early logit: step 2e3 of 1e5 (2% of the run). Here the first monitor record "
    "at or after 2% of the run, never the initialization's.", "E2")
RATIO_SLACK = threshold(
    "RATIO_SLACK", 2e-3,
    "Relative slack when two LR ratios are compared (a bracket against GRID_RESOLUTION, two first failures against "
    "a bracket): the finder rounds LRs to 4 significant digits (qknorm.analysis.boundary.LR_DIGITS), which moves "
    "each end by up to 5e-4 relative and a ratio by up to about 1e-3, and a comparison must not turn on that "
    "rounding.", "E3, E4, E12")
GRID_RESOLUTION = threshold(
    "GRID_RESOLUTION", 1.6,
    "The largest LR grid step (or bracket, for a searched boundary) at which 'about the same first diverging LR' or "
    "'about the same critical LR' means anything: Rybakov et al.'s groups are 1.33-1.5x apart, so a grid coarser "
    "than ~1.5x cannot tell one group from the next.", "E3 (headline), E4")
OUTPUT_NORM_RATIO = threshold(
    "OUTPUT_NORM_RATIO", 2.0,
    "Rybakov et al. 2024: diverging runs' QKV/Proj/FC2 outputs are more than 2x a converged run's well before "
    "the divergence.", "E4 (diagnostic)")
EARLY_NORM_FRACTION = threshold(
    "EARLY_NORM_FRACTION", 0.5,
    "E4's output norms are read at one fixed step, at most this fraction of the way to the earliest divergence "
    "compared (and never the initialization's record), so that the reading comes before the blow-up, not from it.",
    "E4 (diagnostic)")
LOGZ_DRIFT_RATIO = threshold(
    "LOGZ_DRIFT_RATIO", 2.0,
    "'Output logits drift' without z-loss read as a change of the mean log Z at least twice the z-loss run's.",
    "E5 (diagnostic)")
KAPPA_ONSET = threshold(
    "KAPPA_ONSET", 1e3,
    "Wortsman et al. 2023, Fig. 10: the loss degrades 'around kappa = 1e3'.", "E6 (headline)")
KAPPA_WINDOW_DECADES = threshold(
    "KAPPA_WINDOW_DECADES", 1.0,
    "'Around 1e3' on a grid one decade apart: the onset must be within one grid step of 1e3 (1e2 to 1e4).",
    "E6 (headline)")
KAPPA_BIGRAM = threshold(
    "KAPPA_BIGRAM", 1e4,
    "Wortsman et al. 2023, Fig. 10: by kappa = 1e4 the loss is worse than a bigram model.", "E6 (headline)")
KAPPA_MIN_GRID = threshold(
    "KAPPA_MIN_GRID", 3,
    "The fewest kappas on which E6 places an onset: the onset is the first kappa above the best one whose loss is "
    "worse than the best, so with two kappas it is merely the larger of the two whenever they differ, and the grid "
    "cannot say where along kappa the loss starts to degrade.", "E6 (headline)")
MIN_DECAY_SHRINK = threshold(
    "MIN_DECAY_SHRINK", 0.10,
    "The least total shrink (1 - prod(1 - lambda s_t) over the run's schedule) at which an independent decay "
    "can act as it does in the paper (there 1e-4 over 1e5 steps shrinks weights by ~99%); below it the arm is, "
    "for the run's length, an arm without decay, and comparing it with coupled decay tests decay against no decay.",
    "E7 (headline)")
HEALTHY_LR_FACTOR = threshold(
    "HEALTHY_LR_FACTOR", 3.0,
    "E8 judges models trained at healthy LRs: at most 3x the variant's best LR in the folder, and not failed (below "
    "the bigram reference), so that an overflow is that of a model that learned, not of a collapsed one.", "E8 (headline)")
FP16_MAX = threshold(
    "FP16_MAX", 65504.0,
    "The largest finite float16 value: a q k^T above it overflows to inf when the product is taken in fp16.", "E8")
DRIFT_FROM = threshold(
    "DRIFT_FROM", 0.3,
    "E9 measures drift from 30% of the run to its end: past the warmup and the first fast fall of the loss, where "
    "a slow drift of the gains, not the initial learning, moves the max logit.", "E9")
DRIFT_MIN_GROWTH = threshold(
    "DRIFT_MIN_GROWTH", 1.5,
    "'The max logit still drifts' read as at least 1.5x over that span; with less there is nothing for the "
    "zero-centred gains to curb.", "E9")
INTERVAL = threshold(
    "INTERVAL", 0.95,
    "E10's paired differences over seeds: a two-sided t-interval at this level, shown beside each difference and "
    "required to exclude 0 by the wall-time diagnostic (the loss headline holds the mean difference to AGREE_NATS).", "E10")
FORCED_GROWTH = threshold(
    "FORCED_GROWTH", 10.0,
    "E11 compares the optimizers where the LR is 'forced high': at an LR where an unclipped run's max logit (over "
    "layers and heads) grows at least this much from the first monitor record at or after its warmup's end to its "
    "peak (Wortsman's 'orders of magnitude'), i.e. grows at the peak LR. Not from step 0, the initialization's "
    "logit, from which learning alone grows it about that much even at the best-loss LR; not from DRIFT_FROM "
    "(where the soft-cap check starts), by which the growth at the peak LR has largely happened. Below it neither "
    "optimizer has an explosion for the other to exceed.", "E11 (headline)")
CLIP_SLACK = threshold(
    "CLIP_SLACK", 0.5,
    "QK-Clip scales each head's logits by tau / the largest logit it measured, on the step's batch in that step's forward, "
    "before the optimizer's update (Kimi K2's Algorithm 1): exact on fixed weights (tests/test_muon.py), one step "
    "stale in training, so a step that multiplies the logit lands above tau before the next clip; and the monitor "
    "reads the largest |logit| on held-out text, on which a clipped head can land somewhat above tau (another "
    "batch, and a negative logit the clip does not aim at). 'Held at tau' read as a "
    "monitored peak of at most (1 + this) x tau.", "E11 (headline)")
PRECAP_GROWTH = threshold(
    "PRECAP_GROWTH", 1.5,
    "'The soft-cap leaves the pre-cap logit growing' read as the pre-cap max logit growing at least this much from "
    "DRIFT_FROM of the run to its end, while the capped (monitored) max logit stays at or below the cap in every "
    "soft-capped run (checked: where it does not, no cap held and the check is undecided).", "E11 (headline)")
SINK_EPSILON = threshold(
    "SINK_EPSILON", MONITOR_SINK_EPSILON,
    "Gu et al. 2025's epsilon: a head is a sink head when its attention on the first token, averaged over query rows, "
    "exceeds this; the sink rate is the share of such heads. The monitor counts with this value (qknorm.training."
    "monitor), so the page and the records agree.", "E12 (headline)")
