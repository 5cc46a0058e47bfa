"""An example third-party robustkit plugin (provider ``example``).

Nothing is imported here: robustkit loads ``robustkit_plugin_example.plugin`` through the
entry point, and torch is imported only when an attack or the data set is registered.
"""
