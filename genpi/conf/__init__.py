"""genpi's Hydra configs (a package so that installed console scripts compose from it; see the README)."""
