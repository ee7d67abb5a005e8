"""LiveAvatar's few-step streaming mode: 4 Euler steps, no CFG, block-causal attention over
per-step KV caches (spec liveavatar.md). ``preset`` holds the mode's constants, ``runner`` the
clip / block / step loops over :class:`s2v_fast.models.causal.CausalS2V`."""
