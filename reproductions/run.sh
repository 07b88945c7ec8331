#!/usr/bin/env bash
# The sweeps behind docs/reproductions.md, one function per claim (E1-E12 of that page). Each is an
# ordinary Hydra multirun of `qknorm-train`: its jobs' directories are named by their configs, so running
# this again resumes where it stopped, skips finished jobs, and a widened grid (another seed, another LR)
# only trains what is new. Then `.venv/bin/python analysis/reproductions.py` rewrites docs/reproductions.md.
#
#     bash reproductions/run.sh                 # every experiment, in order (hours on 2 cores)
#     bash reproductions/run.sh e1 e10          # some of them
#
# The scale is the CPU one (2 cores): batch 16 x 256 tokens, 300 steps unless an experiment needs a
# longer run, no checkpoints kept (E8 keeps its own), CSV logs only, so that run directories are small
# enough to commit. Runs go to reproductions/runs/<experiment>/ (QKNORM_REPRO_RUNS moves them).
set -euo pipefail
cd "$(dirname "$0")/.."
# the quick start's environment first, where there is one: it is not activated, and its qknorm-train is not on PATH
if [ -d .venv/bin ]; then PATH="$PWD/.venv/bin:$PATH"; fi
RUNS=${QKNORM_REPRO_RUNS:-reproductions/runs}
# data.val_token_ratio=null: validation on the whole held-out split, as these runs were trained (it keeps their identity)
COMMON=(data.batch_size=16 trainer.keep_checkpoint=false logger=csv trainer.progress_bar=false data.val_token_ratio=null)
sweep() { local name=$1; shift; qknorm-train -m "$@" "${COMMON[@]}" "hydra.sweep.dir=$RUNS/$name"; }

# E1 (and E2, from the same runs' stability logs): Wortsman et al. 2023 Fig. 1, 2, E.1, 9. A width ladder
# (head_dim 32; width, depth and heads together), with and without qk-layernorm, their optimizer.
e1() {
  sweep e1_wortsman_fig1 optim=wortsman model=ladder_64,ladder_96,ladder_128,ladder_192 \
    attention=baseline,wortsman2023_qk_layernorm optim.lr=1e-3,3e-3,1e-2,3e-2,1e-1,3e-1 seed=0,1 trainer.max_steps=300
}
e2() { e1; }

# E3: norm kinds and scopes (Wortsman Fig. E.8, Henry 2020): LayerNorm / RMS / L2 with learned g, per head vs
# full width, before vs after RoPE, and L2 with a fixed gain of 1 (the logits bounded by 1/sqrt(d_h)); 3 seeds and
# E4's recipe (600 steps, a 60-step warmup). Each variant's critical LR (worse than the bigram model) is searched,
# not gridded: in the 600-step E4 every QK-norm variant still beat the bigram model by 0.25-0.55 nats at LR 0.5
# and jumped above it between 0.5 and 1, so the fine grid first planned here (0.1-0.5) could locate no one's. (At
# 300 steps the curves cross the bigram line where they rise slowly, and the seeds straddle it: the crossing is
# seed noise there, which is why these runs are 600 steps long.) The critical-LR finder climbs 0.32, 1, 3.2, 10
# until every seed fails, then narrows the bracket to 1.5x (GRID_RESOLUTION); probes stop 30 steps after they are
# doomed. About 85 runs, and 18 below the search (e3_below).
E3_SEARCH=(model=tiny trainer.max_steps=600 optim.warmup_steps=60 seed=0,1,2 optim.lr=0.3162,1,3.162,10
           hydra/sweeper=critical_lr hydra.sweeper.precision=1.5 "hydra.sweeper.targets=[failed]")
