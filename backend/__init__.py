"""Backend processes and talking to them: spawning, supervision, health, the pool, the HTTP client."""
