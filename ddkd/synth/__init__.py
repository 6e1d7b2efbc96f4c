"""Stage 2 (``ddkd synthesize``): trajectory matching of synthetic images and targets."""