e3() { e3_search; e3_below; }
e3_search() {
  qknorm-train -m "${E3_SEARCH[@]}" attention=wortsman2023_qk_layernorm,vit22b_layernorm,qwen3,olmo2,henry2020_l2 \
    "${COMMON[@]}" "hydra.sweep.dir=$RUNS/e3_critical_lr/presets"
  # before vs after RoPE: a rotation keeps each head's RMS, so the two orders differ only through the learned gain
  qknorm-train -m "${E3_SEARCH[@]}" attention=qwen3 attention.position=after_rope "${COMMON[@]}" \
    "hydra.sweep.dir=$RUNS/e3_critical_lr/after_rope"
  qknorm-train -m "${E3_SEARCH[@]}" attention=baseline attention.qk_norm=l2 attention.gain=none "${COMMON[@]}" \
    "hydra.sweep.dir=$RUNS/e3_critical_lr/l2_fixed_gain"
}
e3_below() {
  # Below the search, where the loss is lowest: "L2 with a fixed g underfits" compares best losses, and the search's
  # lowest LR (0.32) lies above every curve's optimum (E4's curves rise from LR 0.1). The fixed gain and LayerNorm per
  # head (the headline's reference) at three LRs below it, each probe stopped as the search's are.
  local probes=(callbacks.divergence.after_warmup_margin=0 callbacks.divergence.running_min_factor=2
                callbacks.divergence.early_stop_patience=30)
  sweep e3_critical_lr/below model=tiny trainer.max_steps=600 optim.warmup_steps=60 seed=0,1,2 optim.lr=0.01,0.03,0.1 \
    attention=wortsman2023_qk_layernorm "${probes[@]}"
  sweep e3_critical_lr/below model=tiny trainer.max_steps=600 optim.warmup_steps=60 seed=0,1,2 optim.lr=0.01,0.03,0.1 \
    attention=baseline attention.qk_norm=l2 attention.gain=none "${probes[@]}"
}
# The first E3 round: three LRs 30x apart, a 15-step warmup, 2 seeds. Kept to compare against.
e3_coarse() {
  sweep e3_norm_variants model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2,3e-1,3 \
    attention=wortsman2023_qk_layernorm,vit22b_layernorm,qwen3,olmo2,henry2020_l2
  sweep e3_norm_variants model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2,3e-1,3 \
    attention=qwen3 attention.position=after_rope
  sweep e3_norm_variants model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2,3e-1,3 \
    attention=baseline attention.qk_norm=l2 attention.gain=none
}

# E4: Rybakov et al. 2024, the ladder of first-diverging LR, with the QKV / Proj / FC2 output norms. The warmup
# is 60 steps of 600, so that a run diverging at its peak LR does so after the warmup, where the paper's
# attention-logit growth happens, rather than in the generic early blow-up of a short warmup; the LR grid
# steps by about 1.5x (the paper's groups are 1.33-1.5x apart). The grid is climbed, not run whole: the
# critical-LR finder runs it two LRs a round and stops a variant once both seeds diverged, so the grid can reach
# LR 3.3 (nothing at tiny diverged up to 0.75) without running every variant there. Its probes are the plain
# grid's jobs (no early stops, probe_overrides=[]): the runs this grid's first half finished are reused.
e4() {
  qknorm-train -m hydra/sweeper=critical_lr "hydra.sweeper.probe_overrides=[]" hydra.sweeper.precision=1.6 \
    "hydra.sweeper.targets=[diverged]" model=tiny trainer.max_steps=600 optim.warmup_steps=60 seed=0,1 \
    optim.lr=0.1,0.15,0.22,0.33,0.5,0.75,1,1.5,2.2,3.3 \
    attention=baseline,rybakov2024_soft_cap,wortsman2023_qk_layernorm,rybakov2024_qk_fc_norm,rybakov2024_qkv_norm,rybakov2024_qk_norm_cap \
    "${COMMON[@]}" "hydra.sweep.dir=$RUNS/e4_ladder_w60"
}
# The first E4 round (300 steps, a 15-step warmup, a coarser grid): every divergence fell inside or just
# after the warmup. Kept to compare against.
e4_w15() {
  sweep e4_rybakov_ladder model=tiny trainer.max_steps=300 seed=0,1 optim.lr=3e-2,1e-1,3e-1,4.5e-1,6.7e-1,1,3 \
    attention=baseline,rybakov2024_soft_cap,wortsman2023_qk_layernorm,rybakov2024_qk_fc_norm,rybakov2024_qkv_norm,rybakov2024_qk_norm_cap
}

# E5: Wortsman Figs. 3-4, output-logit drift without weight decay, and z-loss 1e-4 against it (a longer run).
e5() {
  sweep e5_zloss model=tiny trainer.max_steps=1000 seed=0,1 attention=wortsman2023_qk_layernorm \
    optim.lr=1e-1 optim.weight_decay=0 optim.z_loss=0,1e-4
}

# E6: Wortsman Fig. 10, q and k forced to RMS sqrt(kappa): RMS-normalized, no gain, and a constant scale
# kappa / sqrt(d_h) (d_h = 32), which gives the same logits as q, k of RMS sqrt(kappa) under 1/sqrt(d_h).
e6() {
  sweep e6_kappa model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2 attention=baseline attention.qk_norm=rms \
    attention.gain=none attention.scale.kind=constant \
    attention.scale.value=0.1767767,1.767767,17.67767,176.7767,1767.767
}

