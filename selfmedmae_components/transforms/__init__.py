"""Dataset-specific transforms that MONAI does not provide."""
