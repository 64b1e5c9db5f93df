"""A stand-in GLM-TTS api_server: same HTTP contract, emulated or real (torch) inference."""
