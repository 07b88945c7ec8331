#!/usr/bin/env bash
# The sweeps behind docs/reproductions.md, one function per claim (E1-E10 of that page). Each is an
# ordinary Hydra multirun of `qknorm-train`: its jobs' directories are named by their configs, so running
# this again resumes where it stopped, skips finished jobs, and a widened grid (another seed, another LR)
# only trains what is new. Then `python analysis/reproductions.py` rewrites docs/reproductions.md.
#
#     bash reproductions/run.sh                 # every experiment, in order (hours on 2 cores)
#     bash reproductions/run.sh e1 e10          # some of them
#
# The scale is the CPU one (2 cores): batch 16 x 256 tokens, 300 steps unless an experiment needs a
# longer run, no checkpoints kept (E8 keeps its own), CSV logs only, so that run directories are small
# enough to commit. Runs go to reproductions/runs/<experiment>/ (QKNORM_REPRO_RUNS moves them).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${QKNORM_REPRO_RUNS:-reproductions/runs}
COMMON=(data.batch_size=16 trainer.keep_checkpoint=false logger=csv trainer.progress_bar=false)
sweep() { local name=$1; shift; qknorm-train -m "$@" "${COMMON[@]}" "hydra.sweep.dir=$RUNS/$name"; }

# E1 (and E2, from the same runs' stability logs): Wortsman et al. 2023 Fig. 1, 2, E.1, 9. A width ladder
# (head_dim 32; width, depth and heads together), with and without qk-layernorm, their optimizer.
e1() {
  sweep e1_wortsman_fig1 optim=wortsman model=ladder_64,ladder_96,ladder_128 \
    attention=baseline,wortsman2023_qk_layernorm optim.lr=1e-3,3e-3,1e-2,3e-2,1e-1,3e-1 seed=0,1 trainer.max_steps=300
}
e2() { e1; }

# E3: norm kinds and scopes (Wortsman Fig. E.8, Henry 2020): LayerNorm / RMS / L2 with learned g, per head vs
# full width, before vs after RoPE, and L2 with a fixed gain of 1 (the logits bounded by 1/sqrt(d_h)).
e3() {
  sweep e3_norm_variants model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2,3e-1,3 \
    attention=wortsman2023_qk_layernorm,vit22b_layernorm,qwen3,olmo2,henry2020_l2
  sweep e3_norm_variants model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2,3e-1,3 \
    attention=qwen3 attention.position=after_rope
  sweep e3_norm_variants model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-2,3e-1,3 \
    attention=baseline attention.qk_norm=l2 attention.gain=none
}

# E4: Rybakov et al. 2024, the ladder of first-diverging LR, with the QKV / Proj / FC2 output norms. Every
# variant is stable at 0.3 and diverges by 1 here, so the grid steps by 1.5x between them (the paper's
# groups are 1.33-1.5x apart).
e4() {
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
# fp32 and bf16 autocast, checkpoints kept for qknorm-probe.
e8() {
  qknorm-train -m model=tiny trainer.max_steps=300 seed=0,1 optim.lr=1e-1 attention=baseline,qwen2_qkv_bias,qwen3 \
    trainer.precision=32-true,bf16-mixed data.batch_size=16 logger=csv trainer.progress_bar=false \
    "hydra.sweep.dir=$RUNS/e8_precision"
  for ckpt in "$RUNS"/e8_precision/*/checkpoints/last.ckpt; do
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

all=(e1 e10 e4 e6 e5 e3 e7 e9 e8)
for e in "${@:-${all[@]}}"; do
  echo "== $e $(date -u +%FT%TZ)"
  "$e"
done
# the run directories are committed: the resolved cache path names the home directory as ~ (the data
# code expands it; the path is outside a run's identity), and Hydra's record and the log stay untracked
find "$RUNS" -path '*/.hydra/config.yaml' -exec sed -i "s#$HOME/#~/#g" {} +
echo "== done $(date -u +%FT%TZ)"
