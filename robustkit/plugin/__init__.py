"""The plugin layer: hook specifications, the pluggy host and the name registries."""
