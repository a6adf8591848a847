"""qkov workers: model loading, attention layouts, per-sample gradients, Fisher, store writers."""
