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


THRESHOLDS: list[Threshold] = []


def threshold(name: str, value: float, why: str) -> float:
    """Register a threshold (the page lists it; which claims use it is read from their code: repro.usage)."""
    THRESHOLDS.append(Threshold(name, value, why))
    return value


NOISE_QUANTILE = threshold(
    "NOISE_QUANTILE", 0.9,
    "Two losses agree when they differ by less than this quantile of |seed 0 - seed 1| over every pair of runs "
    "that differ only in their seed: 9 in 10 reruns of one config land closer than that, so a gap beyond it is "
    "unlikely to be seed noise. Its value in nats, measured on the runs, is AGREE_NATS.")
SENSITIVITY_MIN_LRS = threshold(
    "SENSITIVITY_MIN_LRS", 3,
    "The fewest LRs of an arm's grid whose LR sensitivity enters the sensitivity noise: on two LRs the sensitivity is "
    "half the gap between them, a single loss difference rather than an average over a curve.")
JUMP_NATS = threshold(
    "JUMP_NATS", 0.3,
    "A curve's jump LR (E1's reading of Wortsman's critical LR) is the first LR above its optimum whose loss is "
    "this far above its best: twice the "
    "seed-noise bar, and about the gap between the best model here and the bigram model, so a jump this size "
    "means the LR lost most of what attention adds.")
MIN_TREND_POINTS = threshold(
    "MIN_TREND_POINTS", 3,
    "The fewest widths on which a trend with width ('falls as width grows', 'still grows with size') is read: with "
    "two, a trend is merely one difference.")
GROWTH_ORDERS = threshold(
    "GROWTH_ORDERS", 1.0,
    "'Grows by orders of magnitude' (Wortsman et al. 2023, Fig. 2) read as at least one order: 10x from the first "
    "record to its peak.")
PAPER_LOGIT = threshold(
    "PAPER_LOGIT", 1e4,
    "Wortsman et al. 2023, Fig. 9: 'all points with logits above 1e4 diverged', the layer-0 max logit read early.")
EARLY_FRACTION = threshold(
    "EARLY_FRACTION", 0.02,
    "Where Wortsman et al. read the early logit: step 2e3 of 1e5 (2% of the run). Here the first monitor record "
    "at or after 2% of the run, never the initialization's.")
RATIO_SLACK = threshold(
    "RATIO_SLACK", 2e-3,
    "Relative slack when two LR ratios are compared (a bracket against GRID_RESOLUTION, two first failures against "
    "a bracket): the finder rounds LRs to 4 significant digits (qknorm.analysis.boundary.LR_DIGITS), which moves "
    "each end by up to 5e-4 relative and a ratio by up to about 1e-3, and a comparison must not turn on that "
    "rounding.")
GRID_RESOLUTION = threshold(
    "GRID_RESOLUTION", 1.6,
    "The largest LR grid step (or bracket, for a searched boundary) at which 'about the same first diverging LR' or "
    "'about the same critical LR' means anything: Rybakov et al.'s groups are 1.33-1.5x apart, so a grid coarser "
    "than ~1.5x cannot tell one group from the next.")
OUTPUT_NORM_RATIO = threshold(
    "OUTPUT_NORM_RATIO", 2.0,
    "Rybakov et al. 2024: diverging runs' QKV/Proj/FC2 outputs are more than 2x a converged run's well before "
    "the divergence.")
EARLY_NORM_FRACTION = threshold(
    "EARLY_NORM_FRACTION", 0.5,
    "E4's output norms are read at one fixed step, at most this fraction of the way to the earliest divergence "
    "compared (and never the initialization's record), so that the reading comes before the blow-up, not from it.")
LOGZ_DRIFT_RATIO = threshold(
    "LOGZ_DRIFT_RATIO", 2.0,
    "'Output logits drift' without z-loss read as a change of the mean log Z at least twice the z-loss run's.")
KAPPA_ONSET = threshold(
    "KAPPA_ONSET", 1e3,
    "Wortsman et al. 2023, Fig. 10: the loss degrades 'around kappa = 1e3'.")
KAPPA_WINDOW_DECADES = threshold(
    "KAPPA_WINDOW_DECADES", 1.0,
    "'Around 1e3' on a grid one decade apart: the onset must be within one grid step of 1e3 (1e2 to 1e4).")
KAPPA_BIGRAM = threshold(
    "KAPPA_BIGRAM", 1e4,
    "Wortsman et al. 2023, Fig. 10: by kappa = 1e4 the loss is worse than a bigram model; with the onset around 1e3, "
    "the crossing is read as lying in the decade up to 1e4 (KAPPA_WINDOW_DECADES below it), not anywhere before it.")
KAPPA_MIN_GRID = threshold(
    "KAPPA_MIN_GRID", 3,
    "The fewest kappas on which E6 places an onset: the onset is the first kappa above the best one whose loss is "
    "worse than the best, so with two kappas it is merely the larger of the two whenever they differ, and the grid "
    "cannot say where along kappa the loss starts to degrade.")
