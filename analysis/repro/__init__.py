"""The shared core of the reproduction page (analysis/reproductions.py): reading the runs, the verdict
rule, the thresholds, the recipe line and the page itself. Each claim is a module of analysis/claims/."""
