"""Stage 1 (``ddkd teach``): SSL teacher, its target representations, KD students (experts)."""