MIN_DECAY_SHRINK = threshold(
    "MIN_DECAY_SHRINK", 0.10,
    "The least total shrink (1 - prod(1 - lambda s_t) over the run's schedule) at which an independent decay "
    "can act as it does in the paper (there 1e-4 over 1e5 steps shrinks weights by ~99%); below it the arm is, "
    "for the run's length, an arm without decay, and comparing it with coupled decay tests decay against no decay. "
    "The paper gives no such figure: 10% is chosen as the point where the decay has visibly acted (a tenth of each "
    "weight's size removed), still an order of magnitude short of the paper's run; the recipe here reaches 1.5%.")
HEALTHY_LR_FACTOR = threshold(
    "HEALTHY_LR_FACTOR", 3.0,
    "E8 judges models trained at healthy LRs: at most 3x the variant's best LR in the folder, and not failed (below "
    "the bigram reference), so that an overflow is that of a model that learned, not of a collapsed one. 3x is the "
    "next step of a half-decade grid above the best LR (1e-2, 3e-2); the next, 1e-1, is where the first E8 round's "
    "models all ended worse than the bigram model.")
FP16_MAX = threshold(
    "FP16_MAX", 65504.0,
    "The largest finite float16 value: a q k^T above it overflows to inf when the product is taken in fp16.")
DRIFT_FROM = threshold(
    "DRIFT_FROM", 0.3,
    "E9 measures drift from 30% of the run to its end: past the warmup and the first fast fall of the loss, where "
    "a slow drift of the gains, not the initial learning, moves the max logit.")
DRIFT_MIN_GROWTH = threshold(
    "DRIFT_MIN_GROWTH", 1.5,
    "'The max logit still drifts' read as at least 1.5x over that span; with less there is nothing for the "
    "zero-centred gains to curb. Qwen3-Next's report gives no size ('increase abnormally'): 1.5x is chosen above the "
    "seed-to-seed ratio of peak max logits that E11 prints for identical configs, so a drift this size is not one "
    "seed's logit sitting higher than another's.")
INTERVAL = threshold(
    "INTERVAL", 0.95,
    "E10's paired differences over seeds: a two-sided t-interval at this level, shown beside each difference and "
    "required to exclude 0 by the wall-time diagnostic (the loss headline holds the mean difference to AGREE_NATS).")
FORCED_GROWTH = threshold(
    "FORCED_GROWTH", 10.0,
    "E11 compares the optimizers where the LR is 'forced high': at an LR where an unclipped run's max logit (over "
    "layers and heads) grows at least this much from the first monitor record at or after its warmup's end to its "
    "peak (Wortsman's 'orders of magnitude'), i.e. grows at the peak LR. Not from step 0, the initialization's "
    "logit, from which learning alone grows it about that much even at the best-loss LR; not from DRIFT_FROM "
    "(where the soft-cap check starts), by which the growth at the peak LR has largely happened. Below it neither "
    "optimizer has an explosion for the other to exceed.")
CLIP_SLACK = threshold(
    "CLIP_SLACK", 0.5,
    "QK-Clip scales each head's logits by tau / the largest logit it measured, on the step's batch in that step's forward, "
    "before the optimizer's update, and rescales the weights after it (Kimi K2's Algorithm 1): exact on fixed weights "
    "(tests/test_muon.py), one step stale in training, so the growth an update adds is measured only in the next "
    "step's forward, above tau. 'Held at tau' is read on that measurement, the quantity the clip holds (S_h: signed, "
    "on the training batch, before the clip; the monitor's qk_clip_max_logit, or tau / gamma_h in runs recorded before it): a peak "
    "of at most (1 + this) x tau. The monitor's largest |logit| on held-out text is shown beside it and does not "
    "vote (another batch, and negative logits the clip does not aim at). Kimi K2 gives no tolerance: 1.5x tau is "
    "chosen far below the FORCED_GROWTH (10x) that marks an unclipped run's growth, so a run within it is held and "
    "a run beyond it has escaped the clip by more than one step's regrowth.")
PRECAP_GROWTH = threshold(
    "PRECAP_GROWTH", 1.5,
    "'The soft-cap leaves the pre-cap logit growing' read as the pre-cap max logit growing at least this much from "
    "DRIFT_FROM of the run to its end. The capped (monitored) logit stays at or below the cap by construction "
    "(cap tanh(x / cap)); that is verified, not tested (a run above its cap leaves the check undecided). Su "
    "Jianlin's note gives no size ('keeps growing'): 1.5x, as DRIFT_MIN_GROWTH over the same span, for the same reason.")
SINK_EPSILON = threshold(
    "SINK_EPSILON", MONITOR_SINK_EPSILON,
    "Gu et al. 2025's epsilon: a head is a sink head when its attention on the first token, averaged over query rows, "
    "exceeds this; the sink rate is the share of such heads. The monitor counts with this value (qknorm.training."
    "monitor), so the page and the records agree.")
