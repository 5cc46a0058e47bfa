"""robustkit-art: the Adversarial Robustness Toolbox (ART) as a robustkit plugin.

The entry point (``art = "robustkit_art.plugin"``) imports neither torch nor ART; attacks and
defences import ART only when they run.
"""
