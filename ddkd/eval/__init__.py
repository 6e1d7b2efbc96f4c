"""Stage 3 (``ddkd evaluate``): pre-train fresh encoders on a set, probe with few labels."""
