"""Graph passes: one pass (or rule family) per module, run by ``qcompiler.pipeline``."""
