"""robustkit's built-in plugins, registered from code under the provider name ``robustkit``."""
