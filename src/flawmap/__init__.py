"""flawmap: unsupervised visual anomaly detection."""
