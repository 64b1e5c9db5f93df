"""Everything specific to GLM-TTS's HTTP API: contract, text cost, WAV helpers, client, emulator."""

__version__ = "0.1.0"
