"""The sidecar's runtime: the dispatcher that owns slots, the exchange with a backend, async tasks,
metrics, reload and drain. Built on the pure core; knows nothing of HTTP routing."""