# E7: Wortsman Figs. 5-6, with qk-layernorm: warmup 1% / 5% / 25%, and independent decay 1e-4 against the
# coupled (PyTorch) decay 0.1.
e7() {
  sweep e7_optim model=tiny trainer.max_steps=300 seed=0,1 optim=wortsman attention=wortsman2023_qk_layernorm \
    optim.lr=1e-2,1e-1,1 optim.warmup_fraction=0.01,0.05,0.25
  sweep e7_optim model=tiny trainer.max_steps=300 seed=0,1 optim=wortsman attention=wortsman2023_qk_layernorm \
    optim.lr=1e-2,1e-1,1 optim.independent_weight_decay=false optim.weight_decay=0.1
}

# E8: fp16 overflow of q k^T. Runs without QK-norm (baseline, Qwen2-style QKV bias) and with it (qwen3),
# fp32 and bf16 autocast, checkpoints kept for qknorm-probe. At healthy LRs: the best LR here (1e-2) and 3x it,
# so that the overflow, if any, is that of a model that learned, not of a collapsed one.
e8() {
  # validation on the whole held-out split, as every other experiment's (the first round predates the setting)
  e8_sweep e8_healthy_lr optim.lr=1e-2,3e-2 data.val_token_ratio=null
}
# The first E8 round, at LR 0.1 (10x the best LR: the models end worse than the bigram model). Kept to
# compare against.
e8_high_lr() {
  # data.val_token_ratio=null: the whole held-out split, as these runs were trained (their identity)
  e8_sweep e8_precision optim.lr=1e-1 data.val_token_ratio=null
}
e8_sweep() {
  local name=$1; shift
  qknorm-train -m model=tiny trainer.max_steps=300 seed=0,1 "$@" attention=baseline,qwen2_qkv_bias,qwen3 \
    trainer.precision=32-true,bf16-mixed data.batch_size=16 logger=csv trainer.progress_bar=false \
    "hydra.sweep.dir=$RUNS/$name"
  for ckpt in "$RUNS/$name"/*/checkpoints/last.ckpt; do
    [ -f "$ckpt" ] || continue
    run=$(dirname "$(dirname "$ckpt")")
    [ -f "$run/fp16_probe/probe.csv" ] || qknorm-probe "$ckpt" --out "$run/fp16_probe"
    rm -f "$ckpt"  # the probe's table stays; the checkpoint is too large to keep with the results
  done
}

# E9: Qwen3-Next: under QK-norm the max logit still drifts through the learned gains; zero-centred gains
# with weight decay on them curb it. A longer run.
e9() {
  sweep e9_gain_drift model=tiny trainer.max_steps=1000 seed=0,1 optim.lr=1e-2 attention=qwen3
  sweep e9_gain_drift model=tiny trainer.max_steps=1000 seed=0,1 optim.lr=1e-2 attention=qwen3 \
    attention.gain=zero_centered attention.gain_weight_decay=true
}

# E10: Marin speedrun: QK-norm gives slightly lower BPB for the same steps but costs time.
e10() {
  sweep e10_qknorm_cost model=nano,tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2 attention=baseline,qwen3
}

# The stabilizer scorecard (docs/scorecard.md): the critical-LR finder (hydra/sweeper=critical_lr) over every
# attention preset at `tiny`, 200 steps with a 40-step warmup, 2 seeds. Each preset climbs the half-decade
# grid from LR 0.01 (0.01, 0.032, ..., 3.2, 10) until both seeds diverge, then narrows both boundaries to 10^0.25
# (1.78x); probes stop early once doomed (30 steps above the initial loss after the warmup). About 14 runs
# a preset, 350 in all: a 200-step run takes about 185 s on idle cores, two at a time (of it about 30 s are the
# eight validations on the whole held-out split), so about 9 hours on 2 cores. A preset added later is one more run of this function
# (finished probes are skipped), then the page is regenerated.
scorecard() {
  local presets
  presets=$(find conf/attention -name '*.yaml' -printf '%f\n' | sed 's/\.yaml$//' | sort | paste -sd, -)
  qknorm-train -m hydra/sweeper=critical_lr "attention=$presets" seed=0,1 model=tiny trainer.max_steps=200 \
    optim.warmup_steps=40 hydra.sweeper.lr_min=0.01 hydra.sweeper.lr_max=10 hydra.sweeper.precision=1.778 \
    "${COMMON[@]}" "hydra.sweep.dir=$RUNS/scorecard"
  qknorm-scorecard "$RUNS/scorecard" --out docs/scorecard.md
}

# E11: Muon and the logits (Kimi K2's QK-Clip; Su Jianlin: Muon is more prone to max-logit explosion than
# Adam). tiny without QK-norm, an LR ladder forced high (small models rarely explode: Su), 400 steps with a
# 40-step warmup, 2 seeds. AdamW against Muon at matched update RMS (Muon's match_rms_adamw: the same LR gives
# an update of AdamW's RMS); then, at the two highest LRs, Muon with QK-Clip at tau 30 and 100, per head and per
# layer; with Qwen3's QK-norm; with a soft-cap of 50 (the monitor records the logit before the cap). 40 runs.
E11=(model=tiny trainer.max_steps=400 optim.warmup_steps=40 seed=0,1)
e11() {
  sweep e11_muon_logits "${E11[@]}" attention=baseline optim=adamw,muon optim.lr=1e-2,3e-2,1e-1,3e-1
  sweep e11_muon_logits "${E11[@]}" attention=baseline optim=muon optim.lr=1e-1,3e-1 \
    attention.qk_clip_tau=30,100 attention.qk_clip_scope=head,layer
  sweep e11_muon_logits "${E11[@]}" optim=muon optim.lr=1e-1,3e-1 attention=qwen3,rybakov2024_soft_cap
}

# E12: gates and sinks. Qiu et al. 2025 (gated attention, as Qwen3-Next ships it): does the output gate raise the LR
# the model tolerates, and does it remove the sink on the first token (Gu et al. 2025's sink rate, in the monitor's
# records)? Qwen3-Next's attention with and without its gate (the same zero-centred, decayed gains: the gate is the
# only difference), Qwen3, the baseline, gpt-oss's learned sink and sigmoid attention; E4's 600 steps and 60-step
# warmup; 2 seeds. Where each arm first diverges is searched, not gridded: in the 60-step-warmup E4 no tiny model
# diverged up to LR 0.75, so a fixed grid ending at 1 would leave the gate's arms censored. The critical-LR finder
# climbs 0.03, 0.32, 1, 3.2, 10 until both seeds diverge, then narrows the brackets of the divergence LR and of
# the critical LR (worse than the bigram model: at tiny a high LR more often ends there than above the initial
# loss) to 1.5x (GRID_RESOLUTION: on coarser brackets a tie between the arms could not be read as 'not
# higher'); the low LRs, where every arm trains, are where the sink is read. Probes stop 30 steps after they
# are doomed. Two sweeps (the ungated arm is an override of a preset, not a preset), about 100 runs.
E12=(model=tiny trainer.max_steps=600 optim.warmup_steps=60 seed=0,1 optim.lr=0.03,0.3162,1,3.162,10 hydra/sweeper=critical_lr
     hydra.sweeper.precision=1.5)
e12() {
  qknorm-train -m "${E12[@]}" attention=baseline,qwen3,qwen3_next,gpt_oss_sink,ramapuram2024_sigmoid "${COMMON[@]}" \
    "hydra.sweep.dir=$RUNS/e12_gates_sinks/presets"
  qknorm-train -m "${E12[@]}" attention=qwen3_next attention.output_gate=none "${COMMON[@]}" \
    "hydra.sweep.dir=$RUNS/e12_gates_sinks/without_gate"
}

# every folder the page reads or will read: the first rounds (e3_coarse, e4_w15, e8_high_lr) and the rounds after them
all=(e1 e10 e4_w15 e4 e6 e5 e3_coarse e3 e7 e9 e8_high_lr e8 e11 e12)
# The CPU round that decides (in this order, about 11 machine hours): bash reproductions/run.sh round
round() { e8; e4; e3_search; e1; e3_below; }
for e in "${@:-${all[@]}}"; do
  echo "== $e $(date -u +%FT%TZ)"
  "$e"
done
# the run directories are committed: the resolved cache path names the home directory as ~ (the data
# code expands it; the path is outside a run's identity), and Hydra's record and the log stay untracked
find "$RUNS" -path '*/.hydra/config.yaml' -exec sed -i "s#$HOME/#~/#g" {} +
echo "== done $(date -u +%FT%TZ)"
