"""torchattacks behind robustkit's attack interface (provider ``torchattacks``).

Nothing is imported here: robustkit loads ``robustkit_torchattacks.plugin`` through its entry
point, and torch and torchattacks are imported only when an attack is registered or runs.
"""
