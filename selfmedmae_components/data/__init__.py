"""Datalists, splits and demo data for the three public datasets, in their download layouts."""
