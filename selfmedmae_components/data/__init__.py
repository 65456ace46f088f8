"""Datalists and splits for the public datasets, in their download layouts (one module each), and in demo/
synthetic data in the same layouts. selfmedmae_components/registry.py lists the datasets and their bundles."""
