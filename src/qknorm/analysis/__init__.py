"""Analysis reads run directories only (summary.json, stability.jsonl, .hydra/); it never imports training code."""
