"""robustkit-text: text classifiers in robustkit's audit and harden jobs.

Imports nothing: the entry point (``robustkit_text.plugin``) imports the implementation
inside its hooks, so discovering the plugin costs neither torch nor transformers.
"""
